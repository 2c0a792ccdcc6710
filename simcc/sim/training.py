"""Play training steps out in time: one simulated device per pipeline stage, each running its
schedule's task order, waiting for activations and gradients from its neighbours.

What is explicit: the p pipeline-stage devices of one data-parallel replica, their compute
streams, and their intra-node and inter-node link ports (shared by blocking collectives,
pipeline sends and gradient buckets in flight). What is replicated by symmetry: the other
data-parallel replicas (identical timelines) and the other ranks of each tensor- and
expert-parallel group (the simulated device carries the group's busiest expert load, since the
combine all-to-all makes the group wait for it). So the cost of a simulation grows with
layers x micro-batches x stages, not with the device count.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import simpy

from simcc.costs.memory import DUAL_SCHEDULES
from simcc.layout import DIMENSIONS, dimension_of
from simcc.memo import Memo
from simcc.sim.links import FairShareLink
from simcc.sim.timeline import Timeline
from simcc.plan.training import ChunkPlan, Cost, TrainingPlan, chunk_placement, split_backward

# (kind, micro-batch, chunk): "F" forward, "B" backward, and, as zero-bubble pipelining splits a
# backward (Qi et al. 2023), "I" its input-gradient part alone and "W" its deferred weight gradient.
Task = tuple[str, int, int]


def warmup_forwards(p: int, v: int, stage: int, extra_warmup: int = 0) -> int:
    """Chunk-forwards a 1F1B stage runs before its first backward, given enough micro-batches."""
    return ((p - stage - 1) * 2 + (v - 1) * p if v > 1 else p - stage - 1) + extra_warmup


def task_order(schedule: str, p: int, v: int, m: int, stage: int, extra_warmup: int = 0) -> list[Task]:
    """The order in which one stage runs its forward and backward tasks.

    GPipe: all forwards, then all backwards. 1F1B: p - s - 1 warm-up forwards, then alternate
    (Narayanan et al. 2019, PipeDream-Flush). Interleaved 1F1B: 2(p - s - 1) + (v - 1)p warm-up
    chunk-forwards, micro-batches taken p at a time through each chunk (Narayanan et al. 2021).
    `extra_warmup` more forwards first: with EP-communication overlap every steady-state forward
    then pairs with the backward of an earlier micro-batch, so no merged pair waits on another
    stage's pair that waits on it."""
    if schedule == "gpipe":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    if schedule in DUAL_SCHEDULES:
        return [task for item in dual_items(schedule, p, m, stage) for task in item]
    total = m * v

    def forward(k: int) -> Task:
        return ("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def backward(k: int) -> Task:
        return ("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    warmup = min(warmup_forwards(p, v, stage, extra_warmup), total)
    order = [forward(k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [forward(warmup + i), backward(i)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def dual_items(schedule: str, p: int, m: int, stage: int) -> list[tuple[Task, ...]]:
    """One DualPipe or DualPipeV rank's tasks, in the order of deepseek-ai/DualPipe's step()
    (dualpipe/dualpipe.py, dualpipev.py), as merged forward/backward pairs and lone tasks.

    A rank's two chunks are its phases: phase 0 the one whose micro-batches reach it first
    (DualPipe: its own direction on the first half of the ranks, the other on the second half,
    `phase ^= is_in_second_half`; DualPipeV: the V's way down). With R ranks to the middle
    (DualPipe: p/2; DualPipeV: p), h = the rank's distance from its phase-0 source (DualPipe:
    min(r, p-1-r); DualPipeV: r) and n micro-batches per phase (DualPipe: m/2 per direction;
    DualPipeV: all m through both chunks), the eight steps are:
    1. 2(R-h-1) x F0; 2. h+1 x (F0, F1); 3. R-h-1 x (B1 split: I1, its W at once, F1);
    4. n-2R+h+1 x (F0&B1, F1&B0), the first F0 and B1 apart on the middle rank (h = R-1);
    5. R-h-1 x (B1, F1&B0); 6. h+1 x (B1, B0), the later half of these split, W deferred;
    7. R-h-1 x (W, I0 with W deferred); 8. h+1 x W. Deferred weight gradients run first in, first
    out (WeightGradStore). DualPipe is DualPipeV's order on each half of the ranks, mirrored."""
    if schedule == "dualpipe":
        ranks, half, per_phase = p // 2, min(stage, p - 1 - stage), m // 2
        chunk_of = (0, 1) if stage < p // 2 else (1, 0)  # local chunk 0 serves direction 0, fed from rank 0
    else:
        ranks, half, per_phase = p, stage, m
        chunk_of = (0, 1)
    # Micro-batch ids: DualPipe's direction d takes d*n .. d*n + n-1; DualPipeV's pass both chunks.
    first = [chunk_of[phase] * per_phase if schedule == "dualpipe" else 0 for phase in (0, 1)]
    forwards, backwards = [0, 0], [0, 0]
    deferred: list[Task] = []

    def forward(phase: int) -> Task:
        forwards[phase] += 1
        return ("F", first[phase] + forwards[phase] - 1, chunk_of[phase])

    def backward(phase: int, split: bool = False) -> Task:
        backwards[phase] += 1
        microbatch = first[phase] + backwards[phase] - 1
        if split:
            deferred.append(("W", microbatch, chunk_of[phase]))
        return ("I" if split else "B", microbatch, chunk_of[phase])

    def weight() -> Task:
        return deferred.pop(0)

    items: list[tuple[Task, ...]] = []
    for _ in range(2 * (ranks - half - 1)):
        items.append((forward(0),))
    for _ in range(half + 1):
        items += [(forward(0),), (forward(1),)]
    for _ in range(ranks - half - 1):
        items.append((backward(1, split=True),))
        items += [(weight(),), (forward(1),)]
    for i in range(per_phase - 2 * ranks + half + 1):
        if i == 0 and half == ranks - 1:
            items += [(forward(0),), (backward(1),)]
        else:
            items.append((forward(0), backward(1)))
        items.append((forward(1), backward(0)))
    for _ in range(ranks - half - 1):
        items.append((backward(1),))
        items.append((forward(1), backward(0)))
    split = False
    for i in range(half + 1):
        split = split or (i == (half + 1) // 2 and half % 2 == 1)
        items.append((backward(1, split),))
        split = split or (i == (half + 1) // 2 and half % 2 == 0)
        items.append((backward(0, split),))
    for _ in range(ranks - half - 1):
        items.append((weight(),))
        items.append((backward(0, split=True),))
    for _ in range(half + 1):
        items.append((weight(),))
    assert not deferred and forwards == backwards == [per_phase, per_phase]
    return items


@dataclass
class StageAccount:
    """Where one stage's step time went, measured from the simulated timeline."""

    compute: float = 0.0
    imbalance: float = 0.0
    blocking_comm: float = 0.0
    sync_wait: float = 0.0  # waiting for gradient buckets / parameter gathers
    optimizer: float = 0.0
    exposed: dict[str, float] = field(default_factory=lambda: dict.fromkeys(DIMENSIONS, 0.0))  # by dimension

    def comm(self, group: str, seconds: float) -> None:
        """Communication this stage waited for, over `group`."""
        self.blocking_comm += seconds
        self.exposed[dimension_of(group)] += seconds

    def wait(self, seconds: float) -> None:
        """Waiting for gradient reductions or parameter gathers: data-parallel traffic."""
        self.sync_wait += seconds
        self.exposed["dp"] += seconds

    @property
    def busy(self) -> float:
        return self.compute + self.imbalance + self.blocking_comm + self.sync_wait + self.optimizer


@dataclass
class StepResult:
    seconds: float
    stages: list[StageAccount]

    @property
    def critical(self) -> StageAccount:
        """The stage with the most busy time: the one whose breakdown explains the step."""
        return max(self.stages, key=lambda account: account.busy)

    @property
    def bubble(self) -> float:
        return max(0.0, self.seconds - self.critical.busy)


@dataclass
class TrainingSimulation:
    steps: list[StepResult] = field(default_factory=list)
    events: int = 0

    @property
    def mean_step(self) -> float:
        return statistics.fmean(s.seconds for s in self.steps)

    @property
    def p95_step(self) -> float:
        ordered = sorted(s.seconds for s in self.steps)
        return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]

    def mean(self, part: str) -> float:
        if part == "bubble":
            return statistics.fmean(s.bubble for s in self.steps)
        return statistics.fmean(getattr(s.critical, part) for s in self.steps)

    def mean_exposed(self, dimension: str) -> float:
        """Communication over one parallel dimension the critical stage waited for, per step."""
        return statistics.fmean(s.critical.exposed[dimension] for s in self.steps)


class Segment(NamedTuple):
    stream: str
    seconds: float
    imbalance: float
    link: str
    name: str
    chunks: int  # >1: pipelined with the compute up to its partner collective
    latency: float  # paid again by every piece when chunked
    bucket: int  # stream "bucket": the unit whose gradients are complete here
    group: str  # comm: the parallel group it runs over (tp, ep, dp, ...)


def _segments(costs: list[Cost], merge: bool) -> list[Segment]:
    """Cost items as scheduled segments; consecutive compute items merge when no trace is kept
    (same durations, fewer events)."""
    out: list[Segment] = []
    run_seconds = run_imbalance = 0.0
    in_run = False
    for c in costs:
        if merge and c.stream == "compute":
            run_seconds += c.seconds
            run_imbalance += c.imbalance
            in_run = True
            continue
        if in_run:
            out.append(Segment("compute", run_seconds, run_imbalance, "", "compute", 1, 0.0, -1, ""))
            run_seconds = run_imbalance = 0.0
            in_run = False
        out.append(Segment(c.stream, c.seconds, c.imbalance, c.link, c.name, c.overlap_chunks, c.latency, c.bucket,
                           c.group))
    if in_run:
        out.append(Segment("compute", run_seconds, run_imbalance, "", "compute", 1, 0.0, -1, ""))
    return out


def _partner(segments: list[Segment], first: int) -> int | None:
    """Index of the collective that closes an overlapped region opened at `first`."""
    for i in range(first + 1, len(segments)):
        if segments[i].stream == "comm":
            return i if segments[i].chunks == segments[first].chunks else None
    return None


def _solo_run(segments: list[Segment], first: int, launches_buckets: bool) -> tuple[int, float, float, dict[str, float]]:
    """The segments from `first` that can play as one timeout on quiet links: compute, and blocking
    transfers that will each have their link to themselves, up to a gradient bucket that starts a
    background reduction or a transfer pipelined with compute. Returns (end, compute seconds,
    their imbalance, transfer seconds by group)."""
    compute = imbalance = 0.0
    comm: dict[str, float] = {}
    index = first
    while index < len(segments):
        segment = segments[index]
        if segment.stream == "compute":
            compute += segment.seconds
            imbalance += segment.imbalance
        elif segment.stream == "comm" and (segment.chunks == 1 or _partner(segments, index) is None):
            comm[segment.group] = comm.get(segment.group, 0.0) + segment.seconds
        elif segment.stream != "bucket" or launches_buckets:
            break
        index += 1
    return index, compute, imbalance, comm


def merged_order(order: list[Task]) -> list[tuple[Task, ...]]:
    """The tasks paired for expert-parallel communication overlap: each forward next to a backward
    of another micro-batch or chunk (the steady state of 1F1B, in either order) forms a pair whose
    all-to-alls hide behind each other's compute (`_behind`); the rest stay alone. Neither half
    of a pair needs the other: a backward's forward ran earlier, and a forward never waits on a
    backward."""
    items: list[tuple[Task, ...]] = []
    index = 0
    while index < len(order):
        task = order[index]
        following = order[index + 1] if index + 1 < len(order) else None
        if following is not None and {task[0], following[0]} == {"F", "B"} and task[1:] != following[1:]:
            items.append((task, following) if task[0] == "F" else (following, task))
            index += 2
        else:
            items.append((task,))
            index += 1
    return items


def _behind(own: list[Segment], partner: list[Segment], sm_share: float) -> list[Segment]:
    """A task's segments when its expert all-to-alls run behind its partner task's compute
    (Megatron-Core's EP-communication overlap interleaves the two layer by layer): the all-to-alls
    keep only the part the partner's compute cannot cover, and compute runs on the SMs the
    dispatcher leaves. Each task still waits for its own inputs, so the pipeline's dependencies
    are those of the plain schedule."""
    slowdown = 1.0 / (1.0 - sm_share)
    cover = slowdown * sum(s.seconds for s in partner if s.stream == "compute")
    hidden = sum(s.seconds for s in own if s.stream == "comm" and s.group == "ep")
    keep = max(0.0, hidden - cover) / hidden if hidden > 0 else 1.0
    out = []
    for segment in own:
        if segment.stream == "compute":
            out.append(segment._replace(seconds=segment.seconds * slowdown, imbalance=segment.imbalance * slowdown))
        elif segment.stream == "comm" and segment.group == "ep":
            out.append(segment._replace(seconds=segment.seconds * keep, latency=segment.latency * keep))
        else:
            out.append(segment)
    return out


class _Step:
    """The shared state of one simulated step: readiness events between stages."""

    def __init__(self, sim: "_Simulator", step: int) -> None:
        self.sim = sim
        self.step = step
        self.ready: dict[tuple[str, int, int], simpy.Event] = {}
        plan = sim.plan
        self.work = [[self._work(chunk) for chunk in stage.chunks] for stage in plan.stages]

    def _work(self, chunk: ChunkPlan) -> dict[str, list[Segment]]:
        """A chunk's segments by task kind; the split backward's parts only where the schedule runs them."""
        forward, backward = chunk.step_work(self.step)
        merge = not self.sim.trace.enabled
        work = {"F": _segments(forward, merge), "B": _segments(backward, merge)}
        if self.sim.plan.schedule in DUAL_SCHEDULES:
            inputs, weights = split_backward(backward)
            work["I"], work["W"] = _segments(inputs, merge), _segments(weights, merge)
        return work

    def event(self, kind: str, microbatch: int, position: int) -> simpy.Event:
        """Ready when the micro-batch's activation (or gradient) leaves `position` of its path."""
        key = (kind, microbatch, position)
        if key not in self.ready:
            self.ready[key] = self.sim.env.event()
        return self.ready[key]


class _Simulator:
    def __init__(self, plan: TrainingPlan, trace: Timeline) -> None:
        self.plan = plan
        self.trace = trace
        self.env = simpy.Environment()
        self.links = [{"intra": FairShareLink(self.env, f"stage{s}.intra"), "inter": FairShareLink(self.env, f"stage{s}.inter")}
                      for s in range(plan.pp)]
        self.virtual = plan.vpp if plan.schedule == "interleaved" else 1
        # Per stage, each chunk's (direction, position) on its micro-batches' path, and who runs each.
        self.placement = chunk_placement(plan.schedule, plan.pp, plan.vpp)
        self.runs_at = {place: stage for stage, places in enumerate(self.placement) for place in places}
        self.path_end = {direction: max(pos for (d, pos) in self.runs_at if d == direction) for direction, _ in self.runs_at}
        self.orders = [self._items(s) for s in range(plan.pp)]
        # Per stage and chunk, the tasks that complete its gradients (a full backward or a weight gradient).
        self.completions = [[sum(task[0] in "BW" and task[2] == chunk for item in order for task in item)
                             for chunk in range(len(self.placement[s]))] for s, order in enumerate(self.orders)]
        self.events = 0  # timed events scheduled: compute segments and link transfers
        self.background = [0] * plan.pp  # per stage: background transfer chains not yet finished
        # Per step, by segment list object: every micro-batch plays the same lists, so their solo
        # runs and overlapped forms are worked out once.
        self._solo_runs: Memo[tuple[int, float, float, dict[str, float]]] = Memo(1 << 20)
        self._behind: Memo[dict[str, list[Segment]]] = Memo(1 << 20)

    def _items(self, stage: int) -> list[tuple[Task, ...]]:
        """The stage's tasks, a merged forward/backward pair where EP-communication overlap runs
        one (1F1B's steady state, `merged_order`), and always DualPipe's own F&B pairs: without the
        overlap their halves run one after the other, as DualPipe runs them when the module has no
        overlapped_forward_backward, but still start once both inputs are in."""
        plan = self.plan
        per_run = plan.microbatches_per_run
        if plan.schedule in DUAL_SCHEDULES:
            run = dual_items(plan.schedule, plan.pp, per_run, stage)
        else:
            order = task_order(plan.schedule, plan.pp, self.virtual, per_run, stage, int(plan.overlap_moe_comm))
            run = merged_order(order) if plan.overlap_moe_comm else [(t,) for t in order]
        # Each further schedule run of a step takes the next micro-batches after the last run drained.
        return [tuple((kind, microbatch + r * per_run, chunk) for kind, microbatch, chunk in item)
                for r in range(plan.runs) for item in run]

    def _timeout(self, seconds: float) -> simpy.Event:
        self.events += 1
        return self.env.timeout(seconds)

    def _transfer(self, stage: int, cost_link: str, seconds: float) -> simpy.Event:
        self.events += 1
        return self.links[stage][cost_link or "intra"].transfer(seconds)

    def _run_segments(self, stage: int, segments: list[Segment], account: StageAccount,
                      buckets: tuple[list[list[Cost]], list[simpy.Event]] | None = None):
        """Run a task's segments; with `buckets` (the last micro-batch's backward), launch each
        unit's gradient reduction in the background as soon as its gradients are complete."""
        env = self.env
        index = 0
        while index < len(segments):
            if self._quiet(stage):  # commonly the whole task plays as one timeout
                end, compute, imbalance, comm = self._solo_run(segments, index, buckets is not None)
                if end > index:
                    yield self._timeout(compute + sum(comm.values()))
                    account.compute += compute - imbalance
                    account.imbalance += imbalance
                    for group, seconds in comm.items():
                        account.comm(group, seconds)
                    index = end
                    continue
            stream, seconds, imbalance, link, name, chunks, _, bucket, group = segments[index]
            if stream == "bucket":
                if buckets is not None:
                    buckets[1].append(self._launch_chain(stage, buckets[0][bucket], "grad_sync"))
                index += 1
                continue
            partner = _partner(segments, index) if stream == "comm" and chunks > 1 else None
            if partner is not None:
                yield from self._overlapped(stage, segments[index], segments[index + 1 : partner], segments[partner], account)
                index = partner + 1
                continue
            index += 1
            start = env.now
            if stream == "compute":
                yield self._timeout(seconds)
                account.compute += seconds - imbalance
                account.imbalance += imbalance
                if self.trace.enabled:
                    self.trace.add(f"stage{stage}", "compute", name, start, seconds)
            else:
                yield self._transfer(stage, link, seconds)
                account.comm(group, env.now - start)
                self._record_comm(stage, "comm", link, name, start)

    def _solo_run(self, segments: list[Segment], first: int, launches_buckets: bool) -> tuple[int, float, float, dict[str, float]]:
        return self._solo_runs.get((id(segments), first, launches_buckets),
                                   lambda: _solo_run(segments, first, launches_buckets), segments)

    def _paired_work(self, forward: list[Segment], backward: list[Segment]) -> dict[str, list[Segment]]:
        """A merged forward/backward pair's segments, each behind the other's compute."""
        share = self.plan.comm_sm_share
        return self._behind.get((id(forward), id(backward)),
                                lambda: {"F": _behind(forward, backward, share), "B": _behind(backward, forward, share)},
                                forward, backward)

    def _overlapped(self, stage: int, opening: Segment, middle: list[Segment], closing: Segment, account: StageAccount):
        """Dispatch piece i+1 and combine piece i-1 share the link while piece i computes
        (Hwang et al. 2023, Tutel, adaptive pipelining)."""
        env = self.env
        start = env.now
        chunks = opening.chunks
        compute = sum(s.seconds for s in middle)
        imbalance = sum(s.imbalance for s in middle)
        arrived: list[simpy.Event] = []
        previous: simpy.Event | None = None

        def piece_seconds(segment: Segment) -> float:
            return segment.latency + (segment.seconds - segment.latency) / chunks  # latency paid per piece

        for _ in range(chunks):
            done = env.event()
            env.process(self._piece(stage, opening.link, piece_seconds(opening), previous, done))
            arrived.append(done)
            previous = done
        combines = []
        for index in range(chunks):
            yield arrived[index]
            yield self._timeout(compute / chunks)
            combines.append(self._transfer(stage, closing.link, piece_seconds(closing)))
        yield simpy.AllOf(env, combines)
        elapsed = env.now - start
        account.compute += compute - imbalance
        account.imbalance += imbalance
        account.comm(opening.group, max(0.0, elapsed - compute))
        self._record_comm(stage, "comm", opening.link, f"{opening.name}+{closing.name} (overlap x{chunks})", start)

    def _piece(self, stage: int, link: str, seconds: float, after: simpy.Event | None, done: simpy.Event):
        if after is not None:
            yield after
        yield self._transfer(stage, link, seconds)
        done.succeed()

    def _record_comm(self, stage: int, lane: str, link: str, name: str, start: float) -> None:
        """A finished transfer appears on the stage's stream and on the link it loaded."""
        if not self.trace.enabled:
            return  # skip building the labels: this runs once per transfer
        duration = self.env.now - start
        self.trace.add(f"stage{stage}", lane, name, start, duration)
        self.trace.add(f"link stage{stage}.{link or 'intra'}", lane, name, start, duration)

    def _quiet(self, stage: int) -> bool:
        """Nothing else can load this stage's links until its own process starts something: no
        flow in progress and no background chain that will start one. Only the stage's process
        starts flows on its links, so its next blocking transfers will each run alone. With a
        trace kept, every segment is its own event, for the timeline."""
        links = self.links[stage]
        return (not self.trace.enabled and self.background[stage] == 0
                and not links["intra"].active and not links["inter"].active)

    def _launch_chain(self, stage: int, costs: list[Cost], lane: str) -> simpy.Event:
        """Start comm items one after another in the background (a bucket, a gather); the event
        fires when the last is done. Counted from now, before the process first runs."""
        done = self.env.event()
        self.background[stage] += 1
        self.env.process(self._chain(stage, costs, done, lane))
        return done

    def _chain(self, stage: int, costs: list[Cost], done: simpy.Event, lane: str):
        for cost in costs:
            start = self.env.now
            yield self._transfer(stage, cost.link, cost.seconds)
            self._record_comm(stage, lane, cost.link, cost.name, start)
        self.background[stage] -= 1
        done.succeed()

    def _stage(self, state: _Step, stage: int, account: StageAccount):
        env, plan = self.env, self.plan
        chunks = plan.stages[stage].chunks
        placed = self.placement[stage]
        stage_plan = plan.stages[stage]
        # ZeRO: this step's forward of a chunk needs its freshly gathered parameters.
        gathers = [self._launch_chain(stage, chunk.param_sync, "param_gather") for chunk in chunks]
        if not plan.overlap_grad_reduce:
            start = env.now
            yield simpy.AllOf(env, gathers)
            account.wait(env.now - start)
        completions_left = list(self.completions[stage])
        buckets: list[simpy.Event] = []

        def awaited(kind: str, microbatch: int, chunk_index: int) -> simpy.Event | None:
            """What a task consumes, when it has not arrived: the activation from the previous
            position (forward) or the gradient from the next (backward or its input-gradient
            part); a weight gradient needs only its own stage's input-gradient part, run earlier."""
            direction, position = placed[chunk_index]
            if kind == "F":
                event = state.event("act", microbatch, position - 1) if position > 0 else None
            elif kind in "BI":
                event = state.event("grad", microbatch, position + 1) if position < self.path_end[direction] else None
            else:
                event = None
            return None if event is None or event.processed else event

        def sent(kind: str, microbatch: int, chunk_index: int) -> simpy.Event | None:
            """Hand the activation (forward) or gradient (backward) on; the send, when one is made."""
            direction, position = placed[chunk_index]
            if kind == "F" and position < self.path_end[direction]:
                return self._hand_off(state, stage, "act", microbatch, position, self.runs_at[direction, position + 1])
            if kind in "BI" and position > 0:
                return self._hand_off(state, stage, "grad", microbatch, position, self.runs_at[direction, position - 1])
            return None

        def bucket_launch(kind: str, chunk_index: int):
            """The task completing a chunk's last gradients launches their reductions (with overlap)."""
            if kind not in "BW":
                return None
            completions_left[chunk_index] -= 1
            last = completions_left[chunk_index] == 0 and plan.overlap_grad_reduce
            return (chunks[chunk_index].grad_buckets, buckets) if last else None

        dual = plan.schedule in DUAL_SCHEDULES
        for item in self.orders[stage]:
            if len(item) == 2 and plan.overlap_moe_comm:  # a forward and another micro-batch's backward hide each other's all-to-alls
                (_, _, fchunk), (_, _, bchunk) = item
                work = self._paired_work(state.work[stage][fchunk]["F"], state.work[stage][bchunk]["B"])
            else:
                work = {}
            if len(item) == 2 and dual:
                # DualPipe receives both halves' inputs before it computes the pair
                # (_forward_backward_chunk: both receives, then _commit_and_wait_comm).
                for task in item:
                    event = awaited(*task)
                    if event is not None:
                        yield event
            for kind, microbatch, chunk_index in item:
                if kind == "F" and not gathers[chunk_index].triggered:  # ZeRO: its parameters first
                    start = env.now
                    yield gathers[chunk_index]
                    account.wait(env.now - start)
                event = awaited(kind, microbatch, chunk_index)
                if event is not None:
                    yield event
                segments = work.get(kind, state.work[stage][chunk_index][kind])
                yield from self._run_segments(stage, segments, account, bucket_launch(kind, chunk_index))
                event = sent(kind, microbatch, chunk_index)
                if event is not None and not plan.overlap_p2p:  # the stage waits for its send
                    start = env.now
                    if not event.processed:
                        yield event
                    account.comm("pp", env.now - start)
        start = env.now
        if plan.overlap_grad_reduce:
            yield simpy.AllOf(env, buckets)
        else:
            for chunk in chunks:
                yield self._launch_chain(stage, [c for bucket in chunk.grad_buckets for c in bucket], "grad_sync")
        account.wait(env.now - start)
        start = env.now
        yield self._timeout(stage_plan.optimizer.seconds)
        account.optimizer += stage_plan.optimizer.seconds
        self.trace.add(f"stage{stage}", "compute", "optimizer.step", start, stage_plan.optimizer.seconds)

    def _hand_off(self, state: _Step, stage: int, kind: str, microbatch: int, position: int,
                  receiver: int) -> simpy.Event | None:
        """The activation or gradient goes to the stage running the next position; a callback on
        the send (not a process per send) marks it ready there. Returns the send, None when no
        link is crossed."""
        if receiver == stage:
            state.event(kind, microbatch, position).succeed()  # the next chunk lives on this same device
            return None
        send = self.plan.stages[stage].p2p
        start = self.env.now
        # The stage waits for this send and nothing else can start on its link meanwhile: alone on
        # the link, the transfer takes its cost, one timeout.
        alone = not self.plan.overlap_p2p and self._quiet(stage)
        key = (kind, microbatch, position)
        if alone and key not in state.ready:  # nobody waits yet: the timeout is the arrival itself
            sent = state.ready[key] = self._timeout(send.seconds)
            return sent
        event = state.event(kind, microbatch, position)

        def arrived(_sent: simpy.Event) -> None:
            self._record_comm(stage, "p2p", send.link, send.name, start)
            event.succeed()

        sent = self._timeout(send.seconds) if alone else self._transfer(stage, send.link, send.seconds)
        sent.callbacks.append(arrived)
        return sent

    def run_step(self, step: int) -> StepResult:
        self._solo_runs.clear()
        self._behind.clear()
        state = _Step(self, step)
        start = self.env.now
        accounts = [StageAccount() for _ in range(self.plan.pp)]
        done = [self.env.process(self._stage(state, s, accounts[s])) for s in range(self.plan.pp)]
        self.env.run(until=simpy.AllOf(self.env, done))
        return StepResult(self.env.now - start, accounts)


# Steps of fewer micro-batches than this, or than twice what the two short steps of an
# extrapolation play (below), are simulated whole: not worth it.
MIN_EXTRAPOLATED = 16


def simulate_training(plan: TrainingPlan, steps: int, trace: Timeline | None = None) -> TrainingSimulation:
    """Simulate `steps` consecutive steps, each with its own expert-load draw (one step when no
    load is drawn).

    Every micro-batch of a step plays the same costs, so once every stage is past its warm-up
    forwards another `period` micro-batches (1 for 1F1B and GPipe, p for interleaving, which
    takes them p at a time) add the same time and the same breakdown to every stage: the step of
    m micro-batches is the step of m0 plus (m - m0)/period times the difference between the
    steps of m0 + period and m0, where m0 leaves every stage at least one steady-state task.
    Warm-up, cool-down and the gradient reduction after the last backward are simulated in both,
    so only repeats are skipped (tests compare it with the whole simulation over schedules,
    overlaps and stage mixes). A trace keeps the whole simulation: it shows every task."""
    trace = trace or Timeline()
    if plan.runs > 1:
        return _simulate_runs(plan, steps, trace)
    period = plan.pp if plan.schedule == "interleaved" else 1
    virtual = plan.vpp if plan.schedule == "interleaved" else 1
    # Stage 0 has the longest warm-up; GPipe has none (every forward, then every backward).
    warmup = 0 if plan.schedule == "gpipe" else warmup_forwards(plan.pp, virtual, 0, int(plan.overlap_moe_comm))
    short = period * math.ceil(max(plan.pp, math.ceil((warmup + 1) / virtual)) / period)
    if plan.schedule in DUAL_SCHEDULES:
        # Each further steady-state round (F0&B1, F1&B0) on every rank takes one micro-batch per
        # phase: two for DualPipe's two directions, one for DualPipeV; the fewest micro-batches
        # its order runs (2 x pp) already give every rank one such round.
        period = 2 if plan.schedule == "dualpipe" else 1
        short = 2 * plan.pp
    m = plan.microbatches
    if trace.enabled or m < max(MIN_EXTRAPOLATED, 2 * short + 2 * period) or (m - short) % period:
        return _simulate(plan, steps, trace)
    events = 0
    # A stage slower than the rest (an MTP module or the LM head on the last one) first absorbs
    # extra micro-batches into its own idle time, at a lower rate than its busy time grows, and
    # only then settles: a steady state adds at least the busiest stage's added work. Sends in the
    # background share links across micro-batches in patterns that repeat over several of them,
    # so there the same increment must also come twice over. Until then the short step doubles.
    probes = 3 if plan.overlap_p2p else 2
    while m >= 2 * short + 2 * period:  # the probes well below the whole step
        runs = [_simulate(replace(plan, microbatches=short + i * period), steps, trace) for i in range(probes)]
        events += sum(run.events for run in runs)
        if all(_steady(*pair) for pair in zip(*(run.steps for run in runs))):
            repeats = (m - short) / period
            return TrainingSimulation([_extrapolated(a, b, repeats) for a, b in zip(runs[0].steps, runs[1].steps)],
                                      events)
        short = period * math.ceil(2 * short / period)
    return _simulate(plan, steps, trace)  # a pattern that does not settle soon: simulated whole


def _simulate_runs(plan: TrainingPlan, steps: int, trace: Timeline) -> TrainingSimulation:
    """A step of several pipeline schedule runs. Every run fills and drains the pipeline and plays
    the same costs; only the first waits for the step's parameter gathers and only the last
    launches the gradient reductions and the optimizer, so a run between them adds the same time
    and breakdown: the step of R runs is the step of 2 plus R - 2 times the third run's increment.
    Few runs, or a kept trace, are simulated whole."""
    if plan.runs <= 3 or trace.enabled:
        return _simulate(plan, steps, trace)
    two, three = (_simulate(replace(plan, runs=r, microbatches=r * plan.microbatches_per_run), steps, trace)
                  for r in (2, 3))
    return TrainingSimulation([_extrapolated(a, b, plan.runs - 2) for a, b in zip(two.steps, three.steps)],
                              two.events + three.events)


STEADY_TOLERANCE = 1e-9  # relative: increments this close are one repeat, not a transient


def _steady(*probes: StepResult) -> bool:
    """Whether each further `period` of micro-batches added no less than the most busy time it
    added to one stage (no idle time left to absorb them), and (three probes) the same time twice."""
    increments = [b.seconds - a.seconds for a, b in zip(probes, probes[1:])]
    tolerance = STEADY_TOLERANCE * max(probes[-1].seconds, 1e-30)
    added_work = max(c.busy - b.busy for b, c in zip(probes[-2].stages, probes[-1].stages))
    return increments[-1] >= added_work - tolerance and max(increments) - min(increments) <= tolerance


def _extrapolated(base: StepResult, longer: StepResult, repeats: float) -> StepResult:
    """base + repeats x (longer - base), for the step time and every stage's breakdown."""
    def line(a: float, b: float) -> float:
        return a + repeats * (b - a)

    stages = []
    for a, b in zip(base.stages, longer.stages):
        seconds = {part.name: line(getattr(a, part.name), getattr(b, part.name))
                   for part in fields(StageAccount) if part.name != "exposed"}
        exposed = {dimension: line(a.exposed[dimension], b.exposed[dimension]) for dimension in a.exposed}
        stages.append(StageAccount(**seconds, exposed=exposed))
    return StepResult(line(base.seconds, longer.seconds), stages)


# Simulations of plans with the same costs, by content: a sweep's configurations that differ only
# in the global batch extrapolate from the same two short steps, and alike layouts cost alike.
_SIMULATED: Memo[TrainingSimulation] = Memo(256)


def _plan_key(plan: TrainingPlan) -> tuple:
    """Everything the simulator reads from a plan without drawn loads (Costs are frozen values)."""
    stages = tuple((tuple((tuple(c.forward), tuple(c.backward), tuple(tuple(b) for b in c.grad_buckets),
                           tuple(c.param_sync)) for c in stage.chunks), stage.p2p, stage.optimizer)
                   for stage in plan.stages)
    return (stages, plan.microbatches, plan.pp, plan.vpp, plan.schedule, plan.overlap_grad_reduce, plan.overlap_p2p,
            plan.overlap_moe_comm, plan.comm_sm_share, plan.runs)


def _simulate(plan: TrainingPlan, steps: int, trace: Timeline) -> TrainingSimulation:
    # Steps differ only by their expert-load draws; with none drawn every step plays the same
    # costs through the same schedule, so one simulated step is every step.
    varies = any(chunk.sampled for stage in plan.stages for chunk in stage.chunks)
    if varies or trace.enabled:
        return _played(plan, steps if varies else min(steps, 1), trace)
    return _SIMULATED.get(_plan_key(plan), lambda: _played(plan, 1, trace))


def _played(plan: TrainingPlan, steps: int, trace: Timeline) -> TrainingSimulation:
    simulator = _Simulator(plan, trace)
    result = TrainingSimulation()
    for step in range(steps):
        result.steps.append(simulator.run_step(step))
    result.events = simulator.events
    return result
