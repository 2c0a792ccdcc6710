"""Rewrite the golden accuracy table from the current predictions:
`.venv/bin/python tests/golden/update.py`. Commit the table with the change that moved it, and say
in the commit message which mechanism moved which case."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from simcc.validation import SUITES, load_suite, run_suite

HERE = Path(__file__).parent
COLUMNS = ["case", "metric", "measured", "predicted", "error_pct", "memory_gb"]


def golden_path(suite: str) -> Path:
    return HERE / f"{suite}_suite.csv"


def write(suite: str) -> Path:
    path = golden_path(suite)
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in run_suite(load_suite(suite)):
            writer.writerow([row.case, row.metric, f"{row.measured:g}", f"{row.predicted:.6g}",
                             f"{row.error * 100:+.2f}", "" if row.memory_gb is None else f"{row.memory_gb:.2f}"])
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or list(SUITES):
        print(f"wrote {write(name)}")
