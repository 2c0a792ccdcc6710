"""What ships with simcc: hardware profiles and workloads, with their names and one-line summaries."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from simcc.errors import InputError
from simcc.specs.blocks import BLOCK_SPECS, help_line
from simcc.specs.loader import (PROFILE_FOLDERS, SWEEP_FOLDER, read_yaml, shipped_hardware_dir, shipped_workload_dir,
                                 shipped_workload_files)
from simcc.specs.vocab import CAPACITY_FORMULAS, COLLECTIVES, DTYPES, GATING_POLICIES, WEIGHT_FORMATS

# The vocabularies a workload or profile names things from: (kind, group, name -> help).
VOCABULARIES = (
    ("gating", "policy", GATING_POLICIES),
    ("routing", "capacity", CAPACITY_FORMULAS),
    ("dtype", "precision", DTYPES),
    ("weights", "precision", WEIGHT_FORMATS),
    ("comm", "collective", COLLECTIVES),
)


def catalog() -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    hardware = shipped_hardware_dir()
    for folder in PROFILE_FOLDERS:
        for path in sorted((hardware / folder).glob("*.yaml")):
            rows.append(_row("hardware", folder, path))
    for path in shipped_workload_files():
        rows.append(_row("workload", path.parent.name, path))
    for path in sorted((shipped_workload_dir() / SWEEP_FOLDER).glob("*.yaml")):
        rows.append({"kind": "sweep", "group": SWEEP_FOLDER, "name": path.stem,
                     "summary": f"simcc sweep {path.relative_to(shipped_workload_dir().parent)}"})
    rows += [{"kind": "block", "group": "model", "name": kind, "summary": help_line(spec)}
             for kind, spec in BLOCK_SPECS.items()]
    rows += [{"kind": kind, "group": group, "name": name, "summary": text}
             for kind, group, names in VOCABULARIES for name, text in names.items()]
    return rows


def _row(what: str, group: str, path: Path) -> dict[str, str]:
    try:
        data = read_yaml(path)
        summary = str(data.get("name", ""))
        if what == "workload":
            summary += f" ({data.get('mode', '?')})"
    except InputError as err:
        summary = f"unreadable: {err.message}"
    return {"kind": what, "group": group, "name": path.stem, "summary": summary}


def render_catalog(rows: list[dict[str, str]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["kind", "group", "name", "summary"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    width = max(len(r["name"]) for r in rows) if rows else 10
    lines = [f"{r['kind']:<9} {r['group']:<10} {r['name']:<{width}}  {r['summary']}" for r in rows]
    return "\n".join(lines) + "\n"
