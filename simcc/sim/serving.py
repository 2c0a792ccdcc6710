"""Serve a stream of requests with continuous batching: queueing, prefill, decode, and (on edge
devices) experts loaded on demand into an LRU cache.

One replica is simulated explicitly; with dp replicas, it receives every dp-th request (the
others are symmetric). Between arrivals and completions the batch cannot change, so the server
advances all the decode steps of such a stretch in one event: the event count follows requests,
not tokens.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import simpy

from simcc.errors import InputError
from simcc.specs.tables import read_numeric_csv
from simcc.specs.workload import ServeSpec
from simcc.plan.serving import CacheStats, ServingCosts

@dataclass(frozen=True)
class Request:
    arrival: float
    prompt: int
    output: int
    compute_scale: float = 1.0  # input-dependent compute (e.g. threshold activation): 1 = nominal


def poisson_requests(rate: float | None, count: int, serve: ServeSpec, seed: int) -> list[Request]:
    """Poisson arrivals at `rate` per second; all at t=0 (a saturating burst) when rate is None."""
    rng = np.random.default_rng(seed)
    if rate is None:
        times = np.zeros(count)
    else:
        times = np.cumsum(rng.exponential(1.0 / rate, count))
    return [Request(float(t), serve.prompt_tokens, serve.output_tokens) for t in times]


def read_request_csv(path: str) -> list[Request]:
    """A CSV with arrival_s, prompt_tokens, output_tokens and optionally compute_scale."""
    frame = read_numeric_csv(path, {"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1},
                             optional={"compute_scale": 1.0}, named_by="--requests-trace")
    if (frame["compute_scale"] <= 0).any():
        row = int((frame["compute_scale"] <= 0).idxmax())
        raise InputError(path, f"line {row + 2}: compute_scale", "expected a number > 0")
    frame = frame.sort_values("arrival_s", kind="stable")
    return [Request(float(r.arrival_s), int(r.prompt_tokens), int(r.output_tokens), float(r.compute_scale))
            for r in frame.itertuples()]


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


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def simulate_serving(costs: ServingCosts, serve: ServeSpec, requests: list[Request], replicas: int,
                     source: str = "workload") -> ServingResult:
    """`source` names the workload file in the error raised when a request can never be admitted."""
    mine = requests[::replicas] if replicas > 1 else requests
    cache = costs.cache
    memory = costs.memory
    kv_capacity = memory.capacity - (memory.total - memory.kv_cache)
    env = simpy.Environment()
    result = ServingResult(cache=cache)
    sizes = costs.decode.batch_sizes

    def kv_need(request: Request) -> float:
        return (request.prompt + request.output) * costs.kv_bytes_per_token

    def server():
        queue: list[Request] = []
        running: list[list] = []  # [request, tokens left, first-token time]
        kv_used = 0.0
        upcoming = 0
        start_time = mine[0].arrival if mine else 0.0
        while upcoming < len(mine) or queue or running:
            while upcoming < len(mine) and mine[upcoming].arrival <= env.now:
                queue.append(mine[upcoming])
                upcoming += 1
            if not queue and not running:
                result.events += 1
                yield env.timeout(mine[upcoming].arrival - env.now)
                continue
            admitted = []
            while queue and len(running) + len(admitted) < serve.batch and kv_used + kv_need(queue[0]) <= kv_capacity:
                request = queue.pop(0)
                kv_used += kv_need(request)
                admitted.append(request)
            if not admitted and not running:
                raise InputError(source, "serve", f"one request's KV cache ({kv_need(queue[0]) / 1e9:.3g} GB) does not "
                                 f"fit in the {max(kv_capacity, 0) / 1e9:.3g} GB left after weights and reserve")
            if admitted:
                scale = statistics.fmean(r.compute_scale * r.prompt / serve.prompt_tokens for r in admitted)
                load = cache.prefill_load_seconds * len(admitted)
                prefill = costs.prefill.at(len(admitted)) * scale + load
                result.events += 1
                yield env.timeout(prefill)
                result.busy += prefill
                result.loading += load
                for request in admitted:
                    result.queueing.append(env.now - prefill - request.arrival)
                    result.ttft.append(env.now - request.arrival)
                    running.append([request, request.output - 1, env.now])
            finished = [r for r in running if r[1] <= 0]
            if running and not finished:
                batch = len(running)
                load = float(np.interp(batch, sizes, cache.decode_load_seconds))
                step = costs.decode.at(batch) * statistics.fmean(r[0].compute_scale for r in running) + load
                steps = min(r[1] for r in running)
                if upcoming < len(mine) and batch < serve.batch:
                    # stop at the iteration boundary after the next arrival, which may join the batch
                    steps = min(steps, max(1, math.ceil((mine[upcoming].arrival - env.now) / step)))
                result.events += 1
                yield env.timeout(steps * step)
                result.busy += steps * step
                result.loading += steps * load
                for r in running:
                    r[1] -= steps
                finished = [r for r in running if r[1] <= 0]
            for r in finished:
                request, _, first = r
                running.remove(r)
                kv_used -= kv_need(request)
                result.latency.append(env.now - request.arrival)
                result.output_tokens += request.output
                if request.output > 1:
                    result.tpot.append((env.now - first) / (request.output - 1))
        result.span = env.now - start_time

    env.process(server())
    env.run()
    return result
