"""Rewrite the golden accuracy table from the current predictions:
`.venv/bin/python tests/golden/update.py [SUITE ...]`, or compare without writing:
`tests/golden/update.py --check [SUITE ...]` (exit 1 when a case moved). Commit the table with the
change that moved it, and say in the commit message which mechanism moved which case."""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
from pathlib import Path

from simcc.validation import SUITES, load_suite, run_suite

HERE = Path(__file__).parent
COLUMNS = ["case", "metric", "measured", "predicted", "error_pct", "memory_gb"]


def golden_path(suite: str) -> Path:
    return HERE / f"{suite}_suite.csv"


def table(suite: str) -> str:
    """The suite's golden table, as text, from the current predictions."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in run_suite(load_suite(suite)):
        writer.writerow([row.case, row.metric, f"{row.measured:g}", f"{row.predicted:.6g}",
                         f"{row.error * 100:+.2f}", "" if row.memory_gb is None else f"{row.memory_gb:.2f}"])
    return buffer.getvalue()


def write(suite: str) -> Path:
    """Replace the table only once the whole suite has run (a failing case leaves the old one)."""
    path = golden_path(suite)
    text = table(suite)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8", newline="") as out:
        out.write(text)
    os.chmod(out.name, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # keep the table's permissions
    os.replace(out.name, path)
    return path


def changed(suite: str) -> list[str]:
    """Rows that differ from the committed table, as 'old -> new' lines."""
    old = golden_path(suite).read_text(encoding="utf-8").splitlines() if golden_path(suite).exists() else []
    new = table(suite).splitlines()
    old_rows, new_rows = {line.split(",")[0]: line for line in old[1:]}, {line.split(",")[0]: line for line in new[1:]}
    return [f"{old_rows.get(case, '(none)')} -> {new_rows.get(case, '(removed)')}"
            for case in sorted(set(old_rows) | set(new_rows)) if old_rows.get(case) != new_rows.get(case)]


if __name__ == "__main__":
    arguments = sys.argv[1:]
    check = "--check" in arguments
    names = [a for a in arguments if a != "--check"] or list(SUITES)
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        sys.exit(f"unknown suite {unknown[0]!r}; expected one of {', '.join(SUITES)} (or --check)")
    moved = False
    for name in names:
        if check:
            lines = changed(name)
            moved = moved or bool(lines)
            print(f"{name}: {len(lines)} rows differ" + "".join(f"\n  {line}" for line in lines))
        else:
            print(f"wrote {write(name)}")
    sys.exit(1 if moved else 0)
