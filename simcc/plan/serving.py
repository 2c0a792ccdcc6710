"""Costs of serving steps, in seconds, for the serving simulator to schedule.

Prefill and decode are costed from the same block work as training (forward only), over a
grid of batch sizes; pipeline stages run in sequence for one step. On edge devices, expert
weights that do not fit stay on the storage tier: this module says how many bytes one expert
is and how many experts stay resident; the simulator's expert cache decides what loads when.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from simcc.costs.memory import MemoryBreakdown, serving_memory
from simcc.layout import Layout
from simcc.model.blocks import Batch, MoEStats
from simcc.model.anytime import scale_units, served_units
from simcc.model.graph import Block, Unit, stage_units
from simcc.model.kinds import costing_of
from simcc.model.ops import DTYPE_BYTES, Comm, Op
from simcc.routing.gating import popularity
from simcc.specs.hardware import System
from simcc.specs.vocab import bytes_per_weight
from simcc.specs.workload import MoEFFNBlock, ServeSpec, Workload
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
    kv_total = stage.kv_bytes_per_token * serve.batch * (serve.prompt_tokens + serve.output_tokens)
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
        widths=_width_tables(workload, system, layout, units, tables),
    )
    return replace(costs, cache=measure_expert_cache(costs, serve, workload.seed))


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


def _step_tables(workload: Workload, system: System, layout: Layout, chunks: list[list[Unit]]) -> _StepTables:
    """Prefill and decode step seconds over a grid of batch sizes; pipeline stages run in sequence."""
    assert workload.serve is not None
    serve = workload.serve
    act_bytes = DTYPE_BYTES[workload.precision.communication] * workload.model.hidden
    context = serve.prompt_tokens + serve.output_tokens // 2  # mean context while decoding
    grid = batch_grid(serve.batch)
    prefill_rows, decode_rows = [], []
    moe_stats: list[MoEStats] = []
    full_batch: list[ForwardWork] = []
    for size in grid:
        prefill_batch = Batch(size, serve.prompt_tokens, serve.prompt_tokens)
        decode_batch = Batch(size, 1, context)
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
            # each stage hands its output activations to the next
            hop = cost_item(Comm("pp.send", "p2p", batch.tokens * act_bytes, "pp"), system, layout)
            costs.append(Cost(hop.name, "comm", hop.seconds * (layout.pp - 1), link=hop.link))
            rows.append(_step_seconds(costs) + system.device.efficiency.serving_step_us * 1e-6)
    return _StepTables(StepTable(grid, tuple(prefill_rows)), StepTable(grid, tuple(decode_rows)), moe_stats, full_batch)


@dataclass(frozen=True)
class _StageMemory:
    weight_bytes: float  # dense weights
    expert_bytes: float  # expert weights
    kv_bytes_per_token: float
    activation_peak: float  # the largest op's input and output, alive together


def _heaviest_stage(workload: Workload, layout: Layout, chunks: list[list[Unit]],
                    full_batch: list[ForwardWork]) -> _StageMemory:
    """The pipeline stage whose weights weigh most: its parameters as the training plan counts them
    (plan.training.footprint), its KV cache per token, and its activation peak."""
    precision = workload.precision
    wbytes = bytes_per_weight(precision.weights)
    expert_wbytes = bytes_per_weight(precision.expert_weights or precision.weights)
    hidden = workload.model.hidden
    heaviest = _StageMemory(0.0, 0.0, 0.0, 0.0)
    for stage in range(layout.pp):
        indices = [v * layout.pp + stage for v in range(layout.vpp)]
        params, _, _, _ = footprint([full_batch[i] for i in indices])
        dense, expert = layout.local_params(params)
        kv = sum(_kv_bytes(b, hidden, workload, layout) for i in indices for u in chunks[i] for b in u.blocks)
        peak = max((2 * item.saved_bytes for i in indices for item in full_batch[i].items if isinstance(item, Op)),
                   default=0.0)
        if dense * wbytes + expert * expert_wbytes > heaviest.weight_bytes + heaviest.expert_bytes:
            heaviest = _StageMemory(dense * wbytes, expert * expert_wbytes, kv, peak)
    return heaviest


@dataclass(frozen=True)
class CacheStats:
    hit_rate: float
    decode_load_seconds: tuple[float, ...]  # per decode step, by the decode table's batch sizes
    prefill_load_seconds: float  # per prefill of one request


def measure_expert_cache(costs: ServingCosts, serve: ServeSpec, seed: int) -> CacheStats:
    """Run an LRU expert cache over sampled routing (prefill, then decode steps, repeatedly) and
    measure its misses; each miss streams one expert from the storage tier."""
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
        for _cycle in range(CACHE_SAMPLE_CYCLES):
            for tokens, record, share in ((size * serve.prompt_tokens, prefill_misses, 1.0 / size),
                                          *[(size, misses_per_step, 1.0)] * decode_steps):
                misses = 0
                for layer, (spec, p) in enumerate(zip(costs.moe_layers, probs)):
                    picks = rng.multinomial(tokens * spec.k, p)
                    for expert in np.flatnonzero(picks):
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
    return CacheStats(hits / lookups if lookups else 1.0, tuple(decode_loads), prefill)
