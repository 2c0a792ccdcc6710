"""Cold `simcc estimate` as users run it: a fresh process per run (imports, spec loading, routing
samples, plan and simulation all included), median wall time over several runs. The in-process,
warm figures are benchmarks/simulator_speed.py's; they are not comparable with these.

Each process may cache its bytecode, as Python does on a user's machine after the first run
(this sandbox sets PYTHONDONTWRITEBYTECODE, which would make every run compile simcc anew).

Usage: python benchmarks/cold_start.py [--repeats 5] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

# (name, workload, hardware, --set overrides, extra CLI arguments)
CASES = [
    ("deepseek-v3 as trained: 2,048 GPUs, PP16 EP64, 120 micro-batches", "deepseek_v3_shape_train", "dgx_h100_x128",
     ["hardware.nodes=256", "parallelism.pp=16", "parallelism.ep=64", "train.global_batch=15360",
      "parallelism.recompute=none"], []),
    ("deepseek-v3 at 4,096 GPUs, PP16 EP64, 120 micro-batches", "deepseek_v3_shape_train", "dgx_h100_x128",
     ["hardware.nodes=512", "parallelism.pp=16", "parallelism.ep=64", "train.global_batch=30720",
      "parallelism.recompute=none"], []),
    ("deepseek-v3 at 16,384 GPUs, PP16 EP64, 120 micro-batches", "deepseek_v3_shape_train", "dgx_h100_x128",
     ["hardware.nodes=2048", "parallelism.pp=16", "parallelism.ep=64", "train.global_batch=122880",
      "parallelism.recompute=none"], []),
    ("shazeer moe-131072 (hierarchical, 131,072 experts, 4,096 sample tokens)", "shazeer_moe_4096h_lstm_train",
     "k40_x16", ["model.blocks.2.moe_ffn.experts=131072", "model.blocks.2.moe_ffn.gating.groups=256"], []),
    ("mixtral 8x7b on 64 H100", "mixtral_8x7b_train_64xh100", "dgx_h100_x8", [], []),
    ("mixtral edge serving, 10,000 requests", "mixtral_8x7b_serve_edge", "apple_m2_max", ["precision.weights=q4_0"],
     ["--requests", "10000"]),
    # fp16 Mixtral does not fit a Jetson's 64 GB: the expert-cache replay runs over sampled routing
    ("mixtral edge serving, experts offloaded to NVMe, 10,000 requests", "mixtral_8x7b_serve_edge", "jetson_agx_orin",
     [], ["--requests", "10000"]),
]


# Runs one command and prints its peak resident memory (KiB on Linux): a process's children's
# maximum is only its own child's when it has one.
PEAK_OF_CHILD = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")

USER_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def run_once(workload: str, hardware: str, sets: list[str], extra: list[str]) -> tuple[float, float]:
    """Wall seconds of one fresh `simcc estimate` process, and its peak memory in MB."""
    command = [sys.executable, "-m", "simcc", "estimate", workload, "--hardware", hardware, *extra]
    for item in sets:
        command += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], capture_output=True, text=True, env=USER_ENV)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{workload}: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return elapsed, int(done.stdout.strip()) / 1024


# A 1,000-configuration sweep as `simcc sweep` runs it, from a fresh process: Mixtral 8x7B training
# on 64 H100 over layout, batch, recomputation, ZeRO and overlap axes (5 * 5 * 5 * 2 * 2 * 2).
SWEEP = {
    "workload": "mixtral_8x7b_train_64xh100",
    "hardware": ["dgx_h100_x8"],
    "axes": {
        "parallelism.ep": [1, 2, 4, 8, 16],
        "parallelism.pp": [1, 2, 4, 8, 16],
        "train.global_batch": [128, 256, 512, 1024, 2048],
        "parallelism.recompute": ["selective", "full"],
        "parallelism.zero_stage": [1, 2],
        "parallelism.overlap_grad_reduce": [True, False],
    },
    "steps": 1,
}


def sweep_once(jobs: int) -> tuple[float, int]:
    """Seconds for the whole `simcc sweep` process, and the configurations it ran."""
    import tempfile
    from pathlib import Path

    import yaml

    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "sweep.yaml"
        spec.write_text(yaml.safe_dump(SWEEP))
        command = [sys.executable, "-m", "simcc", "sweep", str(spec), "--format", "csv", "--jobs", str(jobs)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=USER_ENV)
        elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sweep: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
    return elapsed, len(done.stdout.strip().splitlines()) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = parser.parse_args()
    print(f"{'case':66s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'peak MB':>8s}")
    for name, workload, hardware, sets, extra in CASES:
        if args.only and args.only not in name:
            continue
        runs = [run_once(workload, hardware, sets, extra) for _ in range(args.repeats)]
        times = [seconds for seconds, _ in runs]
        peak = max(megabytes for _, megabytes in runs)
        print(f"{name:66s} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f} {peak:8.0f}", flush=True)
    name = "sweep of 1,000 mixtral configurations, 2 processes"
    if not args.only or args.only in name:
        runs = [sweep_once(2) for _ in range(args.repeats)]
        times = [seconds for seconds, _ in runs]
        wall = statistics.median(times)
        print(f"{name:66s} {wall:9.2f} {min(times):7.2f} {max(times):7.2f}  ({runs[0][1] / wall:.0f} configs/s)", flush=True)


if __name__ == "__main__":
    main()
