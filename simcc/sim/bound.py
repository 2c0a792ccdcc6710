"""A step time that no simulation of a training plan can beat, worked out without simulating.

A search simulates only the layouts whose bound could still place them among the best, so the
bound must never exceed what `sim/training.py` finds for the same plan. It holds because of four
facts about that simulator, whose task orders and overlap rules it reuses:
- a stage runs its tasks one after another on one stream: compute, and the transfers it waits for
  (tensor-parallel collectives, expert all-to-alls not pipelined in pieces, pipeline sends unless
  they overlap), each taking at least its cost, and the expert all-to-alls of a merged
  forward/backward pair only what the partner's compute cannot hide (`_behind`, exactly as
  simulated). So a stage is busy for at least the sum of those seconds, plus its optimizer step;
- a stage's first forward waits for the first forward of every earlier stage's first chunk and
  for each hop's activation to arrive, and (without interleaving) the last backward it runs must
  then pass back through every earlier stage's backward compute: the pipeline's fill and drain;
- each stage's two links (node fabric, network) share their bandwidth between the flows in
  progress, so a link is busy for at least the sum of the transfer seconds it carries in a step;
- the only transfers that can shrink are expert all-to-alls of merged pairs and those pipelined
  in pieces with compute: the link bound leaves them out. A context-parallel KV ring's cost holds
  only the part its attention steps do not hide (plan/training.py, ring_costs), which the
  simulator plays as a blocking transfer like any other; its hidden part (`Cost.hidden`) is
  loaded on no simulated link, so the bound leaves it out too.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from simcc.memo import Memo
from simcc.plan.training import Cost, StagePlan, TrainingPlan
from simcc.sim.training import Segment, _behind, _segments, merged_order, task_order


# By list object: plans share their chunks' cost lists (plan/training.py memoises them).
_HELD: Memo[float] = Memo(10_000)
_PAIRS: Memo[float] = Memo(10_000)
_CARRIED: Memo[dict[str, float]] = Memo(10_000)


def _held(segments: list[Segment] | list[Cost]) -> float:
    """Seconds a task holds its stage's stream at least: compute and the transfers it waits for."""
    return _HELD.get(id(segments), lambda: sum(s.seconds for s in segments
                                               if s.stream == "compute" or (s.stream == "comm" and _chunks(s) == 1)),
                     segments)


def _chunks(item: Segment | Cost) -> int:
    return item.chunks if isinstance(item, Segment) else item.overlap_chunks


def _compute(costs: list[Cost]) -> float:
    return sum(c.seconds for c in costs if c.stream == "compute")


def step_lower_bound(plan: TrainingPlan) -> float:
    """Seconds: the largest of every stage's stream bound and link bounds."""
    hop = plan.stages[0].p2p.seconds if plan.pp > 1 else 0.0  # an activation or gradient reaching the next stage
    first_forward = [_held(stage.chunks[0].forward) + hop for stage in plan.stages]
    # A drained backward may be half of a merged pair, whose all-to-alls shrink: its compute only.
    last_backward = [(_compute(stage.chunks[0].backward) if plan.overlap_moe_comm else _held(stage.chunks[0].backward))
                     + hop for stage in plan.stages]
    drains = plan.vpp == 1 or plan.schedule != "interleaved"
    bound = 0.0
    for index, stage in enumerate(plan.stages):
        busy = _stream_seconds(plan, index, stage)
        fill = sum(first_forward[:index])
        tail = max(stage.optimizer.seconds, sum(last_backward[:index]) if drains else 0.0)
        bound = max(bound, fill + busy + tail, *_link_seconds(plan, index, stage).values())
    return bound


def _stream_seconds(plan: TrainingPlan, stage: int, stage_plan: StagePlan) -> float:
    """The stage's tasks in the simulator's order, merged pairs as `_behind` plays them, with the
    pipeline sends it waits for."""
    virtual = plan.vpp if plan.schedule == "interleaved" else 1
    last_global = plan.pp * virtual - 1
    waits_send = 0.0 if plan.overlap_p2p or plan.pp == 1 else plan.stages[stage].p2p.seconds
    seconds = 0.0
    for shape, times in _task_shapes(plan.schedule, plan.pp, virtual, plan.microbatches, stage, plan.overlap_moe_comm):
        chunks = stage_plan.chunks
        if len(shape) == 2:
            (_, fchunk), (_, bchunk) = shape
            held = _pair_held(chunks[fchunk].forward, chunks[bchunk].backward, plan.comm_sm_share)
        else:
            (kind, chunk), = shape
            held = _held(chunks[chunk].forward if kind == "F" else chunks[chunk].backward)
        sends = 0
        for kind, chunk in shape:
            global_chunk = chunk * plan.pp + stage
            sends += (kind == "F" and global_chunk < last_global) or (kind == "B" and global_chunk > 0)
        seconds += times * (held + sends * waits_send)
    return seconds


def _pair_held(forward: list[Cost], backward: list[Cost], share: float) -> float:
    """A merged pair's stream seconds, each half behind the other."""

    def held() -> float:
        f, b = _segments(forward, True), _segments(backward, True)
        return _held(_behind(f, b, share)) + _held(_behind(b, f, share))

    return _PAIRS.get((id(forward), id(backward), share), held, forward, backward)


@lru_cache(maxsize=4096)
def _task_shapes(schedule: str, p: int, v: int, m: int, stage: int, overlap: bool) -> tuple[tuple[tuple, int], ...]:
    """How many times the stage runs each kind of item: a lone (kind, chunk) task or a merged
    forward/backward pair, in the simulator's order (`task_order`, `merged_order`). Without
    EP-communication overlap nothing merges: every chunk's forward and backward run m times each."""
    if not overlap:
        return tuple(((("F", chunk),), m) for chunk in range(v)) + tuple(((("B", chunk),), m) for chunk in range(v))
    order = task_order(schedule, p, v, m, stage, 1)
    items = merged_order(order) if overlap else [(task,) for task in order]
    return tuple(Counter(tuple((kind, chunk) for kind, _, chunk in item) for item in items).items())


def _carried(costs: list[Cost], overlap_moe_comm: bool) -> dict[str, float]:
    """Seconds a cost list puts on each link, leaving out transfers that may shrink."""

    def carried() -> dict[str, float]:
        busy = {"intra": 0.0, "inter": 0.0}
        for cost in costs:
            shrinks = cost.overlap_chunks > 1 or (overlap_moe_comm and cost.group == "ep")
            if cost.stream == "comm" and not shrinks:
                busy[cost.link or "intra"] += cost.seconds
        return busy

    return _CARRIED.get((id(costs), overlap_moe_comm), carried, costs)


def _link_seconds(plan: TrainingPlan, index: int, stage: StagePlan) -> dict[str, float]:
    """Transfer seconds each of the stage's links carries in one step."""
    m = plan.microbatches
    busy = {"intra": 0.0, "inter": 0.0}

    def carry(costs: list[Cost], times: int) -> None:
        for link, seconds in _carried(costs, plan.overlap_moe_comm).items():
            busy[link] += seconds * times

    last_global = plan.pp * len(stage.chunks) - 1
    for virtual, chunk in enumerate(stage.chunks):
        carry(chunk.forward, m)
        carry(chunk.backward, m)
        carry([c for bucket in chunk.grad_buckets for c in bucket] + chunk.param_sync, 1)
        if plan.pp > 1:
            global_chunk = virtual * plan.pp + index
            sends = (global_chunk < last_global) + (global_chunk > 0)  # the activation on, the gradient back
            carry([stage.p2p], m * sends)
    return busy
