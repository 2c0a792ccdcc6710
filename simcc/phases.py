"""Whole-run planning for SSD (Zhang et al. 2024): a run alternates dense and sparse phases, and
costs Σ dense steps·t_dense + Σ sparse steps·t_sparse + switches·t_convert (Zhang et al., ICML 2024, arXiv 2410.03440).
Step times come from the simulator (one estimate per distinct phase model); switch times from the
MoEfication work costed on the device. Nothing here re-derives an op or a step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from simcc.costs.compute import op_cost
from simcc.costs.memory import optimizer_state_bytes
from simcc.errors import InputError
from simcc.layout import Layout
from simcc.model.blocks import ffn_params
from simcc.model.moefication import clustering_op, dense_ffn_layers, moefied_model, permutation_op
from simcc.model.ops import DTYPE_BYTES
from simcc.costs.money import SECONDS_PER_DAY, SECONDS_PER_HOUR, run_totals
from simcc.specs.hardware import System
from simcc.results import PhaseRow, ScheduleSection
from simcc.specs.workload import Schedule, Workload

RELATIVE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Phase:
    mode: str  # dense | sparse
    tokens: float
    experts: int | None = None
    k: int | None = None

    @property
    def shape(self) -> tuple[int, int] | None:
        return (self.experts, self.k) if self.mode == "sparse" else None  # type: ignore[return-value]


@dataclass(frozen=True)
class PhaseStep:
    """What one step of a phase's model costs, from its own estimate."""

    step_s: float
    busy_fraction: float  # compute share of the step, for the power model
    memory_gb: float
    fits: bool


def schedule_field(workload: Workload, name: str) -> str:
    """Where a named schedule sits in the workload file, for error messages."""
    return "schedule" if workload.schedule is not None else f"schedules.{name}"


def expand(schedule: Schedule, total_tokens: float | None, tokens_per_step: float, source: str, field: str) -> list[Phase]:
    """The schedule's phases in order, each with its tokens; a rule fills train.total_tokens."""
    if schedule.phases is not None:
        phases = [Phase(p.mode, p.tokens if p.tokens is not None else p.steps * tokens_per_step,  # type: ignore[operator]
                        p.experts or schedule.experts if p.mode == "sparse" else None,
                        p.k or schedule.k if p.mode == "sparse" else None) for p in schedule.phases]
        planned = sum(p.tokens for p in phases)
        if total_tokens and abs(planned - total_tokens) > RELATIVE_TOLERANCE * total_tokens:
            raise InputError(source, f"{field}.phases",
                             f"phases train {planned:.4g} tokens but train.total_tokens is {total_tokens:.4g}")
        return phases
    rule = schedule.rule
    assert rule is not None
    if not total_tokens:
        raise InputError(source, "train.total_tokens", f"{field}.rule fills a run: give the run's total tokens")
    middle = total_tokens - rule.warmup_tokens - rule.final_dense_tokens
    if middle <= 0:
        raise InputError(source, f"{field}.rule", "warm-up and final dense tokens exceed train.total_tokens")
    phases = [Phase("dense", rule.warmup_tokens)]
    while middle > RELATIVE_TOLERANCE * total_tokens:
        sparse = min(rule.sparse_tokens, middle)
        phases.append(Phase("sparse", sparse, schedule.experts, schedule.k))
        middle -= sparse
        if middle > RELATIVE_TOLERANCE * total_tokens:
            dense = min(rule.dense_tokens, middle)
            phases.append(Phase("dense", dense))
            middle -= dense
    if phases[-1].mode == "dense":  # training ends dense: merge the last gap into the final phase
        phases[-1] = Phase("dense", phases[-1].tokens + rule.final_dense_tokens)
    else:
        phases.append(Phase("dense", rule.final_dense_tokens))
    return phases


def sparse_workload(workload: Workload, phase: Phase, schedule: Schedule, source: str, field: str) -> Workload:
    assert phase.experts is not None and phase.k is not None
    model = moefied_model(workload.model, phase.experts, phase.k, schedule.load, source, f"{field}.experts")
    return workload.model_copy(update={"model": model, "schedule": None, "schedules": None})


def switch_seconds(workload: Workload, system: System, layout: Layout, schedule: Schedule,
                   experts: int | None) -> float:
    """One switch on the busiest pipeline stage, which converts its own FFN layers: to sparse,
    the balanced k-means of each layer (experts given) and the permutation of its weights,
    gradients and optimizer state; back to dense, that permutation alone (experts None)."""
    layers = dense_ffn_layers(workload.model)
    per_stage = math.ceil(len(layers) / layout.pp)
    hidden, precision = workload.model.hidden, workload.precision
    per_param = DTYPE_BYTES[precision.weights] + DTYPE_BYTES[precision.gradients]
    seconds = []
    for ffn in layers:
        params = ffn_params(hidden, ffn.hidden, ffn.gated)
        dense_local, _ = layout.local_params(params)
        state = dense_local * per_param + optimizer_state_bytes(params, workload, layout)
        layer = op_cost(system.device, permutation_op("moefication.permute", state)).seconds
        if experts is not None:
            layer += op_cost(system.device, clustering_op(hidden, ffn, experts, schedule.conversion_iterations)).seconds
        seconds.append(layer)
    return sum(sorted(seconds, reverse=True)[:per_stage])


def plan_schedule(name: str, schedule: Schedule, workload: Workload, system: System, layout: Layout, source: str,
                  dense: PhaseStep, step_of: Callable[[Workload], PhaseStep]) -> tuple[ScheduleSection, list[PhaseRow]]:
    """Totals (next to the all-dense baseline) and one row per phase and switch."""
    field = schedule_field(workload, name)
    assert workload.train is not None
    tokens_per_step = float(workload.train.global_batch * workload.train.seq_len)
    phases = expand(schedule, workload.train.total_tokens, tokens_per_step, source, field)
    steps_by_shape: dict[tuple[int, int] | None, PhaseStep] = {None: dense}
    switch_by_experts: dict[int | None, float] = {}  # every switch into E experts (or back) costs the same
    rows: list[PhaseRow] = []
    previous = "dense"
    for index, phase in enumerate(phases):
        if phase.mode != previous:  # a switch: MoEfication into sparse, the inverse permutation back
            experts = phase.experts if phase.mode == "sparse" else None
            if experts not in switch_by_experts:
                switch_by_experts[experts] = switch_seconds(workload, system, layout, schedule, experts)
            seconds = switch_by_experts[experts]
            rows.append(_row(name, "switch", f"{previous}->{phase.mode}", None, None, 0.0, 0.0, seconds, system, 1.0))
            previous = phase.mode
        if phase.shape not in steps_by_shape:
            steps_by_shape[phase.shape] = step_of(sparse_workload(workload, phase, schedule, source, field))
        step = steps_by_shape[phase.shape]
        steps = phase.tokens / tokens_per_step
        rows.append(_row(name, f"phase {index + 1}", phase.mode, phase.experts, phase.k, phase.tokens, steps,
                         steps * step.step_s, system, step.busy_fraction, step.step_s))
    total_tokens = sum(p.tokens for p in phases)
    baseline = run_totals(system, total_tokens / tokens_per_step * dense.step_s, dense.busy_fraction)
    seconds = sum(r.seconds for r in rows)
    usd = sum(r.usd or 0.0 for r in rows) if system.price else None
    kwh = sum(r.kwh for r in rows)
    peak_shape, peak = max(steps_by_shape.items(), key=lambda item: item[1].memory_gb)
    totals = ScheduleSection(
        phases=len(phases), switches=sum(r.mode.count("->") for r in rows), total_tokens=total_tokens,
        sparse_token_share=sum(p.tokens for p in phases if p.mode == "sparse") / total_tokens,
        days=seconds / SECONDS_PER_DAY, device_hours=system.devices * seconds / SECONDS_PER_HOUR, usd=usd, kwh=kwh,
        switch_hours=sum(r.seconds for r in rows if r.phase == "switch") / SECONDS_PER_HOUR,
        dense_baseline_days=baseline.seconds / SECONDS_PER_DAY, dense_baseline_usd=baseline.usd,
        dense_baseline_kwh=baseline.kwh, speedup_vs_dense=baseline.seconds / seconds,
        peak_memory_gb=peak.memory_gb,
        peak_memory_phase="dense" if peak_shape is None else f"sparse {peak_shape[1]}/{peak_shape[0]}",
        fits=all(s.fits for s in steps_by_shape.values()),
    )
    return totals, rows


def _row(schedule: str, phase: str, mode: str, experts: int | None, k: int | None, tokens: float, steps: float,
         seconds: float, system: System, busy: float, step_s: float | None = None) -> PhaseRow:
    totals = run_totals(system, seconds, busy)
    return PhaseRow(schedule, phase, mode, experts, k, tokens, steps, step_s, seconds, seconds / SECONDS_PER_HOUR,
                    totals.usd, totals.kwh)
