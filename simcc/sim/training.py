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

from simcc.layout import DIMENSIONS, dimension_of
from simcc.memo import Memo
from simcc.sim.links import FairShareLink
from simcc.sim.timeline import Timeline
from simcc.plan.training import ChunkPlan, Cost, TrainingPlan

Task = tuple[str, int, int]  # ("F" | "B", micro-batch, chunk)


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

    def _work(self, chunk: ChunkPlan) -> tuple[list[Segment], list[Segment]]:
        forward, backward = chunk.step_work(self.step)
        merge = not self.sim.trace.enabled
        return _segments(forward, merge), _segments(backward, merge)

    def event(self, kind: str, microbatch: int, global_chunk: int) -> simpy.Event:
        key = (kind, microbatch, global_chunk)
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
        extra = 1 if plan.overlap_moe_comm else 0
        orders = [task_order(plan.schedule, plan.pp, self.virtual, plan.microbatches, s, extra) for s in range(plan.pp)]
        self.orders = [merged_order(o) if plan.overlap_moe_comm else [(t,) for t in o] for o in orders]
        self.events = 0  # timed events scheduled: compute segments and link transfers
        self.background = [0] * plan.pp  # per stage: background transfer chains not yet finished
        # Per step, by segment list object: every micro-batch plays the same lists, so their solo
        # runs and overlapped forms are worked out once.
        self._solo_runs: Memo[tuple[int, float, float, dict[str, float]]] = Memo(1 << 20)
        self._behind: Memo[dict[str, list[Segment]]] = Memo(1 << 20)

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
        p, chunks = plan.pp, plan.stages[stage].chunks
        last_global = p * self.virtual - 1
        stage_plan = plan.stages[stage]
        # ZeRO: this step's forward of a chunk needs its freshly gathered parameters.
        gathers = [self._launch_chain(stage, chunk.param_sync, "param_gather") for chunk in chunks]
        if not plan.overlap_grad_reduce:
            start = env.now
            yield simpy.AllOf(env, gathers)
            account.wait(env.now - start)
        backward_left = [plan.microbatches] * len(chunks)
        buckets: list[simpy.Event] = []

        def awaited(kind: str, microbatch: int, chunk_index: int) -> simpy.Event | None:
            """What a task consumes, when it has not arrived: the activation (forward) or the
            gradient from the next chunk (backward)."""
            global_chunk = chunk_index * p + stage
            if kind == "F":
                event = state.event("act", microbatch, global_chunk - 1) if global_chunk > 0 else None
            else:
                event = state.event("grad", microbatch, global_chunk + 1) if global_chunk < last_global else None
            return None if event is None or event.processed else event

        def sent(kind: str, microbatch: int, chunk_index: int) -> simpy.Event | None:
            """Hand the activation (forward) or gradient (backward) on; the send, when one is made."""
            global_chunk = chunk_index * p + stage
            if kind == "F" and global_chunk < last_global:
                return self._hand_off(state, stage, "act", microbatch, global_chunk)
            if kind == "B" and global_chunk > 0:
                return self._hand_off(state, stage, "grad", microbatch, global_chunk)
            return None

        def bucket_launch(chunk_index: int):
            """The last backward of a chunk launches its gradient reductions (with overlap)."""
            backward_left[chunk_index] -= 1
            last = backward_left[chunk_index] == 0 and plan.overlap_grad_reduce
            return (chunks[chunk_index].grad_buckets, buckets) if last else None

        for item in self.orders[stage]:
            if len(item) == 2:  # a forward and an earlier micro-batch's backward hide each other's all-to-alls
                (_, _, fchunk), (_, _, bchunk) = item
                work = self._paired_work(state.work[stage][fchunk][0], state.work[stage][bchunk][1])
            else:
                work = {}
            for kind, microbatch, chunk_index in item:
                if kind == "F" and not gathers[chunk_index].triggered:  # ZeRO: its parameters first
                    start = env.now
                    yield gathers[chunk_index]
                    account.wait(env.now - start)
                event = awaited(kind, microbatch, chunk_index)
                if event is not None:
                    yield event
                forward, backward = state.work[stage][chunk_index]
                if kind == "F":
                    yield from self._run_segments(stage, work.get("F", forward), account)
                else:
                    yield from self._run_segments(stage, work.get("B", backward), account, bucket_launch(chunk_index))
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

    def _hand_off(self, state: _Step, stage: int, kind: str, microbatch: int, global_chunk: int) -> simpy.Event | None:
        """The activation or gradient goes to the next stage; a callback on the send (not a process
        per send) marks it ready there. Returns the send, None when no link is crossed."""
        if self.plan.pp == 1:
            state.event(kind, microbatch, global_chunk).succeed()  # the next chunk lives on this same device
            return None
        send = self.plan.stages[stage].p2p
        start = self.env.now
        # The stage waits for this send and nothing else can start on its link meanwhile: alone on
        # the link, the transfer takes its cost, one timeout.
        alone = not self.plan.overlap_p2p and self._quiet(stage)
        key = (kind, microbatch, global_chunk)
        if alone and key not in state.ready:  # nobody waits yet: the timeout is the arrival itself
            sent = state.ready[key] = self._timeout(send.seconds)
            return sent
        event = state.event(kind, microbatch, global_chunk)

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
    period = plan.pp if plan.schedule == "interleaved" else 1
    virtual = plan.vpp if plan.schedule == "interleaved" else 1
    # Stage 0 has the longest warm-up; GPipe has none (every forward, then every backward).
    warmup = 0 if plan.schedule == "gpipe" else warmup_forwards(plan.pp, virtual, 0, int(plan.overlap_moe_comm))
    short = period * math.ceil(max(plan.pp, math.ceil((warmup + 1) / virtual)) / period)
    m = plan.microbatches
    if trace.enabled or m < max(MIN_EXTRAPOLATED, 2 * short + 2 * period) or (m - short) % period:
        return _simulate(plan, steps, trace)
    base = _simulate(replace(plan, microbatches=short), steps, trace)
    longer = _simulate(replace(plan, microbatches=short + period), steps, trace)
    repeats = (m - short) / period
    return TrainingSimulation([_extrapolated(a, b, repeats) for a, b in zip(base.steps, longer.steps)],
                              base.events + longer.events)


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
            plan.overlap_moe_comm, plan.comm_sm_share)


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
