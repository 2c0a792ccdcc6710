"""Prefill/decode disaggregation speed: 100,000 Poisson requests through `simcc estimate` as cold
processes, colocated and split into pools (serve.disaggregated), LLaMA-2 7B on 32 H100s (4 DGX
nodes, tp = 1). 8 + 24 instances form 8 alike groups (one simulated); 3 + 29 share no divisor, so
all 32 instances run in one simulation: the slowest case. Prints the median wall time of a few runs.

Usage: python benchmarks/disaggregation_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ["estimate", "workloads/validation/llama2_7b_serve.yaml", "--hardware", "dgx_h100_x4", "--requests", "100000",
        "--set", "serve.batch=32", "--set", "serve.prompt_tokens=2000", "--set", "serve.output_tokens=256",
        "--set", "serve.arrival_rate=20"]
CASES = {
    "colocated, 32 replicas": [],
    "disaggregated 8 prefill + 24 decode": ["--set", "serve.disaggregated.prefill_replicas=8",
                                            "--set", "serve.disaggregated.decode_replicas=24"],
    "disaggregated 3 prefill + 29 decode": ["--set", "serve.disaggregated.prefill_replicas=3",
                                            "--set", "serve.disaggregated.decode_replicas=29"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'case (100,000 requests, cold process)':44s} {'median wall s':>13s}")
    for label, extra in CASES.items():
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "simcc", *BASE, *extra], cwd=ROOT, check=True, capture_output=True)
            walls.append(time.perf_counter() - start)
        print(f"{label:44s} {statistics.median(walls):13.2f}")


if __name__ == "__main__":
    main()
