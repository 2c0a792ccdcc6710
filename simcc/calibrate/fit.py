"""Fit kernel measurements into a calibrated device: launch overhead and memory fraction from
plain copies; per compute family an efficiency curve against kernel FLOPs or intensity, monotone
non-decreasing unless leaving points out says the measurements are not (a CPU GEMM that spills
its cache); per memory-bound family a bandwidth curve against bytes moved (not monotone: caches).
Checked on held-out points."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import pandas as pd

from simcc.calibrate.measurements import predict, row_ops
from simcc.costs.compute import peak_flops
from simcc.isotonic import isotonic
from simcc.specs.hardware import Device, EfficiencyCurve

CURVE_FAMILIES = ("gemm", "gemm_backward", "grouped_gemm", "grouped_gemm_backward", "attention", "lstm", "moefication")
MEMORY_FAMILIES = ("memcpy", "permute", "combine", "gate", "optimizer", "optimizer_unfused")
FRACTION_FLOOR = 1e-4


@dataclass(frozen=True)
class FitReport:
    device: Device
    errors: pd.DataFrame  # family, case, measured_s, predicted_s, error, held_out, contended
    notes: list[str]


def held_out_mask(frame: pd.DataFrame) -> pd.Series:
    """Every third interior point of each family (by size) is held out; the ends stay in the fit.
    Collectives are a family per rank count: sorted together, equal sizes at several rank counts
    would put every held-out point on the same rank count and leave it without a fit."""
    mask = pd.Series(False, index=frame.index)
    keys = ["family", "ranks"] if "ranks" in frame.columns else ["family"]
    for _, group in frame.groupby(keys):
        order = group.sort_values(["kernel_flops", "bytes"]).index.tolist()
        for position, index in enumerate(order[1:-1], start=1):
            mask[index] = position % 3 == 1
    return mask


def robust_line(sizes: np.ndarray, seconds: np.ndarray) -> tuple[float, float]:
    """t = a + b * size with the least sum of RELATIVE absolute errors, a in [0, the fastest
    measured time] and b >= 0.

    Relative, because times span orders of magnitude and an ordinary least-squares line is pulled
    by the largest; absolute deviations, because a busy host adds scheduler-tick outliers that a
    median-like fit ignores; the bound on `a`, because a fixed cost cannot exceed the fastest call
    measured (an intercept fitted through contended copies once came out at 11 ms where the
    smallest copy took 3.7 us). The optimum of this linear program lies on a line through two
    points or one point and a bound, so those candidates are searched exhaustively (n is small)."""
    sizes, seconds = np.asarray(sizes, float), np.asarray(seconds, float)
    ceiling = float(seconds.min())
    candidates: list[tuple[float, float]] = [(float(np.median(seconds)), 0.0), (ceiling, 0.0)]
    for i in range(len(sizes)):
        if sizes[i] > 0:
            candidates.append((0.0, seconds[i] / sizes[i]))  # through the origin and point i
            candidates.append((ceiling, max(0.0, (seconds[i] - ceiling) / sizes[i])))
        for j in range(i + 1, len(sizes)):
            if sizes[j] != sizes[i]:
                b = (seconds[j] - seconds[i]) / (sizes[j] - sizes[i])
                candidates.append((seconds[i] - b * sizes[i], b))

    def cost(line: tuple[float, float]) -> float:
        a, b = min(max(line[0], 0.0), ceiling), max(line[1], 0.0)
        return float(np.sum(np.abs(a + b * sizes - seconds) / seconds))

    a, b = min(candidates, key=cost)
    return min(max(float(a), 0.0), ceiling), max(float(b), 0.0)


def fit_memory(train: pd.DataFrame, device: Device) -> tuple[float, float]:
    """t = launch + bytes / (bandwidth * fraction) over the plain copies (a robust line); copies of
    fewer than two sizes cannot separate launch from bandwidth, so the base profile's stay."""
    rows = train[train["family"] == "memcpy"]
    if rows["bytes"].nunique() < 2:
        return device.efficiency.kernel_launch_us * 1e-6, device.efficiency.memory
    launch, slope = robust_line(rows["bytes"].to_numpy(float), rows["median_s"].to_numpy(float))
    fraction = 1.0 / (max(slope, 1e-30) * device.memory_bandwidth_gb_s * 1e9)
    return launch, float(min(1.0, max(FRACTION_FLOOR, fraction)))


def _curve(points: list[tuple[float, float]], axis: str, monotone: bool = True) -> EfficiencyCurve:
    """(size, fraction) points as a curve: an isotonic (non-decreasing) fit, or the points as they
    are (averaged where several share a size)."""
    points = sorted(points)
    fitted = isotonic([p[1] for p in points], [1.0] * len(points)) if monotone else [p[1] for p in points]
    knots: dict[float, list[float]] = {}
    for (x, _), y in zip(points, fitted):
        knots.setdefault(x, []).append(min(1.0, max(FRACTION_FLOOR, y)))
    xs = sorted(knots)
    return EfficiencyCurve(axis=axis, size=xs, fraction=[statistics.fmean(knots[x]) for x in xs])


def _leave_one_out_error(points: list[tuple[float, float]], axis: str, monotone: bool) -> float:
    """Median relative time error predicting each training point from a curve fitted without it."""
    from simcc.costs.compute import on_curve

    errors = []
    for index, (x, fraction) in enumerate(points):
        rest = points[:index] + points[index + 1:]
        if rest:
            errors.append(abs(fraction / on_curve(_curve(rest, axis, monotone), x) - 1.0))
    return statistics.median(errors) if errors else 0.0


def fit_curve(rows: pd.DataFrame, device: Device, launch: float) -> tuple[EfficiencyCurve | None, bool]:
    """Achieved fraction of peak per point, then a curve over whichever size axis (one kernel's
    FLOPs, or FLOPs per byte) and shape (monotone, or following the points) predicts the training
    points better when each is left out: large GEMMs on a GPU are limited by how many tiles fill
    the chip (FLOPs, rising), skinny ones on a CPU by streaming their weights (intensity), and a
    CPU GEMM whose operands leave the cache runs slower than a smaller one (not monotone)."""
    if rows.empty:
        return None, False
    fractions, by_axis = [], {"kernel_flops": [], "intensity": []}
    for _, row in rows.iterrows():
        peak = peak_flops(device, row["dtype"])
        launches = sum(op.launches for op in row_ops(row) if op.is_matmul)  # a grouped GEMM: one per expert
        busy = max(float(row["median_s"]) - launch * launches, 0.05 * float(row["median_s"]))
        fraction = float(row["flops"]) / busy / peak
        fractions.append(fraction)
        by_axis["kernel_flops"].append((float(row["kernel_flops"]), fraction))
        by_axis["intensity"].append((float(row["flops"]) / float(row["bytes"]), fraction))
    # Ties go to the simpler story: FLOPs before intensity, monotone before free.
    choices = [(axis, monotone) for axis in by_axis for monotone in (True, False)]
    axis, monotone = min(choices, key=lambda c: (_leave_one_out_error(by_axis[c[0]], *c), c[0] != "kernel_flops", not c[1]))
    return _curve(by_axis[axis], axis, monotone), max(fractions) > 1.0


def fit_memory_curve(rows: pd.DataFrame, device: Device, launch: float, calibrated: Device) -> EfficiencyCurve | None:
    """Per memory-bound family: the fraction of bandwidth its elementwise part reached, against
    bytes moved. A gate's router product is costed with the calibrated GEMM curve first."""
    from simcc.costs.compute import op_cost

    if rows.empty:
        return None
    bandwidth = device.memory_bandwidth_gb_s * 1e9
    points = []
    for _, row in rows.iterrows():
        ops = row_ops(row)
        matmul = sum(op_cost(calibrated, op).seconds for op in ops if op.is_matmul)
        moved = sum(op.bytes for op in ops if not op.is_matmul)
        launches = sum(op.launches for op in ops if not op.is_matmul)  # an unfused optimizer: one per pass per tensor
        busy = max(float(row["median_s"]) - matmul - launch * launches, 0.05 * float(row["median_s"]))
        points.append((moved, moved / busy / bandwidth))
    # No monotone constraint here: buffers that fit in cache move faster per byte than ones that
    # spill, so bandwidth efficiency may fall with size. Points at equal size are averaged.
    return _curve(points, "bytes", monotone=False)


# Load average per core above which other work competed: the profiler's own threads bring a host
# to about 1 per core, two competing busy processes on two cores to about 2.
BUSY_HOST_LOAD = 1.5
WORST_KEPT_HELD_OUT = 1.0  # a family's curve that misses its held-out points by more (median) is not kept


def contended(frame: pd.DataFrame) -> pd.Series:
    """Timings taken while other work competed: a wide spread between their 10th and 90th
    percentile, or a host whose load exceeded its cores."""
    from simcc.profile.kernels import HOST_LOAD_COLUMN, NOISY_SPREAD

    spread = frame["p90_s"] > NOISY_SPREAD * frame["p10_s"]
    busy = frame[HOST_LOAD_COLUMN] > BUSY_HOST_LOAD if HOST_LOAD_COLUMN in frame.columns else False
    return spread | busy


# A family most of whose training timings were contended could not be measured: the few that
# look clean were taken on the same busy host, so the base profile's figures are kept.
MIN_CLEAN_SHARE = 0.5


def _contention_notes(frame: pd.DataFrame, noisy: pd.Series, unfitted: set[str]) -> list[str]:
    """One line per family with contended timings: what was left out, and whether the family
    could be measured at all (most of its training timings contended: it could not)."""
    notes = []
    for family, group in frame[noisy].groupby("family"):
        total = int((frame["family"] == family).sum())
        outcome = ("it could not be measured: the base profile's figures are kept" if family in unfitted
                   else "they are left out of the fit and of the error summary")
        notes.append(f"{family}: {len(group)} of {total} timings were contended (p90 over 1.5x p10, or a host "
                     f"busier than its cores); {outcome}; profile again on a quiet machine")
    return notes


def calibrate(frame: pd.DataFrame, device: Device, source: str) -> FitReport:
    """Fit the uncontended training points; report every point's error, held-out and contended
    ones marked; a family most of whose training timings were contended, or whose fit misses its
    own held-out points by more than 100% (median), keeps the base profile's figures."""
    kernels = frame[frame["family"] != "moe_layer"]
    held = held_out_mask(kernels)
    noisy = contended(kernels)
    train = kernels[~held & ~noisy]
    clean, planned = train["family"].value_counts(), kernels[~held]["family"].value_counts()
    unfitted = {f for f, n in planned.items() if clean.get(f, 0) < max(1.0, MIN_CLEAN_SHARE * n)}
    train = train[~train["family"].isin(unfitted)]
    calibrated, notes = _fit_device(train, device, source, frame)

    def scored(device_now: Device) -> pd.DataFrame:
        errors = prediction_errors(kernels, device_now)
        errors["held_out"] = held.to_numpy()
        errors["contended"] = noisy.to_numpy()
        return errors

    errors = scored(calibrated)
    clean_held = errors[errors["held_out"] & ~errors["contended"]]
    failed = [family for family, group in clean_held.groupby("family")
              if group["error"].abs().median() > WORST_KEPT_HELD_OUT and family in calibrated.efficiency.curves]
    if failed:
        curves = {f: c for f, c in calibrated.efficiency.curves.items() if f not in failed}
        calibrated = calibrated.model_copy(update={"efficiency": calibrated.efficiency.model_copy(update={"curves": curves})})
        errors = scored(calibrated)
        notes += [f"{family}: the fitted curve missed its held-out points by more than 100%; the base profile's "
                  "efficiency is kept" for family in failed]
    return FitReport(calibrated, errors, _contention_notes(kernels, noisy, unfitted) + notes)


def _fit_device(train: pd.DataFrame, device: Device, source: str, frame: pd.DataFrame) -> tuple[Device, list[str]]:
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
    calibrated = device.model_copy(update={"efficiency": efficiency, "name": f"{device.name} (calibrated)",
                                           **measured_threads(frame)})
    memory_curves = {}
    for family in MEMORY_FAMILIES:
        curve = fit_memory_curve(train[train["family"] == family], device, launch, calibrated)
        if curve is not None:
            memory_curves[family] = curve
    efficiency = efficiency.model_copy(update={"memory_curves": memory_curves})
    return calibrated.model_copy(update={"efficiency": efficiency}), notes


def measured_threads(frame: pd.DataFrame) -> dict[str, int]:
    """A CPU profile's threads per process and host cores, so that an estimate of several processes
    on the host scales each one's share (specs.hardware.threads_share); nothing for a GPU."""
    from simcc.profile.kernels import HOST_CORES_COLUMN

    if str(frame["device_type"].iloc[0]) != "cpu":
        return {}
    threads = int(frame["threads"].max())
    cores = int(frame[HOST_CORES_COLUMN].max()) if HOST_CORES_COLUMN in frame.columns else 0
    return {"threads": threads, "cores": max(cores, threads)}


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


def calibrated_profile(base_profile, device: Device, fits: list | None = None):
    """The base profile with its device (and, given collective fits, its intra-node link) replaced."""
    from simcc.specs.hardware import Cluster, Edge, Node

    def node_with(node: Node) -> Node:
        update: dict = {"device": device}
        if fits is not None and node.intra_link is not None:
            update["intra_link"] = node.intra_link.model_copy(update={"fits": fits})
        return node.model_copy(update=update)

    if isinstance(base_profile, Device):
        return device
    if isinstance(base_profile, Cluster):
        return base_profile.model_copy(update={"node": node_with(base_profile.node), "name": f"{base_profile.name} (calibrated)"})
    if isinstance(base_profile, Node):
        return node_with(base_profile).model_copy(update={"name": f"{base_profile.name} (calibrated)"})
    if isinstance(base_profile, Edge):
        return base_profile.model_copy(update={"device": device, "name": f"{base_profile.name} (calibrated)"})
    raise TypeError(type(base_profile))


def profile_yaml(profile) -> str:
    import yaml

    header = "# Written by `simcc calibrate`: efficiency curves and collective fits come from measurements.\n"
    return header + yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True), sort_keys=False)


# ---------------------------------------------------------------- collectives

# Protocol regimes: NCCL moves from LL to LL128 to Simple as messages grow, so one latency-bandwidth
# line fits poorly across sizes (NCCL documentation, NCCL_PROTO; nccl-tests small-message figures); a line per range does.
# Within Simple the fixed part keeps growing with the message up to ~16 MB (more channels, larger
# pipeline chunks): 8x A100 all-reduces take 155, 275, 411 and 675 us at 8, 16, 32 and 64 MiB
# (Vidur's DGX A100 sweep, microsoft/vidur data/profiling/network/a100_dgx/all_reduce.csv), a
# 4-64 MiB line through them would give ~170 GB/s bus bandwidth at 1 GiB where nccl-tests reach
# ~230; a range from 16 MiB keeps the large-message slope.
SIZE_BREAKPOINTS = (64 << 10, 4 << 20, 16 << 20)
MIN_SECONDS_PER_BYTE = 1e-15  # 1,000,000 GB/s: a fit this fast is a latency-only regime


def fit_collectives(train: pd.DataFrame):
    """Piecewise latency-bandwidth fits per collective and rank count, one per size range."""
    from simcc.specs.hardware import CollectiveFit

    fits = []
    for (collective, ranks), rows in train.groupby(["collective", "ranks"]):
        rows = rows.sort_values("bytes")
        edges = [0.0, *SIZE_BREAKPOINTS, float("inf")]
        for low, high in zip(edges, edges[1:]):
            part = rows[(rows["bytes"] > low) & (rows["bytes"] <= high)]
            if part.empty:
                continue
            a, b = robust_line(part["bytes"].to_numpy(float), part["median_s"].to_numpy(float))
            b = max(b, MIN_SECONDS_PER_BYTE)  # flat small-message timings: latency-bound, bandwidth unbounded
            top = high if np.isfinite(high) else float(rows["bytes"].max()) * 4
            fits.append(CollectiveFit(collective=collective, ranks=int(ranks), max_bytes=top,
                                      latency_us=a * 1e6, bandwidth_gb_s=1.0 / b / 1e9))
    return fits


def collective_errors(frame: pd.DataFrame, system) -> pd.DataFrame:
    from simcc.costs.collectives import collective_time
    from simcc.layout import CommGroup

    rows = []
    for _, row in frame.iterrows():
        group = CommGroup(int(row["ranks"]), int(row["ranks_per_node"]))
        predicted = collective_time(str(row["collective"]), float(row["bytes"]), group, system)
        rows.append({"family": row["collective"], "case": f"{row['collective']}_{int(row['bytes'])}B_x{int(row['ranks'])}",
                     "measured_s": float(row["median_s"]), "predicted_s": predicted,
                     "error": predicted / float(row["median_s"]) - 1.0})
    return pd.DataFrame(rows, columns=["family", "case", "measured_s", "predicted_s", "error"])


def comm_held_out(frame: pd.DataFrame) -> pd.Series:
    return held_out_mask(frame.rename(columns={"collective": "family"}).assign(kernel_flops=frame["bytes"]))
