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
from simcc.costs.collectives import collective_time
from simcc.layout import Layout, build_layout, comm_group
from simcc.model.blocks import Batch
from simcc.model.graph import blocks_of
from simcc.plan.training import Cost, layer_costs
from simcc.specs.blocks import DenseFFNBlock
from simcc.model.blocks import ffn_params
from simcc.model.moefication import clustering_op, dense_ffn_layers, moefied_model, permutation_op
from simcc.model.ops import DTYPE_BYTES
from simcc.costs.money import SECONDS_PER_DAY, SECONDS_PER_HOUR, run_totals
from simcc.specs.hardware import System
from simcc.results import PhaseRow, ScheduleSection
from simcc.specs.workload import AdaptiveSwitch, Schedule, Workload

RELATIVE_TOLERANCE = 1e-6
TRAINING_FLOPS_PER_FORWARD = 3.0  # forward + backward (2x the forward), the model-FLOPs convention


@dataclass(frozen=True)
class Phase:
    mode: str  # dense | sparse
    tokens: float
    experts: int | None = None
    k: int | None = None
    ep: int | None = None  # a sparse phase's expert parallelism; None: the workload's

    @property
    def shape(self) -> tuple[int, int, int | None] | None:
        return (self.experts, self.k, self.ep) if self.mode == "sparse" else None  # type: ignore[return-value]


@dataclass(frozen=True)
class PhaseStep:
    """What one step of a phase's model costs, from its own estimate."""

    step_s: float
    busy_fraction: float  # compute share of the step, for the power model
    memory_gb: float
    fits: bool
    forward_flops_per_token: float  # the model-FLOPs convention: the FLOPs the phase's model executes


def schedule_field(workload: Workload, name: str) -> str:
    """Where a named schedule sits in the workload file, for error messages."""
    return "schedule" if workload.schedule is not None else f"schedules.{name}"


def expand(schedule: Schedule, total_tokens: float | None, tokens_per_step: float, source: str, field: str) -> list[Phase]:
    """The schedule's phases in order, each with its tokens; a rule fills train.total_tokens."""
    if schedule.phases is not None:
        phases = [Phase(p.mode, p.tokens if p.tokens is not None else p.steps * tokens_per_step,  # type: ignore[operator]
                        p.experts or schedule.experts if p.mode == "sparse" else None,
                        p.k or schedule.k if p.mode == "sparse" else None,
                        p.ep or schedule.ep if p.mode == "sparse" else None) for p in schedule.phases]
        planned = sum(p.tokens for p in phases)
        if total_tokens and abs(planned - total_tokens) > RELATIVE_TOLERANCE * total_tokens:
            raise InputError(source, f"{field}.phases",
                             f"phases train {planned:.4g} tokens but train.total_tokens is {total_tokens:.4g}")
        return phases
    rule = schedule.rule
    assert rule is not None
    if not total_tokens:
        raise InputError(source, "train.total_tokens", f"{field}.rule fills a run: give the run's total tokens")
    middle = total_tokens - rule.warmup - rule.final_dense_tokens
    if middle <= 0:
        raise InputError(source, f"{field}.rule", "warm-up and final dense tokens exceed train.total_tokens")
    phases = [Phase("dense", rule.warmup)]
    while middle > RELATIVE_TOLERANCE * total_tokens:
        sparse = min(rule.sparse_tokens, middle)
        phases.append(Phase("sparse", sparse, schedule.experts, schedule.k, schedule.ep))
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
    """The phase's model: every dense FFN MoEfied, its experts over `phase.ep` ranks if given."""
    assert phase.experts is not None and phase.k is not None
    model = moefied_model(workload.model, phase.experts, phase.k, schedule.load, source, f"{field}.experts")
    update: dict[str, object] = {"model": model, "schedule": None, "schedules": None}
    if phase.ep is not None:
        update["parallelism"] = workload.parallelism.model_copy(update={"ep": phase.ep})
    return workload.model_copy(update=update)


def switch_seconds(workload: Workload, system: System, layout: Layout, schedule: Schedule,
                   experts: int | None, ep: int = 1) -> float:
    """One switch on the busiest pipeline stage, which converts its own FFN layers: to sparse,
    the balanced k-means of each layer (experts given) and the permutation of its weights,
    gradients and optimizer state; back to dense, that permutation alone (experts None). With the
    experts over `ep` ranks, going sparse each rank keeps its experts' slices of the dense layer it
    already holds (no traffic); going back, the EP group all-gathers every layer's slices, weights,
    gradients and optimizer state, so that each rank holds the whole dense layer again."""
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
        elif ep > 1:
            group = comm_group(ep, layout.tp, system.devices_per_node)  # EP ranks within DP, as the layout lays them
            layer += collective_time("all_gather", state, group, system)
        seconds.append(layer)
    return sum(sorted(seconds, reverse=True)[:per_stage])


# Op families of a MoEfied layer that a dense FFN does not have: the router's product and top-k,
# the token permutation into expert order and back, and any dispatch traffic.
MOE_OVERHEAD_OPS = ("moe.router", "moe.topk", "moe.permute", "moe.unpermute", "moe.dispatch", "moe.combine")


@dataclass(frozen=True)
class LayerSplit:
    """One FFN layer, forward and backward for one micro-batch on one device: the dense layer's
    time, its MoEfied form's, and the share of the latter its MoE-only ops take."""

    dense_s: float
    sparse_s: float
    overhead_share: float


def layer_split(workload: Workload, sparse: Workload, system: System) -> LayerSplit:
    """Why a sparse step saves less time than FLOPs: the first FFN layer costed both ways, as the
    step plan costs it (plan.training.layer_costs)."""
    index = next(i for i, block in enumerate(blocks_of(workload.model)) if isinstance(block.spec, DenseFFNBlock))
    assert workload.train is not None
    batch = Batch(workload.parallelism.micro_batch, workload.train.seq_len, workload.train.seq_len)

    def costs(phase_workload: Workload) -> list[Cost]:
        layout = build_layout(phase_workload, system, phase_workload.name)
        forward, backward = layer_costs(phase_workload, system, layout, index, batch)
        return forward + backward

    dense_costs, sparse_costs = costs(workload), costs(sparse)
    sparse_s = sum(c.seconds for c in sparse_costs)
    overhead = sum(c.seconds for c in sparse_costs if c.name.startswith(MOE_OVERHEAD_OPS))
    return LayerSplit(sum(c.seconds for c in dense_costs), sparse_s, overhead / sparse_s if sparse_s else 0.0)


def plan_schedule(name: str, schedule: Schedule, workload: Workload, system: System, layout: Layout, source: str,
                  dense: PhaseStep, step_of: Callable[[Workload], PhaseStep]) -> tuple[ScheduleSection, list[PhaseRow]]:
    """Totals (next to the all-dense baseline) and one row per phase and switch."""
    field = schedule_field(workload, name)
    assert workload.train is not None
    tokens_per_step = float(workload.train.global_batch * workload.train.seq_len)
    phases = expand(schedule, workload.train.total_tokens, tokens_per_step, source, field)
    steps_by_shape: dict[tuple[int, int, int | None] | None, PhaseStep] = {None: dense}
    # Every switch into E experts costs the same, and every switch back from EP ranks.
    switch_by_kind: dict[tuple[int | None, int], float] = {}
    rows: list[PhaseRow] = []
    previous = Phase("dense", 0.0)
    for index, phase in enumerate(phases):
        if phase.mode != previous.mode:  # a switch: MoEfication into sparse, the inverse permutation back
            kind = (phase.experts, 1) if phase.mode == "sparse" else (None, previous.ep or workload.parallelism.ep)
            if kind not in switch_by_kind:
                switch_by_kind[kind] = switch_seconds(workload, system, layout, schedule, *kind)
            rows.append(_row(name, "switch", f"{previous.mode}->{phase.mode}", None, None, 0.0, 0.0,
                             switch_by_kind[kind], system, 1.0))
        previous = phase
        if phase.shape not in steps_by_shape:
            steps_by_shape[phase.shape] = step_of(sparse_workload(workload, phase, schedule, source, field))
        step = steps_by_shape[phase.shape]
        steps = phase.tokens / tokens_per_step
        rows.append(_row(name, f"phase {index + 1}", phase.mode, phase.experts, phase.k, phase.tokens, steps,
                         steps * step.step_s, system, step.busy_fraction, step.step_s,
                         pflop=TRAINING_FLOPS_PER_FORWARD * step.forward_flops_per_token * phase.tokens / 1e15))
    adaptive = schedule.rule.adaptive if schedule.rule is not None else None
    if adaptive is not None:
        rows.append(_monitoring_row(name, adaptive, dense, tokens_per_step, system))
    total_tokens = sum(p.tokens for p in phases)
    dense_pflop = TRAINING_FLOPS_PER_FORWARD * dense.forward_flops_per_token * total_tokens / 1e15
    pflop = sum(r.pflop for r in rows)
    sparse_tokens: dict[tuple[int, int, int | None], float] = {}
    for p in phases:
        if p.shape is not None:
            sparse_tokens[p.shape] = sparse_tokens.get(p.shape, 0.0) + p.tokens
    most_trained_shape = max(sparse_tokens, key=sparse_tokens.__getitem__) if sparse_tokens else None
    most_trained = steps_by_shape[most_trained_shape] if most_trained_shape else None
    split = None
    if most_trained_shape is not None:
        experts, k, ep = most_trained_shape
        split = layer_split(workload, sparse_workload(workload, Phase("sparse", 0.0, experts, k, ep), schedule, source,
                                                      field), system)
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
        training_pflop=pflop, dense_baseline_pflop=dense_pflop, flops_saved_vs_dense=dense_pflop / pflop,
        sparse_flops_ratio=most_trained.forward_flops_per_token / dense.forward_flops_per_token if most_trained else None,
        sparse_step_ratio=most_trained.step_s / dense.step_s if most_trained else None,
        sparse_layer_time_ratio=split.sparse_s / split.dense_s if split else None,
        sparse_layer_overhead_share=split.overhead_share if split else None,
        peak_memory_gb=peak.memory_gb,
        peak_memory_phase="dense" if peak_shape is None else f"sparse {peak_shape[1]}/{peak_shape[0]}",
        fits=all(s.fits for s in steps_by_shape.values()),
    )
    return totals, rows


def _monitoring_row(name: str, adaptive: AdaptiveSwitch, dense: PhaseStep, tokens_per_step: float,
                    system: System) -> PhaseRow:
    """The adaptive switch's checks over the warm-up: each runs the dense model forward over the
    probe tokens, a third of a training step's compute per token (forward 1, backward 2)."""
    checks = adaptive.stable_after_tokens() / adaptive.check_every_tokens
    check_s = dense.step_s * adaptive.probe_tokens / tokens_per_step / TRAINING_FLOPS_PER_FORWARD
    pflop = dense.forward_flops_per_token * adaptive.probe_tokens * checks / 1e15
    return _row(name, "monitor", "pattern checks", None, None, adaptive.probe_tokens * checks, checks, checks * check_s,
                system, dense.busy_fraction, check_s, pflop=pflop)


def _row(schedule: str, phase: str, mode: str, experts: int | None, k: int | None, tokens: float, steps: float,
         seconds: float, system: System, busy: float, step_s: float | None = None, pflop: float = 0.0) -> PhaseRow:
    totals = run_totals(system, seconds, busy)
    return PhaseRow(schedule, phase, mode, experts, k, tokens, steps, step_s, seconds, seconds / SECONDS_PER_HOUR,
                    totals.usd, totals.kwh, pflop)
