"""Cold `simcc estimate` as users run it: a fresh process per run (imports, spec loading, routing
samples, plan and simulation all included), median wall time over several runs. The in-process,
warm figures are benchmarks/simulator_speed.py's; they are not comparable with these.

Usage: python benchmarks/cold_start.py [--repeats 5] [--only NAME]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

# (name, workload, hardware, --set overrides, extra CLI arguments)
CASES = [
    ("deepseek-v3 as trained: 2,048 GPUs, PP16 EP64, 120 micro-batches", "deepseek_v3_shape_train", "dgx_h100_x128",
     ["hardware.nodes=256", "parallelism.pp=16", "parallelism.ep=64", "train.global_batch=15360",
      "parallelism.recompute=none"], []),
    ("deepseek-v3 at 16,384 GPUs, PP16 EP64, 120 micro-batches", "deepseek_v3_shape_train", "dgx_h100_x128",
     ["hardware.nodes=2048", "parallelism.pp=16", "parallelism.ep=64", "train.global_batch=122880",
      "parallelism.recompute=none"], []),
    ("shazeer moe-131072 (hierarchical, 131,072 experts)", "shazeer_moe_4096h_lstm_train", "k40_x16",
     ["model.blocks.2.moe_ffn.experts=131072", "model.blocks.2.moe_ffn.gating.groups=256",
      "model.blocks.2.moe_ffn.gating.sample_tokens=1024"], []),
    ("mixtral 8x7b on 64 H100", "mixtral_8x7b_train_64xh100", "dgx_h100_x8", [], []),
    ("mixtral edge serving, 10,000 requests", "mixtral_8x7b_serve_edge", "apple_m2_max", ["precision.weights=q4_0"],
     ["--requests", "10000"]),
]


def run_once(workload: str, hardware: str, sets: list[str], extra: list[str]) -> float:
    command = [sys.executable, "-m", "simcc", "estimate", workload, "--hardware", hardware, *extra]
    for item in sets:
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{workload}: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = parser.parse_args()
    print(f"{'case':66s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for name, workload, hardware, sets, extra in CASES:
        if args.only and args.only not in name:
            continue
        times = [run_once(workload, hardware, sets, extra) for _ in range(args.repeats)]
        print(f"{name:66s} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}", flush=True)


if __name__ == "__main__":
    main()
