"""Predict the real MoE-layer runs of `benchmarks/real_runs.py` from a calibrated profile and print
predicted vs measured: the check that a calibration holds at shapes it never saw.

    python benchmarks/real_runs.py --only layer --out runs.csv
    simcc profile --out kernels.csv && simcc calibrate kernels.csv --base cpu_host_generic --out my.yaml
    python benchmarks/predict_real_runs.py runs.csv --hardware my.yaml

Each layer row becomes a one-block workload (an `moe_ffn` of the row's shape, top-k, dropless,
the row's dtype) whose block is costed with `simcc estimate --layer 0` (forward, or both passes).
The 2-process training-step rows are not predicted here yet.
"""

from __future__ import annotations

import argparse
import statistics

import pandas as pd

from simcc.estimate import estimate_layer
from simcc.specs.loader import load_hardware, validate
from simcc.specs.workload import Workload

PASSES = {"moe_layer_forward": "forward", "moe_layer_fwd_bwd": "both"}


def layer_workload(row: pd.Series) -> Workload:
    """The measured layer as simcc describes it."""
    dtype = str(row["dtype"])
    data = {
        "name": f"real-{row['run_id']}", "mode": "train",
        "model": {"name": "real MoE layer", "hidden": int(row["hidden"]), "blocks": [{"moe_ffn": {
            "experts": int(row["experts"]), "k": int(row["k"]), "expert_hidden": int(row["expert_hidden"]),
            "gated": bool(row["gated"]), "activation": str(row["activation"]),
            "gating": {"policy": "topk"}, "routing": {"dropless": True, "dropless_block": 1}}}]},
        "parallelism": {"micro_batch": 1},
        "precision": {"weights": dtype, "compute": dtype, "gradients": dtype, "communication": dtype,
                      "router": dtype},
        "train": {"seq_len": int(row["tokens"]), "global_batch": 1},
    }
    return validate(Workload, data, f"run {row['run_id']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("--hardware", required=True)
    args = parser.parse_args()
    system = load_hardware(args.hardware)
    runs = pd.read_csv(args.runs)
    errors = []
    print(f"{'run':28s} {'pass':8s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>8s}")
    for _, row in runs[runs["kind"].isin(list(PASSES))].iterrows():
        workload = layer_workload(row)
        predicted = estimate_layer(workload, system, workload.name, 0, PASSES[row["kind"]]).layer
        assert predicted is not None
        measured = float(row["measured_median_s"])
        error = predicted.seconds / measured - 1.0
        errors.append(abs(error))
        print(f"{row['run_id']:28s} {PASSES[row['kind']]:8s} {measured * 1e3:12.3f} {predicted.seconds * 1e3:13.3f} "
              f"{error * 100:+7.1f}%")
    if errors:
        print(f"{len(errors)} runs: median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%}")


if __name__ == "__main__":
    main()
