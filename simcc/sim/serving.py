"""Serve a stream of requests with continuous batching: queueing, prefill, decode, and (on edge
devices) experts loaded on demand into an LRU cache.

One replica is simulated explicitly; with dp replicas, it receives every dp-th request (the
others are symmetric). Between arrivals and completions the batch cannot change, so the server
advances all the decode steps of such a stretch in one event: the event count follows requests,
not tokens. One server means one process, so a plain clock replaces a discrete-event engine.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from simcc.errors import InputError
from simcc.specs.workload import ServeSpec
from simcc.plan.serving import CacheStats, ServingCosts

@dataclass(frozen=True)
class Request:
    arrival: float
    prompt: int
    output: int
    compute_scale: float = 1.0  # input-dependent compute (e.g. threshold activation): 1 = nominal
    width: float | None = None  # anytime networks under a latency budget: the width this request runs


def poisson_requests(rate: float | None, count: int, serve: ServeSpec, seed: int) -> list[Request]:
    """Poisson arrivals at `rate` per second; all at t=0 (a saturating burst) when rate is None."""
    rng = np.random.default_rng(seed)
    if rate is None:
        times = np.zeros(count)
    else:
        times = np.cumsum(rng.exponential(1.0 / rate, count))
    return [Request(float(t), serve.prompt_tokens, serve.output_tokens) for t in times]


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
        self.kv_used = 0.0

    def run(self) -> ServingResult:
        start = self.arrivals[0].arrival if self.arrivals else 0.0
        while self.upcoming < len(self.arrivals) or self.queue or self.running:
            self._enqueue_arrivals()
            if not self.queue and not self.running:
                self._advance(self.arrivals[self.upcoming].arrival - self.now)  # idle until the next arrival
                continue
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
        return (request.prompt + request.output) * self.costs.kv_bytes_per_token

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
            raise InputError(self.source, "serve", f"one request's KV cache ({self._kv_need(self.queue[0]) / 1e9:.3g} GB) "
                             f"does not fit in the {max(self.kv_capacity, 0) / 1e9:.3g} GB left after weights and reserve")
        return admitted

    def _prefill(self, admitted: list[Request]) -> None:
        """Process the admitted prompts together; each request's first token comes at the end."""
        scale = statistics.fmean(r.compute_scale * self.costs.width_factor(r.width, len(admitted), decode=False)
                                 * r.prompt / self.serve.prompt_tokens for r in admitted)
        load = self.cache.prefill_load_seconds * len(admitted)
        seconds = self.costs.prefill.at(len(admitted)) * scale + load
        self._advance(seconds)
        self.result.busy += seconds
        self.result.loading += load
        for request in admitted:
            self.result.queueing.append(self.now - seconds - request.arrival)
            self.result.ttft.append(self.now - request.arrival)
            self.running.append(RunningRequest(request, request.output - 1, self.now))

    def _decode_stretch(self) -> None:
        """Run decode steps of the unchanged batch until a request finishes or, with a free slot,
        until the iteration boundary after the next arrival, which may join the batch."""
        batch = len(self.running)
        load = float(np.interp(batch, self.costs.decode.batch_sizes, self.cache.decode_load_seconds))
        scales = (r.request.compute_scale * self.costs.width_factor(r.request.width, batch, decode=True)
                  for r in self.running)
        step = self.costs.decode.at(batch) * statistics.fmean(scales) + load
        steps = min(r.tokens_left for r in self.running)
        if self.upcoming < len(self.arrivals) and batch < self.serve.batch:
            steps = min(steps, max(1, math.ceil((self.arrivals[self.upcoming].arrival - self.now) / step)))
        self._advance(steps * step)
        self.result.busy += steps * step
        self.result.loading += steps * load
        for r in self.running:
            r.tokens_left -= steps

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
