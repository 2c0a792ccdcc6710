"""Calibration fits that need no torch: which size axis an efficiency curve is indexed by."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simcc.calibrate.fit import fit_curve
from simcc.costs.compute import efficiency, op_cost
from simcc.model.ops import gemm
from simcc.specs.loader import load_hardware

DEVICE = load_hardware("cpu_host_generic").device
PEAK = DEVICE.peak_tflops.fp32 * 1e12


def _rows(fraction_of) -> pd.DataFrame:
    """GEMMs at two aspect ratios (wide expert, 64-wide router) whose achieved fraction follows
    `fraction_of(op)`; times are what that fraction gives."""
    rows = []
    for tokens in (1, 4, 16, 64, 256, 1024, 4096):
        for n in (2816, 64):
            op = gemm("g", tokens, 1024, n, "fp32")
            rows.append({"family": "gemm", "case": f"gemm_{tokens}x1024x{n}", "dtype": "fp32", "flops": op.flops,
                         "bytes": op.bytes, "kernel_flops": op.flops, "tokens": tokens, "hidden": 1024, "ffn": n,
                         "experts": 0, "k": 0, "median_s": op.flops / (PEAK * fraction_of(op))})
    return pd.DataFrame(rows)


def test_a_fraction_that_follows_intensity_gets_an_intensity_curve():
    by_intensity = lambda op: min(0.9, 0.01 * op.flops / op.bytes)  # noqa: E731
    curve, above = fit_curve(_rows(by_intensity), DEVICE, 0.0)
    assert curve is not None and curve.axis == "intensity" and not above
    calibrated = DEVICE.model_copy(update={"efficiency": DEVICE.efficiency.model_copy(update={"curves": {"gemm": curve}})})
    router = gemm("router", 512, 1024, 64, "fp32")  # a shape the fit never saw
    assert efficiency(calibrated, "gemm", router.flops, router.flops / router.bytes) == pytest.approx(by_intensity(router), rel=0.15)


def test_a_fraction_that_follows_flops_gets_a_flops_curve():
    import math

    by_flops = lambda op: min(0.9, 0.05 * math.log10(op.flops))  # noqa: E731
    curve, _ = fit_curve(_rows(by_flops), DEVICE, 0.0)
    assert curve is not None and curve.axis == "kernel_flops"
    calibrated = DEVICE.model_copy(update={"efficiency": DEVICE.efficiency.model_copy(update={"curves": {"gemm": curve}})})
    op = gemm("g", 512, 1024, 64, "fp32")
    assert op_cost(calibrated, op).seconds == pytest.approx(op.flops / (PEAK * by_flops(op)), rel=0.1)


def test_robust_line_recovers_an_exact_line_and_ignores_a_contended_outlier():
    from simcc.calibrate.fit import robust_line

    sizes = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    exact = 2e-5 + sizes * 1e-9
    a, b = robust_line(sizes, exact)
    assert a == pytest.approx(2e-5) and b == pytest.approx(1e-9)
    noisy = exact.copy()
    noisy[2] *= 100  # one call hit a scheduler tick
    assert robust_line(sizes, noisy) == pytest.approx((a, b))


def test_robust_line_never_puts_the_fixed_cost_above_the_fastest_call():
    """Busy-host copies that all land on 8-16 ms ticks, but the smallest took 3.7 us: least squares
    gives an intercept of milliseconds; the fixed cost may not exceed 3.7 us."""
    from simcc.calibrate.fit import robust_line

    sizes = np.array([256, 2.5e5, 1e6, 4e6, 1.6e7, 6.4e7])
    seconds = np.array([3.7e-6, 8e-3, 16e-3, 8e-3, 12e-3, 16e-3])
    a, b = robust_line(sizes, seconds)
    assert 0 <= a <= 3.7e-6 and b >= 0


def test_flat_small_message_timings_keep_their_latency():
    """<= 64 KB collectives that take the same time whatever the size are latency: the fit must
    not run through the origin (which predicted 4 KB 94% too fast)."""
    from simcc.calibrate.fit import robust_line

    sizes = np.array([4096, 8192, 16384, 32768, 65536])
    seconds = np.array([60e-6, 59e-6, 61e-6, 60e-6, 58e-6])
    a, b = robust_line(sizes, seconds)
    assert a + b * 4096 == pytest.approx(60e-6, rel=0.05)


def test_contended_timings_are_left_out_with_a_notice_per_family():
    """A timing with a wide spread or taken on a host busier than its cores does not enter the fit;
    a family with no quiet timing keeps the base profile's figures, and says so."""
    from pathlib import Path

    from simcc.calibrate.fit import calibrate, contended
    from simcc.calibrate.measurements import read_measurements

    shipped = sorted((Path(__file__).parents[1] / "hardware_profiles/measured").glob("*.kernels.csv"))[0]
    frame = read_measurements(str(shipped))
    frame["p10_s"], frame["p90_s"] = frame["median_s"] * 0.95, frame["median_s"] * 1.05  # quiet timings
    frame["host_load"] = 0.5
    assert not contended(frame).any()
    lstm = frame["family"] == "lstm"
    frame.loc[lstm, "host_load"] = 3.0  # two busy processes beside the profiler
    gemm = frame.index[frame["family"] == "gemm"][:2]
    frame.loc[gemm, "p90_s"] = frame.loc[gemm, "p10_s"] * 3  # scheduler ticks
    assert contended(frame).sum() == lstm.sum() + 2
    report = calibrate(frame, DEVICE, "table")
    notes = " ".join(report.notes)
    assert "lstm" in notes and "could not be measured" in notes and "lstm" not in report.device.efficiency.curves
    assert f"gemm: 2 of {int((frame['family'] == 'gemm').sum())} timings were contended" in notes
    assert "gemm" in report.device.efficiency.curves


def test_a_gemm_that_slows_once_it_spills_the_cache_gets_a_curve_that_falls():
    import math

    # efficiency rises with size up to ~1 GFLOP, then drops by a third (operands leave the cache)
    def rises_then_falls(op):
        x = math.log10(op.flops)
        return 0.3 + 0.05 * min(x, 9) - (0.2 if x > 9.5 else 0.0)

    curve, _ = fit_curve(_rows(rises_then_falls), DEVICE, 0.0)
    assert curve is not None and curve.fraction[-1] < max(curve.fraction) * 0.8  # the fall is kept
    calibrated = DEVICE.model_copy(update={"efficiency": DEVICE.efficiency.model_copy(update={"curves": {"gemm": curve}})})
    big = gemm("g", 4096, 1024, 2816, "fp32")
    assert op_cost(calibrated, big).seconds == pytest.approx(big.flops / (PEAK * rises_then_falls(big)), rel=0.1)


def test_a_backward_gemm_is_two_forward_sized_kernels_with_its_own_family():
    from simcc.model.ops import backward_of

    forward = gemm("g", 256, 1024, 2816, "fp32")
    backward = backward_of(forward)
    assert backward.family == "gemm_backward" and backward.flops == 2 * forward.flops
    assert backward.kernel_flops == forward.flops and backward.launches == 2
    # without a curve of its own it runs on the forward's; with one, on that
    forward_curve = {"gemm": fit_curve(_rows(lambda op: 0.5), DEVICE, 0.0)[0]}
    calibrated = DEVICE.model_copy(update={"efficiency": DEVICE.efficiency.model_copy(update={"curves": forward_curve})})
    assert efficiency(calibrated, "gemm_backward", forward.flops, 1.0) == pytest.approx(0.5, rel=1e-6)
    both = {**forward_curve, "gemm_backward": fit_curve(_rows(lambda op: 0.25), DEVICE, 0.0)[0]}
    calibrated = DEVICE.model_copy(update={"efficiency": DEVICE.efficiency.model_copy(update={"curves": both})})
    assert efficiency(calibrated, "gemm_backward", forward.flops, 1.0) == pytest.approx(0.25, rel=1e-6)


def test_a_family_mostly_contended_is_not_fitted_from_its_few_clean_timings():
    """Under two busy processes nearly every timing is contended: the one that looks clean was taken
    on the same busy host, so the family keeps the base profile's figures, and contended held-out
    timings are marked (calibrate does not score against them)."""
    from pathlib import Path

    from simcc.calibrate.fit import calibrate
    from simcc.calibrate.measurements import read_measurements

    shipped = sorted((Path(__file__).parents[1] / "hardware_profiles/measured").glob("*.kernels.csv"))[0]
    frame = read_measurements(str(shipped))
    frame["p10_s"], frame["p90_s"], frame["host_load"] = frame["median_s"] * 0.95, frame["median_s"] * 1.05, 0.5
    gemm = frame.index[frame["family"] == "gemm"]
    frame.loc[gemm[1:], "host_load"] = 3.0  # all but one GEMM timing contended
    report = calibrate(frame, DEVICE, "table")
    assert "gemm" not in report.device.efficiency.curves and "grouped_gemm" in report.device.efficiency.curves
    assert any(n.startswith("gemm: ") and "could not be measured" in n for n in report.notes)
    marked = report.errors[report.errors["family"] == "gemm"]
    assert marked["contended"].sum() == len(gemm) - 1


def test_mostly_contended_copies_keep_the_base_launch_and_bandwidth_as_the_note_says():
    from pathlib import Path

    from simcc.calibrate.fit import calibrate
    from simcc.calibrate.measurements import read_measurements

    shipped = sorted((Path(__file__).parents[1] / "hardware_profiles/measured").glob("*.kernels.csv"))[0]
    frame = read_measurements(str(shipped))
    frame["p10_s"], frame["p90_s"], frame["host_load"] = frame["median_s"] * 0.95, frame["median_s"] * 1.05, 0.5
    copies = frame.index[frame["family"] == "memcpy"]
    frame.loc[copies[2:], "host_load"] = 3.0  # two clean copies of two sizes, the rest contended
    report = calibrate(frame, DEVICE, "table")
    assert any(n.startswith("memcpy: ") and "could not be measured" in n for n in report.notes)
    efficiency = report.device.efficiency
    assert efficiency.kernel_launch_us == DEVICE.efficiency.kernel_launch_us
    assert efficiency.memory == DEVICE.efficiency.memory and "memcpy" not in efficiency.memory_curves
