"""Simulator speed: one training step of a 61-layer MoE (256 experts, top-8) on growing clusters,
a 10,000-request serving run on one edge device, and each shipped workload's default estimate.
Prints the median wall time of several runs and simulated events per second (events over the
whole estimate's wall time, plan building included).

Usage: python benchmarks/simulator_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from simcc.estimate import SimulationOptions, estimate
from simcc.specs.loader import load_hardware, load_workload

MICROBATCHES = 16  # per pipeline per step, the same at every scale
TRAINING_SCALES = [  # devices, pp, ep
    (8, 8, 1),
    (64, 8, 8),
    (512, 8, 64),
    (4096, 8, 64),
]


SHIPPED = [
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x8"),
    ("gpt_22b_dense_train_8xa100", "dgx_a100_x1"),
    ("switch_base_128_train", "dgx_a100_x4"),
    ("shazeer_moe_4096h_lstm_train", "k40_x16"),
    ("mixtral_8x7b_serve_edge", "jetson_agx_orin"),
]


def _median_run(run, repeats: int) -> tuple[float, object]:
    walls, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'case':44s} {'median wall s':>13s} {'events':>9s} {'events/s':>10s}")
    for devices, pp, ep in TRAINING_SCALES:
        dp = devices // pp
        workload, source = load_workload("deepseek_v3_shape_train", [
            f"parallelism.pp={pp}", f"parallelism.ep={ep}", f"train.global_batch={dp * MICROBATCHES}"])
        system = load_hardware("dgx_h100_x128", [f"nodes={devices // 8}"])
        wall, result = _median_run(lambda: estimate(workload, system, source, SimulationOptions(steps=1)), args.repeats)
        events = result.step.simulated_events
        label = f"train 61-layer MoE, {devices} GPUs (pp{pp} ep{ep} dp{dp})"
        print(f"{label:44s} {wall:13.3f} {events:9d} {events / wall:10.0f}")

    workload, source = load_workload("mixtral_8x7b_serve_edge", ["serve.arrival_rate=0.002"])
    system = load_hardware("jetson_agx_orin")
    wall, result = _median_run(lambda: estimate(workload, system, source, SimulationOptions(request_count=10_000)),
                               args.repeats)
    label = "serve 10,000 requests, Jetson AGX Orin"
    print(f"{label:44s} {wall:13.3f} {'':>9s} {'':>10s}  ({result.latency.requests_simulated} requests)")

    for workload_name, hardware_name in SHIPPED:
        workload, source = load_workload(workload_name)
        system = load_hardware(hardware_name)
        wall, _ = _median_run(lambda: estimate(workload, system, source), args.repeats)
        print(f"{'estimate ' + workload_name + ' @ ' + hardware_name:44s} {wall:13.3f}")


if __name__ == "__main__":
    main()
