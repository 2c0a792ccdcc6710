"""Fit kernel measurements into a calibrated device: launch overhead and memory fraction from
plain copies; per compute family an efficiency curve against kernel FLOPs, monotone
non-decreasing (a bigger GEMM never runs less efficiently); per memory-bound family a bandwidth
curve against bytes moved (not monotone: caches). Checked on held-out points."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import pandas as pd

from simcc.calibrate.measurements import predict
from simcc.costs.compute import peak_flops
from simcc.specs.hardware import Device, EfficiencyCurve

CURVE_FAMILIES = ("gemm", "grouped_gemm", "attention", "lstm")
MEMORY_FAMILIES = ("memcpy", "permute", "combine", "gate")
FRACTION_FLOOR = 1e-4


@dataclass(frozen=True)
class FitReport:
    device: Device
    errors: pd.DataFrame  # family, case, held_out, measured_s, predicted_s, error
    notes: list[str]


def held_out_mask(frame: pd.DataFrame) -> pd.Series:
    """Every third interior point of each family (by size) is held out; the ends stay in the fit."""
    mask = pd.Series(False, index=frame.index)
    for _, group in frame.groupby("family"):
        order = group.sort_values(["kernel_flops", "bytes"]).index.tolist()
        for position, index in enumerate(order[1:-1], start=1):
            mask[index] = position % 3 == 1
    return mask


def _pool_adjacent_violators(values: list[float], weights: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (isotonic regression)."""
    blocks = [[v, w, 1] for v, w in zip(values, weights)]
    merged: list[list[float]] = []
    for block in blocks:
        merged.append(block)
        while len(merged) > 1 and merged[-2][0] > merged[-1][0]:
            value2, weight2, count2 = merged.pop()
            value1, weight1, count1 = merged.pop()
            total = weight1 + weight2
            merged.append([(value1 * weight1 + value2 * weight2) / total, total, count1 + count2])
    out: list[float] = []
    for value, _, count in merged:
        out += [value] * int(count)
    return out


def fit_memory(train: pd.DataFrame, device: Device) -> tuple[float, float]:
    """t = launch + bytes / (bandwidth * fraction), least squares over the plain copies."""
    rows = train[train["family"] == "memcpy"]
    if len(rows) < 2:
        return device.efficiency.kernel_launch_us * 1e-6, device.efficiency.memory
    slope, intercept = np.polyfit(rows["bytes"].to_numpy(float), rows["median_s"].to_numpy(float), 1)
    launch = max(0.0, float(intercept))
    fraction = 1.0 / (max(float(slope), 1e-30) * device.memory_bandwidth_gb_s * 1e9)
    return launch, float(min(1.0, max(FRACTION_FLOOR, fraction)))


def fit_curve(rows: pd.DataFrame, device: Device, launch: float) -> tuple[EfficiencyCurve | None, bool]:
    """Achieved fraction of peak per point, then a monotone curve over log10(kernel FLOPs)."""
    if rows.empty:
        return None, False
    points = []
    for _, row in rows.iterrows():
        peak = peak_flops(device, row["dtype"])
        launches = int(row["experts"]) if row["family"] == "grouped_gemm" else 1
        busy = max(float(row["median_s"]) - launch * launches, 0.05 * float(row["median_s"]))
        points.append((float(row["kernel_flops"]), float(row["flops"]) / busy / peak))
    points.sort()
    flops = [p[0] for p in points]
    fitted = _pool_adjacent_violators([p[1] for p in points], [1.0] * len(points))
    above_peak = max(fitted) > 1.0
    knots: dict[float, float] = {}
    for x, y in zip(flops, fitted):
        knots[x] = min(1.0, max(FRACTION_FLOOR, y))
    xs = sorted(knots)
    return EfficiencyCurve(flops=xs, fraction=[knots[x] for x in xs]), above_peak


def fit_memory_curve(rows: pd.DataFrame, device: Device, launch: float, calibrated: Device) -> EfficiencyCurve | None:
    """Per memory-bound family: the fraction of bandwidth its elementwise part reached, against
    bytes moved. A gate's router product is costed with the calibrated GEMM curve first."""
    from simcc.calibrate.measurements import row_ops
    from simcc.costs.compute import op_cost

    if rows.empty:
        return None
    bandwidth = device.memory_bandwidth_gb_s * 1e9
    points = []
    for _, row in rows.iterrows():
        ops = row_ops(row)
        matmul = sum(op_cost(calibrated, op).seconds for op in ops if op.is_matmul)
        moved = sum(op.bytes for op in ops if not op.is_matmul)
        busy = max(float(row["median_s"]) - matmul - launch, 0.05 * float(row["median_s"]))
        points.append((moved, moved / busy / bandwidth))
    # No monotone constraint here: buffers that fit in cache move faster per byte than ones that
    # spill, so bandwidth efficiency may fall with size. Points at equal size are averaged.
    knots: dict[float, list[float]] = {}
    for x, y in points:
        knots.setdefault(x, []).append(min(1.0, max(FRACTION_FLOOR, y)))
    xs = sorted(knots)
    return EfficiencyCurve(flops=xs, fraction=[statistics.fmean(knots[x]) for x in xs])


def calibrate(frame: pd.DataFrame, device: Device, source: str) -> FitReport:
    held = held_out_mask(frame[frame["family"] != "moe_layer"])
    kernels = frame[frame["family"] != "moe_layer"]
    train = kernels[~held.reindex(kernels.index, fill_value=False)]
    launch, memory = fit_memory(train, device)
    curves: dict[str, EfficiencyCurve] = {}
    notes = []
    for family in CURVE_FAMILIES:
        curve, above = fit_curve(train[train["family"] == family], device, launch)
        if curve is not None:
            curves[family] = curve
        if above:
            notes.append(f"{family} ran faster than the base profile's peak: its fraction is capped at 1; "
                         "raise peak_tflops in the base profile")
    efficiency = device.efficiency.model_copy(update={
        "memory": memory, "kernel_launch_us": launch * 1e6, "curves": curves,
        "source": f"calibrated from {source} ({frame['device_name'].iloc[0]}, torch {frame['torch_version'].iloc[0]})",
    })
    calibrated = device.model_copy(update={"efficiency": efficiency, "name": f"{device.name} (calibrated)"})
    memory_curves = {}
    for family in MEMORY_FAMILIES:
        curve = fit_memory_curve(train[train["family"] == family], device, launch, calibrated)
        if curve is not None:
            memory_curves[family] = curve
    efficiency = efficiency.model_copy(update={"memory_curves": memory_curves})
    calibrated = calibrated.model_copy(update={"efficiency": efficiency})
    errors = prediction_errors(kernels, calibrated)
    errors["held_out"] = held.reindex(kernels.index, fill_value=False).to_numpy()
    return FitReport(calibrated, errors, notes)


def prediction_errors(frame: pd.DataFrame, device: Device) -> pd.DataFrame:
    rows = []
    for _, row in frame.iterrows():
        predicted = predict(row, device)
        rows.append({"family": row["family"], "case": row["case"], "measured_s": float(row["median_s"]),
                     "predicted_s": predicted, "error": predicted / float(row["median_s"]) - 1.0})
    return pd.DataFrame(rows, columns=["family", "case", "measured_s", "predicted_s", "error"])


def error_summary(errors: pd.DataFrame) -> pd.DataFrame:
    """Median and worst |error| per family, plus all."""
    rows = []
    for family, group in list(errors.groupby("family")) + [("all", errors)]:
        absolute = group["error"].abs()
        rows.append({"family": family, "points": len(group),
                     "median_abs_error": float(statistics.median(absolute)) if len(group) else float("nan"),
                     "worst_abs_error": float(absolute.max()) if len(group) else float("nan")})
    return pd.DataFrame(rows)


def calibrated_profile_yaml(base_profile, device: Device) -> str:
    """The base profile with its device replaced by the calibrated one, names resolved inline."""
    import yaml

    from simcc.specs.hardware import Cluster, Edge, Node

    if isinstance(base_profile, Device):
        profile = device
    elif isinstance(base_profile, Cluster):
        profile = base_profile.model_copy(update={"node": base_profile.node.model_copy(update={"device": device}),
                                                  "name": f"{base_profile.name} (calibrated)"})
    elif isinstance(base_profile, (Node, Edge)):
        profile = base_profile.model_copy(update={"device": device, "name": f"{base_profile.name} (calibrated)"})
    else:
        raise TypeError(type(base_profile))
    header = "# Written by `simcc calibrate`; efficiency.curves were fitted to measured kernels.\n"
    return header + yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True), sort_keys=False)
