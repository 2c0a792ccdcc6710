"""Wall time of `estimate` for growing clusters (median of several runs).

Usage: python benchmarks/estimate_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from simcc.estimate import estimate
from simcc.specs.loader import load_hardware, load_workload

CASES = [
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x8", []),
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x128", ["parallelism.pp=8", "parallelism.vpp=4", "train.global_batch=4096"]),
    ("gpt_22b_dense_train_8xa100", "dgx_a100_x1", []),
    ("switch_base_128_train", "dgx_a100_x4", []),
    ("mixtral_8x7b_serve_edge", "jetson_agx_orin", []),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'workload':32s} {'hardware':16s} {'devices':>7s} {'median s':>9s} {'min s':>7s}")
    for workload_name, hardware_name, overrides in CASES:
        workload, source = load_workload(workload_name, overrides)
        system = load_hardware(hardware_name)
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            estimate(workload, system, source)
            walls.append(time.perf_counter() - start)
        print(f"{workload_name:32s} {hardware_name:16s} {system.devices:7d} {statistics.median(walls):9.3f} {min(walls):7.3f}")


if __name__ == "__main__":
    main()
