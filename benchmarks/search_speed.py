"""`simcc search` as users run it: a fresh process per search, median wall time over several
runs, the candidate layouts it weighed and the time per candidate.

The analytical peer Calculon (Isaev et al. 2023, SC'23) was measured at 219 CPU-seconds for 6,608
layouts of its 22B case (33 ms per layout; the figure recorded in simcc's issue 20). It is not on
the package index and this machine reaches no network, so it is compared by that figure, not run
side by side.

Each process may cache its bytecode, as Python does on a user's machine after the first run
(this sandbox sets PYTHONDONTWRITEBYTECODE, which would make every run compile simcc anew).

Usage: python benchmarks/search_speed.py [--repeats 3] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time

PEER_MS_PER_LAYOUT = 219.0 / 6608 * 1000

# (name, simcc search arguments)
CASES = [
    ("megatron 22B on 8 A100 (global batch 512)",
     ["gpt_22b_dense_train_8xa100", "-H", "dgx_a100_x1", "--set", "train.global_batch=512",
      "--space", "vpp=1,2,3,4,6,8", "--space", "micro_batch=1,2,4,8,16", "--space", "zero_stage=0,1,2,3",
      "--space", "sequence_parallel=true,false", "--space", "overlap_grad_reduce=true,false",
      "--space", "overlap_p2p=true,false"]),
    ("deepseek-v3 shape on 1,024-4,096 H100 (global batch 15,360)",
     ["deepseek_v3_shape_train", "-H", "dgx_h100_x128", "--devices", "1024..4096", "--set", "train.global_batch=15360"]),
]

USER_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


# Runs one command, passes its output through, and prints its CPU seconds (its children's too)
# last on stderr: the peer's figure is CPU time.
CPU_OF_CHILD = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
                "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
                "print(usage.ru_utime + usage.ru_stime, file=sys.stderr); sys.exit(done.returncode)")


def run_once(arguments: list[str], jobs: int) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds and the JSON answer of one fresh `simcc search` process."""
    command = [sys.executable, "-m", "simcc", "search", *arguments, "--format", "json", "--jobs", str(jobs)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CPU_OF_CHILD, *command], capture_output=True, text=True, env=USER_ENV)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr.strip().splitlines()[-1] if done.stderr else str(done.returncode))
    return elapsed, float(done.stderr.strip().splitlines()[-1]), json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="local processes per search (1: the CPU time of one core)")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = parser.parse_args()
    print(f"{'case':62s} {'wall s':>7s} {'CPU s':>6s} {'layouts':>8s} {'simulated':>9s} {'CPU ms/layout':>13s} "
          f"{'vs peer':>8s}")
    for name, arguments in CASES:
        if args.only and args.only not in name:
            continue
        runs = [run_once(arguments, args.jobs) for _ in range(args.repeats)]
        wall = statistics.median(seconds for seconds, _, _ in runs)
        cpu = statistics.median(seconds for _, seconds, _ in runs)
        counts = runs[0][2]["counts"]
        per_layout = cpu / counts["candidates"] * 1000
        print(f"{name:62s} {wall:7.1f} {cpu:6.1f} {counts['candidates']:8,d} {counts['simulated']:9,d} "
              f"{per_layout:13.2f} {PEER_MS_PER_LAYOUT / per_layout:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
