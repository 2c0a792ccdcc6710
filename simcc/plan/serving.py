"""Costs of serving steps, in seconds, for the serving simulator to schedule.

Prefill and decode are costed from the same block work as training (forward only), over a
grid of batch sizes; pipeline stages run in sequence for one step. On edge devices, expert
weights that do not fit stay on the storage tier: this module says how many bytes one expert
is and how many experts stay resident; the simulator's expert cache decides what loads when.
"""

from __future__ import annotations

import heapq
import math
import statistics
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, fields, replace

import numpy as np

from simcc.costs.collectives import collective_time
from simcc.costs.memory import MemoryBreakdown, serving_memory
from simcc.errors import InputError
from simcc.layout import CommGroup, Layout
from simcc.model.blocks import Batch, MoEStats
from simcc.model.anytime import scale_units, served_units
from simcc.model.graph import Block, Unit, block_params, stage_units
from simcc.model.kinds import costing_of
from simcc.model.ops import DTYPE_BYTES, Comm, Op
from simcc.routing.gating import popularity
from simcc.routing.locality import StepRouting
from simcc.specs.hardware import System
from simcc.specs.vocab import bytes_per_weight
from simcc.specs.workload import DisaggregatedSpec, ExpertCacheSpec, LMHeadBlock, MoEFFNBlock, ServeSpec, Workload
from simcc.plan.training import Cost, ForwardWork, cost_item, footprint, forward_work


CACHE_SAMPLE_CYCLES = 6  # request cycles (one prefill, then its decode steps) in the cache profile
CACHE_SAMPLE_DECODE_STEPS = 64  # decode steps per cycle, at most


@dataclass(frozen=True)
class StepTable:
    """Seconds of one serving step against the number of requests in it (piecewise linear)."""

    batch_sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def at(self, batch: float) -> float:
        return float(np.interp(batch, self.batch_sizes, self.seconds))


@dataclass(frozen=True)
class ServingCosts:
    prefill: StepTable  # whole prompts of that many requests
    decode: StepTable  # one output token for that many requests
    memory: MemoryBreakdown
    kv_bytes_per_token: float  # on one device, all its layers
    moe_layers: tuple[MoEFFNBlock, ...]
    expert_bytes: float  # one expert's weights on one device
    resident_experts: int  # experts that stay in memory (all of them unless offloaded)
    storage_bandwidth: float  # bytes/s of the storage tier (0 if none)
    moe: list[MoEStats]
    cache: "CacheStats | None" = None  # the expert cache's misses over sampled routing (offloaded experts)
    # an anytime network under a latency budget: each width's tables, narrowest first (the tables
    # above are the whole supernet's); empty when every request runs the one width above
    widths: tuple["WidthTables", ...] = ()
    # layers that cap what a request caches (sliding windows): (tokens kept, their bytes per token)
    kv_windows: "KVWindows" = ()
    # hybrid steps (chunked prefill, or prompts of varying length): built by with_hybrid_steps
    hybrid: "HybridSteps | None" = None

    def kv_bytes(self, tokens: float) -> float:
        """KV-cache bytes on one device for a request of `tokens` (prompt and output)."""
        return request_kv_bytes(self.kv_bytes_per_token, self.kv_windows, tokens)

    def width_factor(self, width: float | None, batch: float, decode: bool) -> float:
        """How much longer a step of `batch` requests takes at `width` than the tables above say:
        a request's share of a mixed-width step is its width's step over `batch` (assumed)."""
        if width is None:
            return 1.0
        tables = next(t for t in self.widths if t.width == width)
        mine, whole = (tables.decode, self.decode) if decode else (tables.prefill, self.prefill)
        return mine.at(batch) / whole.at(batch)


@dataclass(frozen=True)
class WidthTables:
    """One anytime width's serving step tables."""

    width: float
    prefill: StepTable
    decode: StepTable

    def latency(self, prompt: int, output: int, compute_scale: float, serve: ServeSpec) -> float:
        """Seconds one request takes in a full batch once admitted (queueing excluded): its prompt's
        prefill and its remaining output tokens' decode steps, both at serve.batch."""
        prefill = self.prefill.at(serve.batch) * compute_scale * prompt / serve.prompt_tokens
        return prefill + (output - 1) * self.decode.at(serve.batch) * compute_scale


def batch_grid(max_batch: int) -> tuple[int, ...]:
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def _step_seconds(costs: list[Cost]) -> float:
    """One step runs its stages' compute and communication in sequence."""
    return sum(c.seconds for c in costs if c.stream == "compute") + sum(c.seconds for c in costs if c.stream == "comm")


def _expert_bytes(spec: MoEFFNBlock, hidden: int, stored: str | float) -> float:
    width = spec.expert_hidden * (3 if spec.gated else 2)
    return float(width * hidden * bytes_per_weight(stored))


KVWindows = tuple[tuple[int, float], ...]  # (tokens a capped layer keeps, bytes per token of such layers)


def request_kv_bytes(per_token: float, windows: KVWindows, tokens: float) -> float:
    """KV-cache bytes on one device for a request of `tokens`: every layer's bytes per token, less
    what capped layers evict, since they hold only their last tokens (a sliding window and its
    sinks: model/kinds/attention.py `cached_tokens`)."""
    return tokens * per_token - sum(layer * max(0.0, tokens - cap) for cap, layer in windows)


def _kv_window(block: Block) -> int | None:
    """The most tokens a block keeps per sequence in its KV cache (None: the whole context)."""
    kv_window = costing_of(block.spec).kv_window
    return kv_window(block.spec) if kv_window else None


def _kv_bytes(block: Block, hidden: int, workload: Workload, layout: Layout) -> float:
    """KV-cache bytes per token for one block on one device, as its kind keeps them (0 for kinds
    without a cache)."""
    kv_cache = costing_of(block.spec).kv_cache
    return kv_cache(block.spec, hidden, workload.precision.kv_cache, layout.tp) if kv_cache else 0.0


def serving_costs(workload: Workload, system: System, layout: Layout) -> ServingCosts:
    """Step tables over batch sizes, the heaviest stage's memory, and which experts stay resident."""
    assert workload.serve is not None
    serve = workload.serve
    units = served_units(workload)
    chunks = stage_units(units, layout.pp * layout.vpp, workload.parallelism.pipeline_layout)
    tables = _step_tables(workload, system, layout, chunks)
    stage = _heaviest_stage(workload, layout, chunks, tables.full_batch)
    tokens = serve.prompt_tokens + serve.output_tokens
    kv_total = serve.batch * request_kv_bytes(stage.kv_bytes_per_token, stage.kv_windows, tokens)
    memory = serving_memory(system, layout, stage.weight_bytes + stage.expert_bytes, stage.expert_bytes, kv_total,
                            stage.activation_peak)
    moe_layers = tuple(b.spec for u in units for b in u.blocks if isinstance(b.spec, MoEFFNBlock))
    expert_format = workload.precision.expert_weights or workload.precision.weights
    expert_bytes = (_expert_bytes(moe_layers[0], workload.model.hidden, expert_format) / layout.expert_tp
                    if moe_layers else 0.0)
    resident = sum(spec.experts // layout.ep for spec in moe_layers)
    if expert_bytes and memory.offloaded_weights > 0:  # experts that do not fit stay on the storage tier
        resident = int((stage.expert_bytes - memory.offloaded_weights) // expert_bytes)
    costs = ServingCosts(
        prefill=tables.prefill, decode=tables.decode, memory=memory, kv_bytes_per_token=stage.kv_bytes_per_token,
        moe_layers=moe_layers, expert_bytes=expert_bytes, resident_experts=resident,
        storage_bandwidth=system.storage.bandwidth_gb_s * 1e9 if system.storage else 0.0, moe=tables.moe,
        widths=_width_tables(workload, system, layout, units, tables), kv_windows=stage.kv_windows,
    )
    return replace(costs, cache=measure_expert_cache(costs, serve, workload.seed, workload.name))


def _width_tables(workload: Workload, system: System, layout: Layout, units: list[Unit],
                  whole: _StepTables) -> tuple[WidthTables, ...]:
    """Every width's step tables (`whole`: the supernet's, already built), when a latency budget
    picks a width per request; none otherwise."""
    spec = workload.anytime
    if spec is None or spec.serve_latency_budget_s is None:
        return ()

    def tables_at(width: float) -> _StepTables:
        if width == 1.0:
            return whole
        chunks = stage_units(scale_units(units, width), layout.pp * layout.vpp, workload.parallelism.pipeline_layout)
        return _step_tables(workload, system, layout, chunks)

    return tuple(WidthTables(width, steps.prefill, steps.decode) for width in spec.widths
                 for steps in [tables_at(width)])


@dataclass(frozen=True)
class _StepTables:
    prefill: StepTable
    decode: StepTable
    moe: list[MoEStats]  # decode at the full batch
    full_batch: list[ForwardWork]  # prefill work of a whole batch, per chunk: sizes memory


def decode_context(serve: ServeSpec) -> int:
    """The context the decode table's attention reads: a nominal request's mean over its output
    tokens (its prompt and half its output)."""
    return serve.prompt_tokens + serve.output_tokens // 2


def _step_time(costs: list[Cost], tokens: int, workload: Workload, system: System, layout: Layout) -> float:
    """One serving step's seconds from its stages' item costs: the stages run in sequence, each
    handing its `tokens` output activations to the next, and the step pays the device's overhead."""
    act_bytes = DTYPE_BYTES[workload.precision.communication] * workload.model.hidden
    hop = cost_item(Comm("pp.send", "p2p", tokens * act_bytes, "pp"), system, layout)
    costs = [*costs, Cost(hop.name, "comm", hop.seconds * (layout.pp - 1), link=hop.link)]
    return _step_seconds(costs) + system.device.efficiency.serving_step_us * 1e-6


def step_batch(sequences: int, q_len: int, kv_len: int, sampled: int | None = None) -> Batch:
    """The tokens one serving step brings to a layer: every serving step writes its new tokens'
    keys and values into the KV cache (Batch.caches_kv), which training never keeps."""
    return Batch(sequences, q_len, kv_len, sampled=sampled, caches_kv=True)


def sampled_rows(serve: ServeSpec, prompts: int) -> int | None:
    """Prompt positions a prefill of `prompts` prompts runs the output head on (Batch.sampled):
    each prompt's last, or every position (None) under prompt_logits all."""
    return prompts if serve.prompt_logits == "last" else None


def _step_tables(workload: Workload, system: System, layout: Layout, chunks: list[list[Unit]]) -> _StepTables:
    """Prefill and decode step seconds over a grid of batch sizes; pipeline stages run in sequence."""
    assert workload.serve is not None
    serve = workload.serve
    context = decode_context(serve)
    grid = batch_grid(serve.batch)
    prefill_rows, decode_rows = [], []
    moe_stats: list[MoEStats] = []
    full_batch: list[ForwardWork] = []
    for size in grid:
        prefill_batch = step_batch(size, serve.prompt_tokens, serve.prompt_tokens, sampled_rows(serve, size))
        decode_batch = step_batch(size, 1, context)
        prefill: list[Cost] = []
        decode: list[Cost] = []
        for chunk_units in chunks:
            pre = forward_work(chunk_units, workload, layout, prefill_batch)
            prefill += [cost_item(i, system, layout) for i in pre.items]
            dec = forward_work(chunk_units, workload, layout, decode_batch)
            decode += [cost_item(i, system, layout) for i in dec.items]
            if size == serve.batch:
                moe_stats += dec.moe
                full_batch.append(pre)
        for rows, costs, batch in ((prefill_rows, prefill, prefill_batch), (decode_rows, decode, decode_batch)):
            rows.append(_step_time(costs, batch.tokens, workload, system, layout))
    return _StepTables(StepTable(grid, tuple(prefill_rows)), StepTable(grid, tuple(decode_rows)), moe_stats, full_batch)


@dataclass(frozen=True)
class _StageMemory:
    weight_bytes: float  # dense weights
    expert_bytes: float  # expert weights
    kv_bytes_per_token: float
    activation_peak: float  # the largest op's input and output, alive together
    kv_windows: KVWindows = ()  # the capped layers' share of kv_bytes_per_token, by cap


def _heaviest_stage(workload: Workload, layout: Layout, chunks: list[list[Unit]],
                    full_batch: list[ForwardWork]) -> _StageMemory:
    """The pipeline stage whose weights weigh most: its parameters as the training plan counts them
    (plan.training.footprint), its KV cache per token, and its activation peak."""
    precision = workload.precision
    wbytes = bytes_per_weight(precision.weights)
    expert_wbytes = bytes_per_weight(precision.expert_weights or precision.weights)
    head_wbytes = bytes_per_weight(precision.head_weights or precision.weights)
    hidden = workload.model.hidden
    heaviest = _StageMemory(0.0, 0.0, 0.0, 0.0)
    for stage in range(layout.pp):
        indices = [v * layout.pp + stage for v in range(layout.vpp)]
        params, _, _, _ = footprint([full_batch[i] for i in indices])
        dense, expert = layout.local_params(params)
        kv = head = 0.0
        capped: dict[int, float] = {}
        for b in (b for i in indices for u in chunks[i] for b in u.blocks):
            per_token, cap = _kv_bytes(b, hidden, workload, layout), _kv_window(b)
            kv += per_token
            if cap is not None:
                capped[cap] = capped.get(cap, 0.0) + per_token
            if isinstance(b.spec, LMHeadBlock):  # the output head's weights, at their own format
                head += block_params(b, hidden).dense / layout.tp
        peak = max((2 * item.saved_bytes for i in indices for item in full_batch[i].items if isinstance(item, Op)),
                   default=0.0)
        weights = (dense - head) * wbytes + head * head_wbytes
        if weights + expert * expert_wbytes > heaviest.weight_bytes + heaviest.expert_bytes:
            heaviest = _StageMemory(weights, expert * expert_wbytes, kv, peak, tuple(sorted(capped.items())))
    return heaviest


@dataclass(frozen=True)
class CacheStats:
    hit_rate: float
    decode_load_seconds: tuple[float, ...]  # per decode step, by the decode table's batch sizes (exposed)
    prefill_load_seconds: float  # per prefill of one request (exposed)
    policy: str = "lru (global)"  # lru | lfu per layer with serve.expert_cache; one global LRU without
    per_layer: int | None = None  # experts cached per MoE layer (None: one global cache)
    prefetch_hit_share: float | None = None  # of the experts prefetched, the share the layer needed
    bytes_per_output_token: float = 0.0  # storage-tier bytes a decode step at serve.batch moves, per token
    decode_hidden_seconds: float = 0.0  # per decode step at serve.batch: needed prefetches under compute
    decode_wasted_seconds: float = 0.0  # per decode step at serve.batch: link time on unneeded prefetches


def measure_expert_cache(costs: ServingCosts, serve: ServeSpec, seed: int, source: str = "workload") -> CacheStats:
    """Run an LRU expert cache over sampled routing (prefill, then decode steps, repeatedly) and
    measure its misses; each miss streams one expert from the storage tier. With
    serve.expert_cache, per-layer caches and speculative prefetch instead (`_per_layer_cache`)."""
    if serve.expert_cache is not None:
        return _per_layer_cache(costs, serve, serve.expert_cache, seed, source)
    total = sum(spec.experts for spec in costs.moe_layers)
    sizes = costs.decode.batch_sizes
    if not costs.moe_layers or costs.resident_experts >= total or costs.storage_bandwidth <= 0:
        return CacheStats(1.0, tuple(0.0 for _ in sizes), 0.0)
    rng = np.random.default_rng(seed)
    probs = [popularity(spec, np.random.default_rng(seed + i)) for i, spec in enumerate(costs.moe_layers)]
    load_one = costs.expert_bytes / costs.storage_bandwidth
    hits = lookups = 0
    decode_loads = []
    prefill_misses: list[float] = []  # per request
    decode_steps = min(serve.output_tokens, CACHE_SAMPLE_DECODE_STEPS)
    for size in sizes:
        cache: OrderedDict[tuple[int, int], None] = OrderedDict()
        misses_per_step: list[float] = []
        routing = StepRouting(costs.moe_layers, probs, rng)
        for _cycle in range(CACHE_SAMPLE_CYCLES):
            for decoding, record, share in ((False, prefill_misses, 1.0 / size),
                                            *[(True, misses_per_step, 1.0)] * decode_steps):
                misses = 0
                needed_by_layer = routing.decode(size) if decoding else routing.prefill(size * serve.prompt_tokens)
                for layer, needed in enumerate(needed_by_layer):
                    for expert in needed:
                        key = (layer, int(expert))
                        lookups += 1
                        if key in cache:
                            hits += 1
                            cache.move_to_end(key)
                        else:
                            misses += 1
                            cache[key] = None
                            if len(cache) > costs.resident_experts:
                                cache.popitem(last=False)
                record.append(misses * share)
        warm = misses_per_step[len(misses_per_step) // CACHE_SAMPLE_CYCLES:]  # skip the cold first cycle
        decode_loads.append(statistics.fmean(warm) * load_one)
    prefill = statistics.fmean(prefill_misses) * load_one
    moved = decode_loads[-1] * costs.storage_bandwidth / sizes[-1]  # every miss moves one expert's bytes
    return CacheStats(hits / lookups if lookups else 1.0, tuple(decode_loads), prefill,
                      bytes_per_output_token=moved)


@dataclass(frozen=True)
class StepLoads:
    """One step's expert traffic over all MoE layers: seconds on the critical path, and why."""

    exposed: float = 0.0  # misses (serial) plus prefetch traffic that outlasted the previous layer
    hidden: float = 0.0  # needed prefetches that finished under the previous layer's compute
    wasted: float = 0.0  # link time of prefetched experts the layer did not use
    loads: float = 0  # experts moved (misses and prefetches)
    hits: float = 0  # needed experts already cached before the layer's loads
    lookups: float = 0  # needed experts
    prefetched: float = 0  # experts loaded by the guess
    prefetched_needed: float = 0  # (counts are floats: a mean over steps is one too)

    def __add__(self, other: "StepLoads") -> "StepLoads":
        return StepLoads(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(StepLoads)))


class ExpertCacheReplay:
    """Per-MoE-layer expert caches replayed over routing, one step at a time (Eliseev & Mazur 2023,
    arXiv 2312.17238, section 3.1: each layer keeps its own k experts; LRU evicts the least recently
    used). LFU evicts the expert used least often over the whole run so far (counts survive
    eviction), the least recent among equals. Speculative loading (their section 3.2): while layer
    l-1 computes, the guess for layer l loads on the storage link; it covers each expert layer l
    needs with probability `recall` (at most `prefetch` of them) and fills its other slots with
    unneeded experts drawn by popularity. The first MoE layer has no layer before it to guess from.

    Timing per layer (one storage link, loads in series): prefetch traffic P = (needed + unneeded
    guessed experts not cached) x one expert's load, which runs under the previous layer's compute
    `layer_compute`; what outlasts it, max(0, P - layer_compute), delays the layer (its guessed
    experts and the misses queue behind it); misses load after the gate, in series, as without
    prefetch. Unneeded prefetches thus cost only when they push P past the compute."""

    def __init__(self, experts: list[int], probs: list[np.ndarray], capacity: int, policy: str,
                 prefetch: int, recall: float, load_one: float, rng: np.random.Generator) -> None:
        self.experts, self.probs, self.capacity, self.policy = experts, probs, capacity, policy
        self.prefetch, self.recall, self.load_one, self.rng = prefetch, recall, load_one, rng
        self.caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in experts]  # least recent first
        self.counts = [np.zeros(e, dtype=np.int64) for e in experts]  # uses over the run (LFU)
        self.last = [np.zeros(e, dtype=np.int64) for e in experts]  # tick of the last touch (LFU tie-break)
        # LFU candidates per layer, (uses, last touch, expert), stale entries skipped when popped:
        # an eviction costs O(log cache) however many experts a layer holds
        self.heaps: list[list[tuple[int, int, int]]] = [[] for _ in experts]
        self.tick = 0

    def _touch(self, layer: int, expert: int, used: bool) -> None:
        self.tick += 1
        cache = self.caches[layer]
        cache[expert] = None
        cache.move_to_end(expert)
        self.last[layer][expert] = self.tick
        if used:
            self.counts[layer][expert] += 1
        if self.policy == "lfu":
            heapq.heappush(self.heaps[layer], (int(self.counts[layer][expert]), self.tick, expert))

    def _evict(self, layer: int) -> None:
        cache = self.caches[layer]
        while len(cache) > self.capacity:
            if self.policy == "lru":
                cache.popitem(last=False)
            else:
                counts, last, heap = self.counts[layer], self.last[layer], self.heaps[layer]
                while True:
                    uses, touched, expert = heapq.heappop(heap)
                    if expert in cache and uses == counts[expert] and touched == last[expert]:
                        del cache[expert]
                        break

    def _guess(self, layer: int, needed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(needed experts the guess covers, unneeded experts it adds)."""
        covered = needed[self.rng.random(len(needed)) < self.recall][:self.prefetch]
        slots = self.prefetch - len(covered)
        others = np.setdiff1d(np.arange(self.experts[layer]), needed)
        if slots <= 0 or not len(others):
            return covered, others[:0]
        weights = self.probs[layer][others]
        weights = weights / weights.sum() if weights.sum() > 0 else None
        return covered, self.rng.choice(others, size=min(slots, len(others)), replace=False, p=weights)

    def step(self, needed_by_layer: list[np.ndarray], layer_compute: float) -> StepLoads:
        """One step (a prefill or a decode) given each MoE layer's needed experts, in layer order."""
        total = StepLoads()
        for layer, needed in enumerate(needed_by_layer):
            cache = self.caches[layer]
            cached = {int(e) for e in needed if int(e) in cache}
            covered, extra = self._guess(layer, needed) if self.prefetch and layer > 0 else (needed[:0], needed[:0])
            useful = [int(e) for e in covered if int(e) not in cached]
            wasted = [int(e) for e in extra if int(e) not in cache]
            for e in wasted:  # arrived first, during the previous layer; not used
                self._touch(layer, e, used=False)
            misses = len(needed) - len(cached) - len(useful)
            for e in needed:
                self._touch(layer, int(e), used=True)
            self._evict(layer)
            traffic = (len(useful) + len(wasted)) * self.load_one
            hidden = min(traffic, layer_compute) * len(useful) / (len(useful) + len(wasted)) if traffic else 0.0
            total += StepLoads(max(0.0, traffic - layer_compute) + misses * self.load_one, hidden,
                               len(wasted) * self.load_one, misses + len(useful) + len(wasted), len(cached),
                               len(needed), len(useful) + len(wasted), len(useful))
        return total


def _per_layer_cache(costs: ServingCosts, serve: ServeSpec, spec: ExpertCacheSpec, seed: int,
                     source: str) -> CacheStats:
    """serve.expert_cache: per-layer caches and speculative prefetch over sampled routing, the same
    sampling as the global cache (CACHE_SAMPLE_* cycles, seeded). A layer's compute is the step's
    seconds over the MoE layers (attention and the rest spread evenly: an assumption)."""
    layers = costs.moe_layers
    sizes = costs.decode.batch_sizes
    field = "serve.expert_cache"
    if not layers:
        raise InputError(source, field, "the model has no MoE layer whose experts a cache could hold")
    fewest = min(s.experts for s in layers)
    if spec.per_layer is not None and spec.per_layer > fewest:
        raise InputError(source, f"{field}.per_layer", f"{spec.per_layer} is more than a layer's {fewest} experts")
    if spec.prefetch > fewest:
        raise InputError(source, f"{field}.prefetch", f"{spec.prefetch} is more than a layer's {fewest} experts")
    if spec.per_layer is not None and spec.per_layer * len(layers) > costs.resident_experts:
        raise InputError(source, f"{field}.per_layer", f"{spec.per_layer} x {len(layers)} MoE layers = "
                         f"{spec.per_layer * len(layers)} experts; memory holds {costs.resident_experts}")
    capacity = spec.per_layer if spec.per_layer is not None else costs.resident_experts // len(layers)
    hit_share = 1.0 if spec.prefetch else None
    if capacity >= max(s.experts for s in layers):  # every expert stays resident: nothing loads
        return CacheStats(1.0, tuple(0.0 for _ in sizes), 0.0, spec.policy, capacity, hit_share)
    if costs.storage_bandwidth <= 0:
        raise InputError(source, field, "the system has no storage tier to keep uncached experts on")
    if capacity < 1:
        raise InputError(source, f"{field}.per_layer", f"memory holds {costs.resident_experts} experts, "
                         f"fewer than one per MoE layer ({len(layers)})")
    rng = np.random.default_rng(seed)
    probs = [popularity(s, np.random.default_rng(seed + i)) for i, s in enumerate(layers)]
    load_one = costs.expert_bytes / costs.storage_bandwidth
    decode_steps = min(serve.output_tokens, CACHE_SAMPLE_DECODE_STEPS)
    run, prefill = StepLoads(), []
    decode: list[StepLoads] = []  # the warm mean per batch size
    for size in sizes:
        replay = ExpertCacheReplay([s.experts for s in layers], probs, capacity, spec.policy, spec.prefetch,
                                   spec.prefetch_recall or 0.0, load_one, rng)
        routing = StepRouting(layers, probs, rng)
        steps = []
        for _cycle in range(CACHE_SAMPLE_CYCLES):
            for decoding, seconds, record in ((False, costs.prefill.at(size), prefill),
                                            *[(True, costs.decode.at(size), steps)] * decode_steps):
                needed = routing.decode(size) if decoding else routing.prefill(size * serve.prompt_tokens)
                loads = replay.step(needed, seconds / len(layers))
                run += loads
                record.append(replace(loads, exposed=loads.exposed / size) if record is prefill else loads)
        warm = steps[len(steps) // CACHE_SAMPLE_CYCLES:]  # skip the cold first cycle
        decode.append(StepLoads(*(statistics.fmean(getattr(w, f.name) for w in warm) for f in fields(StepLoads))))
    full = decode[-1]
    return CacheStats(
        run.hits / run.lookups if run.lookups else 1.0, tuple(d.exposed for d in decode),
        statistics.fmean(p.exposed for p in prefill), spec.policy, capacity,
        (run.prefetched_needed / run.prefetched if run.prefetched else 0.0) if spec.prefetch else None,
        full.loads * costs.expert_bytes / sizes[-1], full.hidden, full.wasted)


# ------------------------------------------------------------------ hybrid steps (chunked prefill)

def _interp(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear, held flat past the ends (as np.interp), in plain Python: the simulator
    calls it a few times per step, where numpy's per-call overhead would dominate."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect_right(xs, x)
    x0, x1 = xs[i - 1], xs[i]
    return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class HybridSteps:
    """Seconds of one engine step that runs decodes and prompt chunks together (Sarathi-Serve's
    hybrid batch: Agrawal et al., OSDI'24, arXiv 2403.02310, Sec. 4.2-4.3).

    One forward takes every token of the step as one matrix: the weight GEMMs, norms, MoE and
    TP/PP communication see decode and chunk tokens together, so the weights are read once per
    step (`tokens`: a step of that many tokens with no context, its pipeline hops and overhead).
    On top, each part attends over its own context, costed by the blocks that keep a KV cache
    (attention, MLA), as the difference between their work at that context and at none:
    - a chunk of c tokens after p tokens of the same prompt already cached: its queries over its
      own c tokens under the causal mask (`own`, the kind's causal prefill costing) and over all
      p earlier tokens without a mask (`prefix`: the kind's costing with the mask off, a c x p
      block, so the pairs are c*p + the kind's causal count, c*c/2 for a fused kernel);
    - decodes: the decode table (serve's reference context) plus their attention's context part
      scaled from that reference to the running requests' mean context (linear: decode attention
      reads each context's KV once, bandwidth-bound).
    Approximation: these are tables over a grid (powers of two, the ends, the nominal prompt) read
    piecewise-linearly (bilinearly for `prefix`); exact at the grid points, and between them exact
    wherever a cost is linear in tokens (GEMMs) or bilinear in c*p (the prefix block's FLOPs).
    Recurrent kinds (LSTM) are costed as token-parallel here."""

    token_counts: tuple[int, ...]
    token_seconds: tuple[float, ...]
    chunk_sizes: tuple[int, ...]
    own_seconds: tuple[float, ...]
    prefix_lengths: tuple[int, ...]
    prefix_seconds: tuple[tuple[float, ...], ...]  # [chunk size][prefix length]
    decode_sizes: tuple[int, ...]
    decode_context_seconds: tuple[float, ...]  # decode attention's context part at reference_context
    reference_context: int

    def tokens(self, count: int) -> float:
        """A context-free step of `count` tokens (0 when there are none)."""
        return _interp(self.token_counts, self.token_seconds, count) if count > 0 else 0.0

    def chunk(self, size: int, prefix: int) -> float:
        """A chunk's attention over its own tokens and the `prefix` tokens before it."""
        own = _interp(self.chunk_sizes, self.own_seconds, size)
        if prefix <= 0 or len(self.prefix_lengths) == 1:
            return own
        ps, cs = self.prefix_lengths, self.chunk_sizes
        j = min(max(bisect_right(ps, prefix), 1), len(ps) - 1)
        t = min(max((prefix - ps[j - 1]) / (ps[j] - ps[j - 1]), 0.0), 1.0)
        column = tuple(row[j - 1] + (row[j] - row[j - 1]) * t for row in self.prefix_seconds)
        return own + _interp(cs, column, size)

    def decode_context(self, decodes: int, mean_context: float) -> float:
        """Seconds decode attention takes beyond the decode table's, at `mean_context` instead of
        the reference context (negative below it)."""
        per_reference = _interp(self.decode_sizes, self.decode_context_seconds, decodes)
        return per_reference * (mean_context - self.reference_context) / self.reference_context


def _grid(limit: int, *extra: int) -> tuple[int, ...]:
    """Powers of two below `limit`, `limit`, and the `extra` points within it."""
    return tuple(sorted({*batch_grid(limit), *(x for x in extra if 0 < x <= limit)}))


def unmasked_units(units: list[Unit]) -> list[Unit]:
    """The units with every causal mask off: a chunk's queries see every earlier token of its
    prompt. Blocks that shared a spec share its copy, so their work is costed once."""
    copies: dict[int, object] = {}

    def unmasked(block: Block) -> Block:
        if "causal" not in type(block.spec).model_fields:
            return block
        spec = copies.setdefault(id(block.spec), block.spec.model_copy(update={"causal": False}))
        return replace(block, spec=spec)

    return [Unit(tuple(unmasked(b) for b in u.blocks)) for u in units]


def with_hybrid_steps(costs: ServingCosts, workload: Workload, system: System, layout: Layout,
                      longest_prompt: int) -> ServingCosts:
    """`costs` with the hybrid-step tables for chunked prefill or prompts of varying length,
    covering prompts up to `longest_prompt` tokens: chunks up to serve.chunked_prefill_tokens
    (unchunked: whole prompts, and a step of a full batch of the longest)."""
    assert workload.serve is not None
    serve = workload.serve
    budget = serve.chunked_prefill_tokens
    units = served_units(workload)
    stages = stage_units(units, layout.pp * layout.vpp, workload.parallelism.pipeline_layout)
    attending = [Unit(kept) for u in units if (kept := tuple(b for b in u.blocks if costing_of(b.spec).kv_cache))]
    unmasked = unmasked_units(attending)

    def items_seconds(unit_list: list[Unit], batch: Batch) -> float:
        return _step_seconds([cost_item(i, system, layout) for i in forward_work(unit_list, workload, layout, batch).items])

    def context_part(unit_list: list[Unit], batch: Batch) -> float:
        if not unit_list:
            return 0.0
        return items_seconds(unit_list, batch) - items_seconds(unit_list, replace(batch, kv_len=0))

    def context_free_step(tokens: int) -> float:
        # The chunk tokens a step adds run the head only where the engine samples them (one
        # prompt's last token); the running decodes' rows come from the decode table.
        batch = step_batch(1, tokens, 0, sampled_rows(serve, 1))
        step = [cost_item(i, system, layout) for chunk in stages for i in forward_work(chunk, workload, layout, batch).items]
        return _step_time(step, tokens, workload, system, layout)

    largest_chunk = budget if budget is not None else longest_prompt
    token_grid = _grid(budget if budget is not None else serve.batch * longest_prompt, serve.prompt_tokens)
    chunk_grid = _grid(largest_chunk, serve.prompt_tokens)
    prefix_grid = (0, *_grid(longest_prompt - 1, serve.prompt_tokens)) if budget is not None and longest_prompt > 1 else (0,)
    reference = decode_context(serve)
    decode_grid = batch_grid(serve.batch)
    hybrid = HybridSteps(
        token_counts=token_grid, token_seconds=tuple(context_free_step(t) for t in token_grid),
        chunk_sizes=chunk_grid, own_seconds=tuple(context_part(attending, step_batch(1, c, c)) for c in chunk_grid),
        prefix_lengths=prefix_grid,
        prefix_seconds=tuple(tuple(context_part(unmasked, step_batch(1, c, p)) if p else 0.0 for p in prefix_grid)
                             for c in chunk_grid),
        decode_sizes=decode_grid,
        decode_context_seconds=tuple(context_part(attending, step_batch(d, 1, reference)) for d in decode_grid),
        reference_context=reference,
    )
    return replace(costs, hybrid=hybrid)


# ------------------------------------------------------------------ prefill/decode disaggregation

@dataclass(frozen=True)
class KVLink:
    """The path one device's share of a prompt's KV cache takes from its prefill instance to its
    decode instance: each of an instance's tp x pp devices sends its own shard to its counterpart,
    all at once, over its own port (a point-to-point send, costed where every transfer is:
    costs/collectives.py, latency + bytes / bandwidth, or the profile's calibrated fit)."""

    pair: CommGroup  # the sender and the receiver: in one node (intra) or not (inter)
    system: System

    def seconds(self, shard_bytes: float) -> float:
        return collective_time("p2p", shard_bytes, self.pair, self.system)


def exchange_groups(spec: DisaggregatedSpec) -> int:
    """Independent groups of instances: request i goes to prefill instance i mod P and decode
    instance i mod D, so with g = gcd(P, D) the requests i = r mod g only meet the P/g prefill and
    D/g decode instances of residue r (and the groups are alike: one is simulated)."""
    return math.gcd(spec.prefill_replicas, spec.decode_replicas)


def disaggregation_link(spec: DisaggregatedSpec, system: System, layout: Layout, source: str) -> KVLink:
    """Check that the two pools fit the devices and the link asked for exists, and return it.
    An instance is one replica of the layout (tp x pp devices); an expert-parallel group wider
    than tp spans several replicas, which must sit in the same pool."""
    field = "serve.disaggregated"
    size = layout.tp * layout.pp
    instances = spec.prefill_replicas + spec.decode_replicas
    if instances > layout.dp:
        raise InputError(source, field, f"prefill_replicas + decode_replicas = {instances} instances of tp x pp = "
                         f"{size} devices need {instances * size}; {system.name} has {system.devices} "
                         f"({layout.dp} instances)")
    span = math.lcm(layout.ep * layout.expert_tp, layout.tp) // layout.tp
    for name in ("prefill_replicas", "decode_replicas"):
        if getattr(spec, name) % span:
            raise InputError(source, f"{field}.{name}", f"ep x expert_tp = {layout.ep * layout.expert_tp} spans "
                             f"{span} replicas of tp = {layout.tp}: expected a multiple of {span}, got {getattr(spec, name)}")
    if spec.kv_link == "inter":
        if system.network is None:
            raise InputError(source, f"{field}.kv_link", f"inter needs a network between nodes; {system.name} is one "
                             "node (use kv_link: intra)")
        return KVLink(CommGroup(2, 1), system)
    groups = exchange_groups(spec)
    together = (spec.prefill_replicas + spec.decode_replicas) // groups * size
    if system.intra_link is None or together > system.devices_per_node:
        raise InputError(source, f"{field}.kv_link", f"intra needs the {spec.prefill_replicas // groups} prefill and "
                         f"{spec.decode_replicas // groups} decode instances that exchange KV caches ({together} devices) "
                         f"in one node of {system.devices_per_node} devices (use kv_link: inter)")
    return KVLink(CommGroup(2, 2), system)
