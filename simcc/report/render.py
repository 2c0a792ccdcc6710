"""Render an estimate as a table, JSON or CSV; every format shows the same numbers."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from simcc.estimate import Estimate

SECTION_TITLES = {
    "layout": "Parallel layout", "model": "Model", "step": "Training step (critical stage)",
    "latency": "Serving latency", "throughput": "Throughput", "memory": "Memory per device",
    "moe": "MoE routing", "expert_cache": "Expert cache (edge)", "run": "Whole run",
    "schedule": "Dense/sparse schedule (whole run, next to all-dense)",
    "serving dense vs moe": "Serving the trained model: dense vs MoEfied",
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.4g}"
        return f"{value:,.4g}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


LAYER_ROWS_IN_TABLE = 12  # beyond this, the table shows the layers that wait longest


def to_dict(result: Estimate) -> dict[str, Any]:
    layers = {"moe_layers": result.moe_layers} if result.moe_layers else {}
    phases = {"phases": result.phases} if result.phases else {}
    return {"workload": result.workload, "hardware": result.hardware, **result.sections, **layers, **phases,
            "notes": result.notes}


def to_json(result: Estimate) -> str:
    return json.dumps(to_dict(result), indent=2)


def to_csv(result: Estimate) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "metric", "value"])
    for section, values in result.sections.items():
        for key, value in values.items():
            writer.writerow([section, key, value])
    for row in result.moe_layers:
        for key, value in row.items():
            if key != "layer":
                writer.writerow([f"moe_layer.{row['layer']}", key, value])
    for index, row in enumerate(result.phases):
        for key, value in row.items():
            writer.writerow([f"phase.{index}", key, value])
    return buffer.getvalue()


def _layer_table(rows: list[dict[str, Any]]) -> list[str]:
    shown = rows
    if len(rows) > LAYER_ROWS_IN_TABLE:
        shown = sorted(sorted(rows, key=lambda r: -r["imbalance_wait_s"])[:LAYER_ROWS_IN_TABLE], key=lambda r: r["layer"])
    columns = [("layer", "layer"), ("tok/exp", "tokens_per_expert_mean"), ("max", "tokens_per_expert_max"),
               ("cv", "load_cv"), ("dropped", "dropped_fraction"), ("padding", "padding_fraction"),
               ("exp/tok", "experts_per_token"), ("a2a in MB", "a2a_intra_mb"), ("a2a out MB", "a2a_inter_mb"),
               ("wait s", "imbalance_wait_s")]
    lines = ["", "MoE layers (per step; a2a in/out of the node)" +
             (f": the {len(shown)} of {len(rows)} that wait longest" if len(shown) < len(rows) else "")]
    lines.append("  " + " ".join(f"{title:>10}" for title, _ in columns))
    for row in shown:
        lines.append("  " + " ".join(f"{_fmt(row[key]):>10}" for _, key in columns))
    return lines


def _phase_table(rows: list[dict[str, Any]]) -> list[str]:
    columns = [("schedule", "schedule"), ("phase", "phase"), ("mode", "mode"), ("E", "experts"), ("k", "k"),
               ("tokens", "tokens"), ("steps", "steps"), ("step s", "step_s"), ("hours", "hours"), ("$", "usd"),
               ("kWh", "kwh")]
    lines = ["", "Schedule phases (switches cost MoEfication clustering and permutation)"]
    lines.append("  " + " ".join(f"{title:>14}" for title, _ in columns))
    for row in rows:
        lines.append("  " + " ".join(f"{_fmt(row[key]):>14}" for _, key in columns))
    return lines


def to_table(result: Estimate) -> str:
    lines = [f"{result.workload} on {result.hardware}"]
    width = max((len(k) for values in result.sections.values() for k in values), default=10)
    for section, values in result.sections.items():
        if not values:
            continue
        lines.append("")
        lines.append(SECTION_TITLES.get(section, section))
        lines += [f"  {key:<{width}}  {_fmt(value):>14}" for key, value in values.items()]
    if result.moe_layers:
        lines += _layer_table(result.moe_layers)
    if result.phases:
        lines += _phase_table(result.phases)
    if result.notes:
        lines.append("")
        lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines) + "\n"


RENDERERS = {"table": to_table, "json": to_json, "csv": to_csv}


def rows_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A fixed-width table of chosen columns, one line per row (compare, sweep fronts)."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    lines += ["  ".join(f"{v:>{w}}" for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines) + "\n"


def rows_output(rows: list[dict[str, Any]], fmt: str, table_columns: list[str]) -> str:
    """JSON and CSV carry every column; the table the ones people read."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else table_columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    return rows_table(rows, table_columns)
