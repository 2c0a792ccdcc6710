"""Sweep speed: 1,000 configurations of Mixtral 8x7B training on 64 H100 (parallel layout,
recomputation, ZeRO stage, batch), run by the local process pool and by a local Ray instance.
Prints wall time and configurations per second, the median of several runs, and how many
configurations fit (those that do not are skipped after their memory check, as `simcc sweep`
does).

Usage: python benchmarks/sweep_speed.py [--configs 1000] [--repeats 3] [--jobs N] [--no-ray]
"""

from __future__ import annotations

import argparse

from simulator_speed import _median_run  # the script's folder is on sys.path when run as a script

from simcc.sweep.run import run_local, run_ray, sweep_configs
from simcc.sweep.spec import SweepSpec

SPEC = SweepSpec(
    workload="mixtral_8x7b_train_64xh100",
    hardware=["dgx_h100_x8"],
    axes={
        "parallelism.ep": [1, 2, 4, 8],
        "parallelism.pp": [2, 4, 8],
        "parallelism.vpp": [2, 4],
        "parallelism.micro_batch": [1, 2],
        "parallelism.recompute": ["none", "selective", "full"],
        "parallelism.zero_stage": [1, 2],
        "train.global_batch": [256, 512],
        "parallelism.overlap_grad_reduce": [True, False],
    },
    steps=1,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    configs = sweep_configs(SPEC)[: args.configs]
    print(f"{len(configs)} configurations of {SPEC.workload} on {SPEC.hardware[0]}")
    wall, rows = _median_run(lambda: run_local(configs, args.jobs), args.repeats)
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("ok", "does not fit", "invalid")}
    print(f"  statuses: {statuses}")
    print(f"  local pool : median {wall:6.2f} s  {len(configs) / wall:6.1f} configs/s  ({args.repeats} runs)")
    if not args.no_ray:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False)
        run_ray(configs[:32])  # start the workers before timing
        wall_ray, rows_ray = _median_run(lambda: run_ray(configs), args.repeats)
        ray.shutdown()
        same = "identical to local" if rows_ray == rows else "DIFFERENT from local"
        print(f"  local Ray  : median {wall_ray:6.2f} s  {len(configs) / wall_ray:6.1f} configs/s  ({same})")


if __name__ == "__main__":
    main()
