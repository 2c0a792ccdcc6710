"""Serve a stream of requests with continuous batching: queueing, prefill, decode, and (on edge
devices) experts loaded on demand into an LRU cache.

One replica is simulated explicitly; with dp replicas, it receives every dp-th request (the
others are symmetric). Between arrivals and completions the batch cannot change, so the server
advances all the decode steps of such a stretch in one event: the event count follows requests,
not tokens. One server means one process, so a plain clock replaces a discrete-event engine.

With chunked prefill (serve.chunked_prefill_tokens; Sarathi-Serve, Agrawal et al. OSDI'24, and
vLLM's scheduler) every step is a hybrid batch under a token budget: each running request decodes
one token and the rest of the budget goes to prompt chunks, first come first served; a prompt may
span several steps and its first output token comes at the end of the step that finishes it.
Steps that carry a chunk are one event each (there are about total prompt tokens / budget of
them); stretches of pure decoding stay one event.

With serve.disaggregated (DistServe, Zhong et al. OSDI'24; Splitwise, Patel et al. ISCA'24),
prefill instances run prompts only and emit the first token, each prompt's KV cache crosses a link
to a decode instance, and decode instances run continuous batches of decodes only. Events still
follow changes of batch: a prefill batch, a pull, a transfer's end, a finish.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from simcc.errors import InputError
from simcc.specs.base import MAX_TOKENS
from simcc.specs.workload import LENGTH_DATASETS, EmpiricalLengths, LognormalLengths, ServeSpec, UniformLengths
from simcc.plan.serving import CacheStats, KVLink, ServingCosts, exchange_groups

@dataclass(frozen=True)
class Request:
    arrival: float
    prompt: int
    output: int
    compute_scale: float = 1.0  # input-dependent compute (e.g. threshold activation): 1 = nominal
    width: float | None = None  # anytime networks under a latency budget: the width this request runs


def poisson_requests(rate: float | None, count: int, serve: ServeSpec, seed: int) -> list[Request]:
    """Poisson arrivals at `rate` per second; all at t=0 (a saturating burst) when rate is None.
    Lengths are serve's, or drawn from serve.lengths by the same generator after the arrivals (so
    the arrival times do not depend on whether lengths vary)."""
    rng = np.random.default_rng(seed)
    if rate is None:
        times = np.zeros(count)
    else:
        times = np.cumsum(rng.exponential(1.0 / rate, count))
    if serve.lengths is None:
        return [Request(float(t), serve.prompt_tokens, serve.output_tokens) for t in times]
    prompts, outputs = draw_lengths(serve, count, rng)
    return [Request(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs)]


LengthSource = LognormalLengths | UniformLengths | EmpiricalLengths | None


def _draw_side(source: LengthSource, fixed: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` whole token counts from one side's distribution (`fixed` when it has none), within
    1..MAX_TOKENS."""
    if source is None:
        return np.full(count, fixed, dtype=np.int64)
    if isinstance(source, EmpiricalLengths):  # inverse CDF, linear between the published percentiles
        values = np.interp(rng.random(count) * 100.0, source.percentiles, source.tokens)
    elif isinstance(source, LognormalLengths):
        values = source.median * np.exp(source.sigma * rng.standard_normal(count))
    else:
        values = rng.integers(source.low, source.high + 1, count).astype(float)
    return np.clip(np.rint(values), 1, MAX_TOKENS).astype(np.int64)


def draw_lengths(serve: ServeSpec, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each request's (prompt, output) tokens under serve.lengths, cut to its context window:
    a prompt keeps at least one token of room, an output what the prompt leaves."""
    lengths = serve.lengths
    assert lengths is not None
    prompt_side, output_side = (LENGTH_DATASETS[lengths.dataset] if lengths.dataset is not None
                                else (lengths.prompt, lengths.output))
    prompts = _draw_side(prompt_side, serve.prompt_tokens, count, rng)
    outputs = _draw_side(output_side, serve.output_tokens, count, rng)
    if lengths.max_context is not None:
        prompts = np.minimum(prompts, lengths.max_context - 1)
        outputs = np.minimum(outputs, lengths.max_context - prompts)
    return prompts, outputs


def read_request_csv(path: str) -> list[Request]:
    """A CSV with arrival_s, prompt_tokens, output_tokens and optionally compute_scale. Bounded so
    that no request can overflow the clock or the KV arithmetic (the bounds are in tables.py)."""
    from simcc.specs.tables import MAX_ARRIVAL_S, MAX_COMPUTE_SCALE, MAX_TOKENS, Column, read_table

    columns = [Column("arrival_s", high=MAX_ARRIVAL_S), Column("prompt_tokens", "integer", 1, MAX_TOKENS),
               Column("output_tokens", "integer", 1, MAX_TOKENS),
               Column("compute_scale", low=0.0, above=True, high=MAX_COMPUTE_SCALE, default=1.0)]
    frame = read_table(path, columns, named_by="--requests-trace").frame
    frame = frame.sort_values("arrival_s", kind="stable")
    return [Request(float(r.arrival_s), int(r.prompt_tokens), int(r.output_tokens), float(r.compute_scale))
            for r in frame.itertuples()]


@dataclass(frozen=True)
class WidthChoice:
    """Which width each request runs (Request.width set), and how many found none within budget."""

    requests: list[Request]
    over_budget: int  # requests no width fits: they run the narrowest


def choose_widths(requests: list[Request], costs: ServingCosts, serve: ServeSpec, budget_s: float) -> WidthChoice:
    """Anytime inference (TIPS, Li et al. 2023: one supernet, a sub-network per runtime budget): each
    request runs the widest width whose predicted latency (WidthTables.latency, from the same step
    tables the simulator plays) fits the budget; longer or harder requests get narrower widths. A
    request no width fits runs the narrowest, and is counted so the estimate can say so."""
    chosen, over = [], 0
    for request in requests:
        fits = [t.width for t in costs.widths
                if t.latency(request.prompt, request.output, request.compute_scale, serve) <= budget_s]
        over += not fits
        chosen.append(replace(request, width=fits[-1] if fits else costs.widths[0].width))
    return WidthChoice(chosen, over)


@dataclass
class ServingResult:
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    queueing: list[float] = field(default_factory=list)
    output_tokens: int = 0
    span: float = 0.0
    busy: float = 0.0
    loading: float = 0.0
    events: int = 0
    cache: CacheStats | None = None
    # per finished request: (time to first token, time per later output token, output tokens)
    finished: list[tuple[float, float, int]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@dataclass
class RunningRequest:
    """A request in the batch, past its prefill, still producing output tokens."""

    request: Request
    tokens_left: int
    first_token_time: float


@dataclass
class PrefillingRequest:
    """A request in the batch whose prompt is still being prefilled chunk by chunk."""

    request: Request
    started: float  # when its first chunk's step began
    done: int = 0  # prompt tokens already in the KV cache


class _ReplicaServer:
    """One replica's continuous-batching loop. A single server, so no event engine is needed: a
    clock that jumps from one step boundary to the next gives the same times and event count."""

    def __init__(self, costs: ServingCosts, serve: ServeSpec, arrivals: list[Request], source: str) -> None:
        self.costs = costs
        self.serve = serve
        self.cache = costs.cache
        self.arrivals = arrivals
        self.source = source
        memory = costs.memory
        self.kv_capacity = memory.capacity - (memory.total - memory.kv_cache)
        self.result = ServingResult(cache=costs.cache)
        self.now = 0.0
        self.upcoming = 0  # index of the next request not yet arrived
        self.queue: deque[Request] = deque()
        self.running: list[RunningRequest] = []
        self.prefilling: list[PrefillingRequest] = []  # chunked prefill only, in arrival order
        self.kv_used = 0.0
        self.budget = serve.chunked_prefill_tokens
        self.kv_needs: dict[int, float] = {}  # tokens: KV bytes
        self.decode_tables: dict[int, tuple[float, float]] = {}  # batch size: (decode step, expert loading)
        self.nominal_compute = all(r.compute_scale == 1.0 for r in arrivals)

    def run(self) -> ServingResult:
        start = self.arrivals[0].arrival if self.arrivals else 0.0
        while self.upcoming < len(self.arrivals) or self.queue or self.running or self.prefilling:
            self._enqueue_arrivals()
            if not self.queue and not self.running and not self.prefilling:
                self._advance(self.arrivals[self.upcoming].arrival - self.now)  # idle until the next arrival
                continue
            if self.budget is not None:
                if self._hybrid_step():
                    self._complete(self._finished())
                    continue
            else:
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
            finished = self._finished()
            if self.running and not finished:
                self._decode_stretch()
                finished = self._finished()
            self._complete(finished)
        self.result.span = self.now - start
        return self.result

    def _advance(self, seconds: float) -> None:
        """One simulated event: the clock moves on by `seconds`."""
        self.result.events += 1
        self.now += seconds

    def _kv_need(self, request: Request) -> float:
        """The request's whole KV cache (its own prompt and output), reserved when it is admitted."""
        tokens = request.prompt + request.output
        need = self.kv_needs.get(tokens)
        if need is None:  # read three times per request: once per length
            need = self.kv_needs[tokens] = self.costs.kv_bytes(tokens)
        return need

    def _fits(self) -> bool:
        """Whether the next queued request has a batch slot and room for its KV cache."""
        return (bool(self.queue) and len(self.running) + len(self.prefilling) < self.serve.batch
                and self.kv_used + self._kv_need(self.queue[0]) <= self.kv_capacity)

    def _never_fits(self, request: Request | None = None) -> InputError:
        """The error for a request (default: the queue's head) that an empty batch cannot admit."""
        need = self._kv_need(request if request is not None else self.queue[0])
        return InputError(self.source, "serve", f"one request's KV cache ({need / 1e9:.3g} GB) "
                          f"does not fit in the {max(self.kv_capacity, 0) / 1e9:.3g} GB left after weights and reserve")

    def _enqueue_arrivals(self) -> None:
        while self.upcoming < len(self.arrivals) and self.arrivals[self.upcoming].arrival <= self.now:
            self.queue.append(self.arrivals[self.upcoming])
            self.upcoming += 1

    def _admit(self) -> list[Request]:
        """Move queued requests into the batch, first come first served, while the batch has a slot
        and their KV cache fits; an empty batch that can admit nothing never will."""
        admitted: list[Request] = []
        while (self.queue and len(self.running) + len(admitted) < self.serve.batch
               and self.kv_used + self._kv_need(self.queue[0]) <= self.kv_capacity):
            request = self.queue.popleft()
            self.kv_used += self._kv_need(request)
            admitted.append(request)
        if not admitted and not self.running:
            raise self._never_fits()
        return admitted

    def _prefill(self, admitted: list[Request]) -> None:
        """Process the admitted prompts together; each request's first token comes at the end.
        Without hybrid tables, the nominal prompt's table scaled by each prompt's tokens; with
        them (prompts of varying length), one step of all the prompts' tokens plus each prompt's
        own causal attention, which grows with its length squared."""
        hybrid = self.costs.hybrid
        load = self.cache.prefill_load_seconds * len(admitted)
        if hybrid is None:
            scale = statistics.fmean(r.compute_scale * self.costs.width_factor(r.width, len(admitted), decode=False)
                                     * r.prompt / self.serve.prompt_tokens for r in admitted)
            seconds = self.costs.prefill.at(len(admitted)) * scale + load
        else:
            tokens = sum(r.prompt for r in admitted)
            step = hybrid.tokens(tokens)
            seconds = sum(r.compute_scale * self.costs.width_factor(r.width, len(admitted), decode=False)
                          * (step * r.prompt / tokens + hybrid.chunk(r.prompt, 0)) for r in admitted) + load
        self._advance(seconds)
        self.result.busy += seconds
        self.result.loading += load
        for request in admitted:
            self.result.queueing.append(self.now - seconds - request.arrival)
            self.result.ttft.append(self.now - request.arrival)
            self.running.append(RunningRequest(request, request.output - 1, self.now))

    def _decode_step(self) -> tuple[float, float, float]:
        """The running batch's next decode step: (seconds, of which expert loading, seconds added
        per later step as every context grows by a token). Without hybrid tables every step reads
        the decode table's reference context (growth 0); with them, the requests' own contexts."""
        batch = len(self.running)
        tables = self.decode_tables.get(batch)
        if tables is None:  # the same two table reads for every step of this batch size
            tables = self.decode_tables[batch] = (
                self.costs.decode.at(batch),
                float(np.interp(batch, self.costs.decode.batch_sizes, self.cache.decode_load_seconds)))
        seconds, load = tables
        if self.costs.widths:
            scale = statistics.fmean(r.request.compute_scale * self.costs.width_factor(r.request.width, batch, decode=True)
                                     for r in self.running)
        elif self.nominal_compute:  # every scale is 1: their mean is exactly 1
            scale = 1.0
        else:  # every width factor is 1 (the same mean, without a call per request)
            scale = statistics.fmean(r.request.compute_scale for r in self.running)
        step = seconds * scale + load
        hybrid = self.costs.hybrid
        if hybrid is None:
            return step, load, 0.0
        # the next step attends over the prompt and every output token so far (the newest included)
        context = statistics.fmean(r.request.prompt + r.request.output - r.tokens_left for r in self.running)
        growth = scale * hybrid.decode_context(batch, hybrid.reference_context + 1)
        return step + scale * hybrid.decode_context(batch, context), load, growth

    def _decode_stretch(self) -> None:
        """Run decode steps of the unchanged batch until a request finishes or, with a free slot,
        until the iteration boundary after the next arrival, which may join the batch."""
        step, load, growth = self._decode_step()
        steps = min(r.tokens_left for r in self.running)
        horizon = self._next_join()
        if horizon is not None:
            steps = min(steps, max(1, math.ceil((horizon - self.now) / step)))
        seconds = steps * step + growth * steps * (steps - 1) / 2  # contexts grow a token per step
        self._advance(seconds)
        self.result.busy += seconds
        self.result.loading += steps * load
        for r in self.running:
            r.tokens_left -= steps

    def _next_join(self) -> float | None:
        """When a request may next join the running batch (None: not before one finishes): the
        next arrival, while the batch has a free slot."""
        if self.upcoming < len(self.arrivals) and len(self.running) < self.serve.batch:
            return self.arrivals[self.upcoming].arrival
        return None

    def _hybrid_step(self) -> bool:
        """One chunked-prefill step, if any prompt has work: every running request decodes a token,
        and the budget left goes to prompt chunks, partly prefilled prompts first, then queued
        requests admitted in arrival order while a slot and their KV cache fit (vLLM's scheduler:
        running decodes, then prefill chunks, under max_num_batched_tokens). False when no prompt
        has work; the caller then runs a stretch of plain decode steps."""
        budget = self.budget - len(self.running)
        chunks: list[tuple[PrefillingRequest, int]] = []
        for waiting in self.prefilling:
            if budget <= 0:
                break
            take = min(waiting.request.prompt - waiting.done, budget)
            chunks.append((waiting, take))
            budget -= take
        while budget > 0 and self._fits():
            request = self.queue.popleft()
            self.kv_used += self._kv_need(request)
            waiting = PrefillingRequest(request, self.now)
            self.prefilling.append(waiting)
            take = min(request.prompt, budget)
            chunks.append((waiting, take))
            budget -= take
        if not chunks:
            if not self.running:
                raise self._never_fits()
            return False
        seconds, load = self._hybrid_seconds(chunks)
        self._advance(seconds)
        self.result.busy += seconds
        self.result.loading += load
        for r in self.running:
            r.tokens_left -= 1
        for waiting, take in chunks:
            waiting.done += take
            request = waiting.request
            if waiting.done == request.prompt:  # its prompt is cached: the first output token is out
                self.result.queueing.append(waiting.started - request.arrival)
                self.result.ttft.append(self.now - request.arrival)
                self.running.append(RunningRequest(request, request.output - 1, self.now))
        self.prefilling = [w for w in self.prefilling if w.done < w.request.prompt]
        return True

    def _hybrid_seconds(self, chunks: list[tuple[PrefillingRequest, int]]) -> tuple[float, float]:
        """(seconds, of which expert loading) of one hybrid step: the running batch's decode step,
        the token-parallel work the chunks add to it (one forward over all the step's tokens), and
        each chunk's attention over its own tokens and its prompt's earlier ones. A chunk carries
        its request's compute scale and width, and its share of the request's prefill expert loads."""
        hybrid = self.costs.hybrid
        assert hybrid is not None
        decodes = len(self.running)
        seconds, load = self._decode_step()[:2] if decodes else (0.0, 0.0)
        tokens = sum(take for _, take in chunks)
        added = hybrid.tokens(decodes + tokens) - hybrid.tokens(decodes)
        for waiting, take in chunks:
            request = waiting.request
            scale = request.compute_scale * self.costs.width_factor(request.width, 1, decode=False)
            seconds += scale * (added * take / tokens + hybrid.chunk(take, waiting.done))
            chunk_load = self.cache.prefill_load_seconds * take / request.prompt
            seconds += chunk_load
            load += chunk_load
        return seconds, load

    def _finished(self) -> list[RunningRequest]:
        return [r for r in self.running if r.tokens_left <= 0]

    def _complete(self, finished: list[RunningRequest]) -> None:
        """Record finished requests and free their batch slots and KV cache."""
        if not finished:
            return
        self.running = [r for r in self.running if r.tokens_left > 0]
        for r in finished:
            request = r.request
            self.kv_used -= self._kv_need(request)
            self.result.latency.append(self.now - request.arrival)
            self.result.output_tokens += request.output
            tpot = (self.now - r.first_token_time) / (request.output - 1) if request.output > 1 else 0.0
            if request.output > 1:
                self.result.tpot.append(tpot)
            self.result.finished.append((r.first_token_time - request.arrival, tpot, request.output))


def simulate_serving(costs: ServingCosts, serve: ServeSpec, requests: list[Request], replicas: int,
                     source: str = "workload") -> ServingResult:
    """`source` names the workload file in the error raised when a request can never be admitted."""
    mine = requests[::replicas] if replicas > 1 else requests
    return _ReplicaServer(costs, serve, mine, source).run()


# ------------------------------------------------------------------ prefill/decode disaggregation

@dataclass
class DisaggregatedResult:
    """One group of instances that exchange KV caches (plan.serving.exchange_groups), its requests
    served: `serving` as a colocated replica reports them (busy: the mean instance's seconds), and
    what each pool and the KV transfers took."""

    serving: ServingResult
    groups: int  # alike groups; the one simulated stands for each
    prefill_instances: int  # in the group
    decode_instances: int
    prefill_busy: float  # seconds, all the group's prefill instances together
    decode_busy: float
    transfer: list[float] = field(default_factory=list)  # per request: seconds on the link
    shard_bytes: list[float] = field(default_factory=list)  # per request: what each device sends
    handoff: list[float] = field(default_factory=list)  # per request: its first token to its joining the decode batch


class _PrefillServer(_ReplicaServer):
    """A prefill instance: a replica whose requests end at their first token (DistServe and
    Splitwise emit it on the prefill instance), so its batches hold prompts only: whole prompts
    together, or prompt chunks under the token budget with no decodes mixed in. It holds a
    prompt's KV cache only while prefilling (the transfer is assumed to drain it)."""

    def __init__(self, costs: ServingCosts, serve: ServeSpec, arrivals: list[Request], source: str) -> None:
        prompts = [Request(r.arrival, r.prompt, 1, r.compute_scale, r.width) for r in arrivals]
        super().__init__(costs, serve, prompts, source)
        self.original = {id(p): r for p, r in zip(prompts, arrivals)}
        self.done: list[tuple[Request, float]] = []  # (the request as it arrived, its first token's time)

    def _complete(self, finished: list[RunningRequest]) -> None:
        super()._complete(finished)
        self.done += [(self.original[id(r.request)], self.now) for r in finished]


@dataclass(frozen=True)
class _Handoff:
    """A prefilled request bound for a decode instance."""

    request: Request
    ready: float  # its first token is out and its prompt's KV cache can move
    sender: int  # the prefill instance holding that cache


class _LinkPorts:
    """Each instance's port carries one transfer at a time: a transfer starts once both its
    sender's and its receiver's ports are free, in the order decode instances pull them
    (serialized per port, no fair sharing)."""

    def __init__(self, link: KVLink, senders: int, receivers: int) -> None:
        self.link = link
        self.sender_free = [0.0] * senders
        self.receiver_free = [0.0] * receivers
        self.busy = 0.0
        self.times: dict[float, float] = {}  # shard bytes: seconds on the link

    def transfer(self, sender: int, receiver: int, now: float, shard_bytes: float) -> tuple[float, float]:
        """(when the transfer ends, its seconds on the link)."""
        seconds = self.times.get(shard_bytes)
        if seconds is None:
            seconds = self.times[shard_bytes] = self.link.seconds(shard_bytes)
        end = max(now, self.sender_free[sender], self.receiver_free[receiver]) + seconds
        self.sender_free[sender] = self.receiver_free[receiver] = end
        self.busy += seconds
        return end, seconds


class _DecodeServer(_ReplicaServer):
    """A decode instance's continuous batch. Like DistServe's decode instances, it pulls a
    prefilled request's KV cache when it has a batch slot and room for the request's whole cache
    (prompt and output), first come first served; the request joins the batch at the step boundary
    after its transfer ends, while the batch decodes on. Driven one event at a time by
    `_serve_decodes`, which keeps every instance's pulls in time order across the shared ports."""

    def __init__(self, costs: ServingCosts, serve: ServeSpec, handoffs: list[_Handoff], index: int,
                 ports: _LinkPorts, record: DisaggregatedResult, source: str) -> None:
        super().__init__(costs, serve, [], source)
        self.nominal_compute = all(h.request.compute_scale == 1.0 for h in handoffs)
        self.handoffs = handoffs  # by ready time
        self.next = 0
        self.index = index
        self.ports = ports
        self.record = record
        self.waiting: deque[_Handoff] = deque()
        self.moving: list[tuple[float, int, _Handoff]] = []  # heap of (transfer end, pull order, request): slot and KV held
        self.pulls = 0

    def has_work(self) -> bool:
        return bool(self.next < len(self.handoffs) or self.waiting or self.moving or self.running)

    def event(self) -> None:
        """Take ready requests, pull what fits, let finished transfers join, then decode until
        the batch changes (or wait for the next transfer or ready request)."""
        while self.next < len(self.handoffs) and self.handoffs[self.next].ready <= self.now:
            self.waiting.append(self.handoffs[self.next])
            self.next += 1
        self._pull()
        self._join()
        if self.running:
            self._decode_stretch()
            self._complete(self._finished())
            return
        if self.waiting and not self.moving:  # an empty instance can take none of them
            raise self._never_fits(self.waiting[0].request)
        upcoming = [self.moving[0][0]] if self.moving else []
        if self.next < len(self.handoffs):
            upcoming.append(self.handoffs[self.next].ready)
        self._advance(min(upcoming) - self.now)

    def _pull(self) -> None:
        while (self.waiting and len(self.running) + len(self.moving) < self.serve.batch
               and self.kv_used + self._kv_need(self.waiting[0].request) <= self.kv_capacity):
            handoff = self.waiting.popleft()
            self.kv_used += self._kv_need(handoff.request)
            shard = self.costs.kv_bytes(handoff.request.prompt)  # the prompt's cache; the decode writes the rest
            end, seconds = self.ports.transfer(handoff.sender, self.index, self.now, shard)
            heapq.heappush(self.moving, (end, self.pulls, handoff))
            self.pulls += 1
            self.record.transfer.append(seconds)
            self.record.shard_bytes.append(shard)

    def _join(self) -> None:
        while self.moving and self.moving[0][0] <= self.now:
            h = heapq.heappop(self.moving)[2]
            self.running.append(RunningRequest(h.request, h.request.output - 1, h.ready))
            self.record.handoff.append(self.now - h.ready)

    def _next_join(self) -> float | None:
        """The next transfer's end, or the next prefilled request's readiness while a slot is free
        and none waits ahead of it (a waiting request is pulled only when a request finishes)."""
        times = [self.moving[0][0]] if self.moving else []
        if not self.waiting and self.next < len(self.handoffs) and len(self.running) + len(self.moving) < self.serve.batch:
            times.append(self.handoffs[self.next].ready)
        return min(times) if times else None


def _serve_decodes(servers: list[_DecodeServer]) -> None:
    """Run the decode instances together, always the one whose clock is earliest next, so that
    their pulls reach the shared ports in time order."""
    heap = [(s.now, i) for i, s in enumerate(servers) if s.has_work()]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        server = servers[i]
        server.event()
        if server.has_work():
            heapq.heappush(heap, (server.now, i))


def simulate_disaggregated(costs: ServingCosts, serve: ServeSpec, requests: list[Request], link: KVLink,
                           source: str = "workload") -> DisaggregatedResult:
    """Prefill on one pool, decode on another (serve.disaggregated): request i goes to prefill
    instance i mod P (round robin, which for like requests matches DistServe's and Splitwise's
    shortest-queue dispatch) and decode instance i mod D. The prefill pool does not wait for the
    decode pool (prefilled caches are assumed to fit where they wait), so it runs first; then the
    decode instances pull, transfer and decode. TTFT is the prefill's; the transfer delays the
    second token, and so counts in TPOT."""
    spec = serve.disaggregated
    assert spec is not None
    groups = exchange_groups(spec)
    mine = requests[::groups] if groups > 1 else requests
    prefills, decodes = spec.prefill_replicas // groups, spec.decode_replicas // groups
    merged = ServingResult(cache=costs.cache)
    record = DisaggregatedResult(merged, groups, prefills, decodes, 0.0, 0.0)
    first_token: dict[int, float] = {}
    for j in range(prefills):
        server = _PrefillServer(costs, serve, mine[j::prefills], source)
        done = server.run()
        merged.ttft += done.ttft
        merged.queueing += done.queueing
        merged.events += done.events
        merged.loading += done.loading
        record.prefill_busy += done.busy
        first_token.update((id(r), t) for r, t in server.done)
    bound: list[list[_Handoff]] = [[] for _ in range(decodes)]
    for i, request in enumerate(mine):
        ready = first_token[id(request)]
        if request.output == 1:  # nothing left to decode: done at the first token
            merged.latency.append(ready - request.arrival)
            merged.output_tokens += 1
            merged.finished.append((ready - request.arrival, 0.0, 1))
        else:
            bound[i % decodes].append(_Handoff(request, ready, i % prefills))
    ports = _LinkPorts(link, prefills, decodes)
    servers = [_DecodeServer(costs, serve, sorted(b, key=lambda h: h.ready), d, ports, record, source)
               for d, b in enumerate(bound)]
    _serve_decodes(servers)
    for server in servers:
        done = server.result
        merged.tpot += done.tpot
        merged.latency += done.latency
        merged.finished += done.finished
        merged.output_tokens += done.output_tokens
        merged.events += done.events
        merged.loading += done.loading
        record.decode_busy += done.busy
    start = mine[0].arrival if mine else 0.0
    end = max([start, *first_token.values(), *(s.now for s in servers)])
    merged.span = end - start
    merged.busy = (record.prefill_busy + record.decode_busy) / (prefills + decodes)
    return record
