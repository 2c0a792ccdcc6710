"""Compose a costed training plan into a step time with closed-form pipeline formulas.

This is the stand-in scheduler until the discrete-event simulator takes over; it reads the
plan's seconds and never re-derives a cost. Within a chunk, work is serial (no compute/comm
overlap); gradient reduction overlaps the last micro-batch's backward when enabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from simcc.timing.plan import Cost, StagePlan, TrainingPlan


@dataclass(frozen=True)
class StepBreakdown:
    """Seconds of one training step on its critical (slowest) pipeline stage."""

    compute: float
    exposed_comm: float
    imbalance: float
    bubble: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.exposed_comm + self.imbalance + self.bubble + self.optimizer


def _sum(costs: list[Cost], stream: str) -> tuple[float, float]:
    """(seconds without imbalance, imbalance seconds) of one stream."""
    busy = sum(c.seconds - c.imbalance for c in costs if c.stream == stream)
    extra = sum(c.imbalance for c in costs if c.stream == stream)
    return busy, extra


@dataclass(frozen=True)
class _StageTimes:
    forward: float
    backward: float
    compute: float
    comm: float
    imbalance: float


def _stage_times(stage: StagePlan, pp: int) -> _StageTimes:
    compute = comm = imbalance = forward = backward = 0.0
    for chunk in stage.chunks:
        for items, is_forward in ((chunk.forward, True), (chunk.backward, False)):
            c, ci = _sum(items, "compute")
            m, mi = _sum(items, "comm")
            compute, comm, imbalance = compute + c, comm + m, imbalance + ci + mi
            if is_forward:
                forward += c + ci + m + mi
            else:
                backward += c + ci + m + mi
        if pp > 1:  # send activations forward and their gradients backward
            comm += 2 * stage.p2p.seconds
            forward += stage.p2p.seconds
            backward += stage.p2p.seconds
    return _StageTimes(forward, backward, compute, comm, imbalance)


def compose_training_step(plan: TrainingPlan) -> StepBreakdown:
    """1F1B and GPipe: (m + p - 1) slots of the slowest stage; interleaved 1F1B shrinks the
    bubble to (p - 1)/v slots (Narayanan et al. 2021, sec. 2.2)."""
    times = [_stage_times(s, plan.pp) for s in plan.stages]
    per_mb = [t.forward + t.backward for t in times]
    slow = max(range(len(times)), key=lambda i: per_mb[i])
    t, stage, m = times[slow], plan.stages[slow], plan.microbatches
    virtual = plan.vpp if plan.schedule == "interleaved" else 1
    bubble = (plan.pp - 1) / virtual * per_mb[slow]

    grad = sum(c.seconds for c in stage.grad_sync)
    gather = sum(c.seconds for c in stage.param_sync)
    if plan.overlap_grad_reduce:
        # Buckets reduce while the last micro-batch's backward runs; the gather overlaps the next forward.
        exposed_sync = max(0.0, grad - t.backward) + max(0.0, gather - t.forward)
    else:
        exposed_sync = grad + gather
    return StepBreakdown(
        compute=m * t.compute,
        exposed_comm=m * t.comm + exposed_sync,
        imbalance=m * t.imbalance,
        bubble=bubble,
        optimizer=stage.optimizer.seconds,
    )
