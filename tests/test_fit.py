"""Calibration fits that need no torch: which size axis an efficiency curve is indexed by."""

from __future__ import annotations

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
            rows.append({"family": "gemm", "dtype": "fp32", "flops": op.flops, "bytes": op.bytes,
                         "kernel_flops": op.flops, "experts": 0, "median_s": op.flops / (PEAK * fraction_of(op))})
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
