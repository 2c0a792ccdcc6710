"""A search's answer as people read it (the top layouts, why the winner wins, the time-cost front)
and as programs do (JSON or CSV: one row per layout simulated, with its rank and front mark)."""

from __future__ import annotations

from typing import Any

from simcc.report.render import finite_json, rows_output, rows_table
from simcc.search.run import SearchResult

TOP_COLUMNS = ["rank", "layout", "step_s", "lower_bound_s", "compute_s", "exposed_comm_s", "bubble_s", "imbalance_s",
               "memory_gb", "days", "usd", "tokens_per_s", "mfu"]
FRONT_COLUMNS = ["layout", "devices", "step_s", "usd_per_million_tokens", "days", "usd", "memory_gb"]


def result_rows(result: SearchResult) -> list[dict[str, Any]]:
    """Every simulated layout, fastest first: its summary row, its rank (top N, else None), and
    whether it lies on the time-cost front."""
    rank = {id(entry): index for index, entry in enumerate(result.ranked, 1)}
    front = {id(entry) for entry in result.front}
    ordered = sorted(result.simulated, key=lambda entry: entry.step_s)
    return [{"rank": rank.get(id(e)), "on_front": id(e) in front, **e.row} for e in ordered]


def render(result: SearchResult, fmt: str) -> str:
    if fmt != "table":
        rows = result_rows(result)
        return finite_json({"counts": vars(result.counts), "seconds": result.seconds, "explanation": result.explanation,
                            "layouts": rows}) + "\n" if fmt == "json" else rows_output(rows, fmt, TOP_COLUMNS)
    counts = result.counts
    lines = [f"searched {counts.candidates:,} layouts in {result.seconds:.1f} s: {counts.simulated:,} simulated, "
             f"{counts.pruned:,} skipped by the lower bound, {counts.unfit:,} do not fit under any recompute policy, "
             f"{counts.over_budget:,} over budget (by their bound or once simulated), {counts.refused:,} refused"]
    if result.first_refusal:
        lines.append(f"  first refused: {result.first_refusal}")
    if not result.ranked:
        lines.append("no layout fits within the budget")
        return "\n".join(lines) + "\n"
    top = [{"rank": index, **entry.row} for index, entry in enumerate(result.ranked, 1)]
    lines += ["", f"fastest {len(top)} (step breakdown on the critical stage):", rows_table(top, TOP_COLUMNS).rstrip()]
    if result.explanation:
        lines += ["", "why the winner wins:"] + [f"  {line}" for line in result.explanation]
    front = [entry.row for entry in result.front]
    lines += ["", f"Pareto front, step time vs $ ({len(front)} layouts):", rows_table(front, FRONT_COLUMNS).rstrip()]
    return "\n".join(lines) + "\n"
