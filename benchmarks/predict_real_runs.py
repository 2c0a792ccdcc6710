"""Predict the real runs of `benchmarks/real_runs.py` from a calibrated profile and print predicted
vs measured: the check that a calibration holds at shapes and process counts it never saw.

    python benchmarks/real_runs.py --out runs.csv
    simcc profile --processes 2 --out kernels.csv && simcc profile comm --ranks 2 --out comm.csv
    simcc calibrate kernels.csv comm.csv --base cpu_host_local --out my.yaml
    python benchmarks/predict_real_runs.py runs.csv --hardware my.yaml

Each layer row becomes a one-block workload (an `moe_ffn` of the row's shape, top-k, dropless, the
row's dtype) costed with `simcc estimate --layer 0` (forward, or both passes) on one process with
the row's threads. Each EP training row becomes the model it timed: `layers` x (causal attention,
MoE layer) with experts split over EP = 2 ranks that are also DP = 2 replicas of the dense weights,
fp32, torch's unfused Adam, no clipping, simulated as one training step on the node with one
thread per process (as the run pins them).
"""

from __future__ import annotations

import argparse
import statistics

import pandas as pd

from simcc.costs.compute import op_cost
from simcc.estimate import SimulationOptions, estimate, estimate_layer
from simcc.model.ops import gemm
from simcc.specs.hardware import Node, device_of, system_from
from simcc.specs.loader import load_profile_model, validate
from simcc.specs.workload import Workload

PASSES = {"moe_layer_forward": "forward", "moe_layer_fwd_bwd": "both"}


def _moe_block(row: pd.Series) -> dict:
    return {"moe_ffn": {
        "experts": int(row["experts"]), "k": int(row["k"]), "expert_hidden": int(row["expert_hidden"]),
        "gated": bool(row["gated"]), "activation": str(row["activation"]),
        "gating": {"policy": "topk"}, "routing": {"dropless": True, "dropless_block": 1}}}


def _precision(row: pd.Series) -> dict:
    dtype = str(row["dtype"])
    return {"weights": dtype, "compute": dtype, "gradients": dtype, "communication": dtype, "router": "fp32"}


def layer_workload(row: pd.Series) -> Workload:
    """The measured layer as simcc describes it."""
    data = {
        "name": f"real-{row['run_id']}", "mode": "train",
        "model": {"name": "real MoE layer", "hidden": int(row["hidden"]), "blocks": [_moe_block(row)]},
        "parallelism": {"micro_batch": 1},
        "precision": _precision(row),
        "train": {"seq_len": int(row["tokens"]), "global_batch": 1},
    }
    return validate(Workload, data, f"run {row['run_id']}")


def train_workload(row: pd.Series) -> Workload:
    """The measured EP training step: every rank its own batch (DP = EP = processes)."""
    ranks = int(row["processes"])
    layer = [{"attention": {"heads": int(row["heads"]), "head_dim": int(row["head_dim"]), "causal": True}}, _moe_block(row)]
    data = {
        "name": f"real-{row['run_id']}", "mode": "train",
        "model": {"name": "real attention + MoE model", "hidden": int(row["hidden"]),
                  "blocks": [{"repeat": int(row["layers"]), "blocks": layer}]},
        "parallelism": {"micro_batch": int(row["batch"]), "ep": int(row["ep"])},
        "precision": _precision(row),
        "optimizer": {"type": "adam", "master_weights": False, "clip_grad_norm": False, "implementation": "unfused"},
        "train": {"seq_len": int(row["seq"]), "global_batch": int(row["batch"]) * ranks},
    }
    return validate(Workload, data, f"run {row['run_id']}")


def predict_row(row: pd.Series, profile, source: str) -> tuple[str, float]:
    """(what was predicted, seconds) for one measured row."""
    threads = int(row["threads"])
    if row["kind"] in (*PASSES, "reference_gemm"):  # one process alone on the host, with the row's threads
        device = device_of(profile)
        if device.threads is not None:  # alone on a host whose cores it all uses: the row's threads
            device = device.model_copy(update={"cores": threads})
        system = system_from(device, source)
        if row["kind"] == "reference_gemm":
            op = gemm("reference", int(row["tokens"]), int(row["hidden"]), int(row["expert_hidden"]), str(row["dtype"]))
            return "gemm", op_cost(system.device, op).seconds
        workload = layer_workload(row)
        layer = estimate_layer(workload, system, workload.name, 0, PASSES[str(row["kind"])]).layer
        assert layer is not None
        return PASSES[str(row["kind"])], layer.seconds
    if not isinstance(profile, Node):
        raise SystemExit(f"{source}: the training rows need a node profile (e.g. calibrated from cpu_host_local)")
    node = profile.model_copy(update={"devices_per_node": int(row["processes"]), "threads_per_device": threads})
    workload = train_workload(row)
    result = estimate(workload, system_from(node, source), workload.name, SimulationOptions(steps=1))
    return "step", result.step.step_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("--hardware", required=True, help="a calibrated node profile (cpu_host_local base)")
    args = parser.parse_args()
    profile, source = load_profile_model(args.hardware)
    runs = pd.read_csv(args.runs)
    errors, drifts = [], []
    print(f"{'run':70s} {'pass':8s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>8s}")
    for _, row in runs.iterrows():
        what, predicted = predict_row(row, profile, source)
        measured = float(row["measured_median_s"])
        error = predicted / measured - 1.0
        print(f"{row['run_id']:70s} {what:8s} {measured * 1e3:12.3f} {predicted * 1e3:13.3f} {error * 100:+7.1f}%")
        (drifts if row["kind"] == "reference_gemm" else errors).append(error)
    if errors:
        print(f"{len(errors)} runs: median |error| {statistics.median(map(abs, errors)):.1%}, "
              f"worst {max(map(abs, errors)):.1%}")
    if drifts:
        # The profiler's own GEMM, re-timed beside the runs: how much faster (+) or slower the host
        # ran than when it was profiled. Shown, never applied to the figures above.
        drift = statistics.median(drifts)
        print(f"host drift: the profiler's reference GEMM ran {drift:+.1%} against the calibrated profile's "
              f"prediction of it (positive: the host is faster now than when profiled)")


if __name__ == "__main__":
    main()
