"""Render an estimate as a table, JSON or CSV; every format shows the same numbers."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from typing import Any

from simcc.results import AnytimeWidthRow, BlockCostRow, Estimate, MoELayerRow, PhaseRow, Record, ScheduleSection


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
    """The JSON document: every section under its report key, then per-layer and per-phase rows."""
    sections = {key: section.as_dict() for key, section in result.sections()}
    layers = {"moe_layers": [row.as_dict() for row in result.moe_layers]} if result.moe_layers else {}
    phases = {"phases": [row.as_dict() for row in result.phases]} if result.phases else {}
    widths = {"anytime_widths": [row.as_dict() for row in result.anytime_widths]} if result.anytime_widths else {}
    blocks = {"block_costs": [row.as_dict() for row in result.block_costs]} if result.block_costs else {}
    return {"workload": result.workload, "hardware": result.hardware, **sections, **layers, **phases, **widths,
            **blocks, "notes": result.notes}


def finite_json(data: Any) -> str:
    """JSON that strict parsers accept: a non-finite number (a figure with no meaning, e.g. a
    price no real device has) is written as null, never as bare NaN or Infinity."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False)


def to_json(result: Estimate) -> str:
    return finite_json(to_dict(result))


def to_csv(result: Estimate) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "metric", "value"])
    for name, section in result.sections():
        for key, value in section.items():
            writer.writerow([name, key, value])
    for layer in result.moe_layers:
        for key, value in layer.items():
            if key != "layer":
                writer.writerow([f"moe_layer.{layer.layer}", key, value])
    for index, phase in enumerate(result.phases):
        for key, value in phase.items():
            writer.writerow([f"phase.{index}", key, value])
    for row in result.anytime_widths:
        for key, value in row.items():
            if key != "width":
                writer.writerow([f"anytime_width.{row.width}", key, value])
    for block in result.block_costs:
        for key, value in block.items():
            if key != "layer":
                writer.writerow([f"block.{block.layer}", key, value])
    return buffer.getvalue()


def _layer_table(rows: list[MoELayerRow]) -> list[str]:
    shown = rows
    if len(rows) > LAYER_ROWS_IN_TABLE:
        shown = sorted(sorted(rows, key=lambda r: -r.imbalance_wait_s)[:LAYER_ROWS_IN_TABLE], key=lambda r: r.layer)
    columns = [("layer", "layer"), ("tok/exp", "tokens_per_expert_mean"), ("max", "tokens_per_expert_max"),
               ("cv", "load_cv"), ("dropped", "dropped_fraction"), ("padding", "padding_fraction"),
               ("exp/tok", "experts_per_token"), ("a2a in MB", "a2a_intra_mb"), ("a2a out MB", "a2a_inter_mb"),
               ("a2a s", "a2a_s"), ("hidden s", "a2a_hidden_s"), ("wait s", "imbalance_wait_s")]
    title = "MoE layers (per step; a2a in/out of the node)" + (
        f": the {len(shown)} of {len(rows)} that wait longest" if len(shown) < len(rows) else "")
    return _row_lines(title, columns, shown, 10)


def _row_lines(title: str, columns: list[tuple[str, str]], rows: Sequence[Record], cell: int) -> list[str]:
    """A titled fixed-width table: (heading, field) columns, one line per row."""
    lines = ["", title, "  " + " ".join(f"{heading:>{cell}}" for heading, _ in columns)]
    lines += ["  " + " ".join(f"{_fmt(getattr(row, key)):>{cell}}" for _, key in columns) for row in rows]
    return lines


def _phase_table(rows: list[PhaseRow]) -> list[str]:
    columns = [("schedule", "schedule"), ("phase", "phase"), ("mode", "mode"), ("E", "experts"), ("k", "k"),
               ("tokens", "tokens"), ("steps", "steps"), ("step s", "step_s"), ("PFLOP", "pflop"), ("hours", "hours"),
               ("$", "usd"), ("kWh", "kwh")]
    return _row_lines("Schedule phases (switches cost MoEfication clustering and permutation)", columns, rows, 14)


def _width_table(rows: list[AnytimeWidthRow]) -> list[str]:
    columns = [("width", "width"), ("TIPS score", "tips_score")]
    columns += [(heading, key) for heading, key in (("per step", "trained_per_step"), ("served", "served_share"),
                                                      ("latency s", "predicted_latency_s"))
                if getattr(rows[0], key) is not None]
    return _row_lines("Anytime widths (TIPS scores; trained per step or served under the latency budget)",
                      columns, rows, 10)


def _block_table(rows: list[BlockCostRow]) -> list[str]:
    columns = [("layer", "layer"), ("kind", "kind"), ("fwd GFLOP", "forward_gflop"), ("bwd GFLOP", "backward_gflop"),
               ("fwd GB", "forward_gb_moved"), ("fwd s", "forward_s"), ("bwd s", "backward_s"),
               ("recomp s", "recompute_s"), ("comm s", "comm_s"), ("saved GB", "saved_gb")]
    return _row_lines("Blocks (one micro-batch, one device; backward without recomputation)", columns, rows, 10)


def to_table(result: Estimate) -> str:
    lines = [f"{result.workload} on {result.hardware}"]
    sections = [(name, list(section.items()), section) for name, section in result.sections()]
    width = max((len(key) for _, values, _ in sections for key, _ in values), default=10)
    for name, values, section in sections:
        lines.append("")
        # a named schedule is titled by its key ("schedule ssd"); every other section by its type
        lines.append(name if isinstance(section, ScheduleSection) and name != "schedule" else section.title)
        lines += [f"  {key:<{width}}  {_fmt(value):>14}" for key, value in values]
    if result.moe_layers:
        lines += _layer_table(result.moe_layers)
    if result.phases:
        lines += _phase_table(result.phases)
    if result.anytime_widths:
        lines += _width_table(result.anytime_widths)
    if result.block_costs:
        lines += _block_table(result.block_costs)
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
        return finite_json(rows) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else table_columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    return rows_table(rows, table_columns)
