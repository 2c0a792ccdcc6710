"""The published-measurement suite (`simcc validate --suite published`): each case is a shipped
workload on a shipped profile (or a collective on a profile's links), a measured figure from a
paper, simcc's untuned prediction, and which part of the predicted time dominates. Like
Calculon's validation harness: one error per published case, then median and worst."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveFloat, model_validator

from simcc.errors import InputError
from simcc.specs.base import StrictModel

SUITES = {"published": "published_suite.yaml"}


class Case(StrictModel):
    name: str
    source: str  # where the measured figure comes from
    metric: Literal["step_s", "tflops_per_device", "throughput_ratio", "busbw_gb_s", "latency_us"]
    measured: PositiveFloat
    hardware: str
    workload: str | None = None  # estimate cases
    set: list[str] = []
    reference_set: list[str] | None = None  # throughput_ratio: the row the ratio is taken against
    collective: Literal["all_reduce", "all_to_all", "all_gather", "reduce_scatter"] | None = None
    ranks: int | None = Field(default=None, ge=2)
    bytes: PositiveFloat | None = None

    @model_validator(mode="after")
    def _kind(self) -> "Case":
        collective_metric = self.metric in ("busbw_gb_s", "latency_us")
        if collective_metric and (self.collective is None or self.ranks is None or self.bytes is None):
            raise ValueError(f"{self.metric} cases need collective, ranks and bytes")
        if not collective_metric and self.workload is None:
            raise ValueError(f"{self.metric} cases need a workload")
        if (self.metric == "throughput_ratio") != (self.reference_set is not None):
            raise ValueError("reference_set goes with metric throughput_ratio, and only with it")
        return self


class Suite(StrictModel):
    suite: str
    cases: list[Case] = Field(min_length=1)


def suite_path(name: str) -> Path:
    from simcc.specs.loader import shipped_workload_dir

    if name not in SUITES:
        raise InputError("--suite", name, f"unknown suite; expected one of {', '.join(SUITES)}")
    return shipped_workload_dir() / "validation" / SUITES[name]


def load_suite(name: str) -> Suite:
    from simcc.specs.loader import read_yaml, validate

    path = suite_path(name)
    return validate(Suite, read_yaml(path), str(path))


def _estimate(workload: str, hardware: str, overrides: list[str], steps: int):
    from simcc.estimate import SimulationOptions, estimate
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_sets, hardware_sets = split_overrides(overrides)
    spec, source = load_workload(workload, workload_sets)
    return estimate(spec, load_hardware(hardware, hardware_sets), source, SimulationOptions(steps=steps))


def _dominant(result) -> str:
    from simcc.report.summary import BREAKDOWN

    step = result.sections["step"]
    part = max(BREAKDOWN, key=lambda key: step[key])
    return f"{part.removesuffix('_s')} {step[part] / step['step_s']:.0%}"


def _collective(case: Case) -> tuple[float, str]:
    from simcc.costs.collectives import bus_bandwidth, collective_time, latency_floor
    from simcc.layout import CommGroup
    from simcc.specs.loader import load_hardware

    system = load_hardware(case.hardware)
    assert case.ranks is not None and case.bytes is not None and case.collective is not None
    group = CommGroup(case.ranks, min(case.ranks, system.devices_per_node))
    seconds = collective_time(case.collective, case.bytes, group, system)
    latency = latency_floor(case.collective, group, system)
    regime = f"latency {latency / seconds:.0%}" if latency > 0.5 * seconds else f"bandwidth {1 - latency / seconds:.0%}"
    if case.metric == "latency_us":
        return seconds * 1e6, regime
    return bus_bandwidth(case.collective, case.bytes, seconds, case.ranks) / 1e9, regime


def run_case(case: Case, steps: int = 1) -> dict[str, Any]:
    """Predicted value, signed error and the dominant part for one case."""
    memory = ""  # a run that was measured fitted: the memory model should agree
    if case.metric in ("busbw_gb_s", "latency_us"):
        predicted, dominant = _collective(case)
    else:
        assert case.workload is not None
        result = _estimate(case.workload, case.hardware, case.set, steps)
        dominant = _dominant(result)
        mem = result.sections["memory"]
        memory = f"{mem['total_gb']:.1f}/{mem['capacity_gb']:.0f} GB" + ("" if mem["fits"] else " OVER")
        if case.metric == "step_s":
            predicted = result.sections["step"]["step_s"]
        elif case.metric == "tflops_per_device":
            predicted = result.sections["throughput"]["model_tflops_per_device"]
        else:
            reference = _estimate(case.workload, case.hardware, case.reference_set or [], steps)
            predicted = result.sections["throughput"]["tokens_per_s"] / reference.sections["throughput"]["tokens_per_s"]
    return {"case": case.name, "metric": case.metric, "measured": case.measured, "predicted": predicted,
            "error": predicted / case.measured - 1.0, "dominant": dominant, "memory": memory, "source": case.source}


def run_suite(suite: Suite, steps: int = 1) -> list[dict[str, Any]]:
    return [run_case(case, steps) for case in suite.cases]


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    errors = [abs(r["error"]) for r in rows]
    return {"cases": len(rows), "median_abs_error": statistics.median(errors), "worst_abs_error": max(errors),
            "within_10pct": sum(e <= 0.10 for e in errors), "within_25pct": sum(e <= 0.25 for e in errors)}
