"""Convert a published collective sweep from Vidur's profiling data into simcc's collective table,
so that `simcc calibrate` fits it like any `simcc profile comm` measurement.

Vidur (Agrawal et al., MLSys 2024, "Vidur: A Large-Scale Simulation Framework for LLM
Inference"; github.com/microsoft/vidur, data/profiling/network/<cluster>/all_reduce.csv, commit
e26eb8f7 of 2024-05-14) times torch.distributed NCCL all-reduces of fp16 buffers from 2 KiB to
64 MiB inside one node, as the NCCL kernels' durations in the torch profiler (kineto), three
rounds of ten back-to-back launches each (vidur/profiling/collectives/collectives_wrapper.py).
Its `size` column is the buffer in bytes and its times are in milliseconds; it reports the
minimum, median and maximum over the rounds, which stand in here for the 10th and 90th
percentiles (a wider spread than those).

Usage:
    python benchmarks/import_vidur_collectives.py all_reduce.csv --device-name "A100-SXM4-80GB" \
        --out hardware_profiles/measured/dgx_a100_vidur_2024-05.comm.csv

Only whole-node groups are kept (`devices_per_node` equal to `num_workers`), and of the sweep's
sizes (every 8 KiB to 1 MiB, every 32 KiB beyond) the first at or above each step of a
quarter-octave ladder from 4 KiB, so that small and large messages weigh alike in the fit. Rows
are written in simcc's `simcc profile comm` columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from simcc.errors import InputError
from simcc.io import read_user_text, write_atomically

VIDUR_STAT = "time_stats.all_reduce.{}"
COLUMNS = ("collective", "bytes", "ranks", "ranks_per_node", "median_s", "p10_s", "p90_s", "repeats", "backend",
           "device_type", "device_name", "torch_version")
ROUNDS = 3  # Vidur's ACTIVE_STEPS
SMALLEST_BYTES = 4096
STEPS_PER_OCTAVE = 4
MAX_TABLE_BYTES = 64 << 20  # Vidur's largest sweep table is ~650 KB


def ladder_sizes(sizes: list[int]) -> set[int]:
    """The first measured size at or above each rung 4 KiB x 2^(i/4) up to the largest size."""
    ordered = sorted(set(sizes))
    chosen: set[int] = set()
    rung = 0
    while SMALLEST_BYTES * 2 ** (rung / STEPS_PER_OCTAVE) <= ordered[-1]:
        target = SMALLEST_BYTES * 2 ** (rung / STEPS_PER_OCTAVE)
        chosen.add(next(size for size in ordered if size >= target))
        rung += 1
    return chosen


def convert(rows: list[dict[str, str]], device_name: str) -> list[dict[str, object]]:
    """Vidur all-reduce rows of whole-node groups, as simcc collective rows (seconds)."""
    whole_node = [row for row in rows if row["num_workers"] == row["devices_per_node"]]
    out, seen = [], set()
    for ranks in sorted({int(row["num_workers"]) for row in whole_node}):
        group = [row for row in whole_node if int(row["num_workers"]) == ranks]
        kept = ladder_sizes([int(row["size"]) for row in group])
        for row in group:
            size = int(row["size"])
            if size not in kept or (ranks, size) in seen:
                continue
            seen.add((ranks, size))
            out.append(_simcc_row(row, ranks, size, device_name))
    return sorted(out, key=lambda r: (r["ranks"], r["bytes"]))


def _simcc_row(row: dict[str, str], ranks: int, size: int, device_name: str) -> dict[str, object]:
    milliseconds = {stat: float(row[VIDUR_STAT.format(stat)]) for stat in ("min", "median", "max")}
    return {"collective": "all_reduce", "bytes": size, "ranks": ranks, "ranks_per_node": ranks,
            "median_s": milliseconds["median"] * 1e-3, "p10_s": milliseconds["min"] * 1e-3,
            "p90_s": milliseconds["max"] * 1e-3, "repeats": ROUNDS, "backend": "nccl", "device_type": "cuda",
            "device_name": device_name, "torch_version": "unknown (Vidur, 2024-05)"}


def table_text(rows: list[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vidur_csv", type=Path)
    parser.add_argument("--device-name", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.out.exists():  # a table the user owns is never replaced
            raise InputError("--out", str(args.out), "exists; write the table elsewhere")
        text = read_user_text(args.vidur_csv, MAX_TABLE_BYTES, "a Vidur table")
        try:
            rows = convert(list(csv.DictReader(io.StringIO(text))), args.device_name)
        except (KeyError, ValueError) as error:
            raise InputError(str(args.vidur_csv), f"column {error}", "missing or not a number: not a Vidur all-reduce table") from None
        if not rows:
            raise InputError(str(args.vidur_csv), "num_workers", "no whole-node rows (devices_per_node equal to num_workers)")
        write_atomically(args.out, table_text(rows), "--out")
    except InputError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
