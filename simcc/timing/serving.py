"""Serving a batch: prefill the prompts, then decode one token per step for every request.

Closed-form until the simulator adds queueing: one batch in flight per replica, pipeline stages
run in sequence for each step. On edge devices, experts that do not fit in memory load from the
storage tier each time a step touches them (no cache yet: resident experts are a random subset).
"""

from __future__ import annotations

from dataclasses import dataclass

from simcc.costs.memory import MemoryBreakdown, serving_memory
from simcc.layout import Layout
from simcc.model.blocks import Batch, MoEStats, kv_cache_bytes_per_token
from simcc.model.graph import Block, stage_units, units_of
from simcc.model.ops import DTYPE_BYTES, Comm, Op
from simcc.routing.load import expected_experts_touched
from simcc.specs.hardware import System
from simcc.specs.workload import AttentionBlock, MoEFFNBlock, Workload
from simcc.timing.plan import Cost, cost_item, forward_work


@dataclass(frozen=True)
class ServingBreakdown:
    prefill: float  # seconds for the whole batch's prompts (time to first token, no queueing)
    decode_step: float  # seconds per output token step, loading included
    decode_compute: float
    decode_comm: float
    decode_loading: float  # expert weights streamed from storage per step
    prefill_loading: float
    memory: MemoryBreakdown
    moe: list[MoEStats]

    def request_seconds(self, output_tokens: int) -> float:
        return self.prefill + output_tokens * self.decode_step


def _stream_seconds(costs: list[Cost], stream: str) -> float:
    return sum(c.seconds for c in costs if c.stream == stream)


def _expert_bytes(spec: MoEFFNBlock, hidden: int, dtype: str) -> float:
    width = spec.expert_hidden * (3 if spec.gated else 2)
    return float(width * hidden * DTYPE_BYTES[dtype])


def compose_serving(workload: Workload, system: System, layout: Layout) -> ServingBreakdown:
    assert workload.serve is not None
    serve = workload.serve
    hidden = workload.model.hidden
    units = units_of(workload.model)
    chunks = stage_units(units, layout.pp * layout.vpp)
    prefill_batch = Batch(serve.batch, serve.prompt_tokens, serve.prompt_tokens)
    decode_batch = Batch(serve.batch, 1, serve.prompt_tokens + serve.output_tokens // 2)

    prefill: list[Cost] = []
    decode: list[Cost] = []
    moe_stats: list[MoEStats] = []
    heaviest_weights = heaviest_experts = heaviest_kv = heaviest_act = 0.0
    wbytes = DTYPE_BYTES[workload.precision.weights]
    for stage in range(layout.pp):
        stage_chunks = [chunks[v * layout.pp + stage] for v in range(layout.vpp)]
        weights = experts = kv = act = 0.0
        for chunk_units in stage_chunks:
            pre = forward_work(chunk_units, workload, layout, prefill_batch)
            dec = forward_work(chunk_units, workload, layout, decode_batch)
            prefill += [cost_item(i, system, layout) for i in pre.items]
            decode += [cost_item(i, system, layout) for i in dec.items]
            moe_stats += dec.moe
            weights += (pre.params.dense / layout.tp + pre.params.replicated) * wbytes
            experts += pre.params.expert / (layout.ep * layout.expert_tp) * wbytes
            kv += sum(_kv_bytes(b, hidden, workload, layout) for u in chunk_units for b in u.blocks)
            act = max(act, max((2 * i.saved_bytes for i in pre.items if isinstance(i, Op)), default=0.0))
        if weights + experts + kv > heaviest_weights + heaviest_experts + heaviest_kv:
            heaviest_weights, heaviest_experts, heaviest_kv, heaviest_act = weights, experts, kv, act
    kv_total = heaviest_kv * serve.batch * (serve.prompt_tokens + serve.output_tokens)
    memory = serving_memory(system, layout, heaviest_weights + heaviest_experts, heaviest_experts, kv_total, heaviest_act)

    decode_loading = prefill_loading = 0.0
    if memory.offloaded_weights > 0 and system.storage is not None:
        missing = memory.offloaded_weights / heaviest_experts  # share of experts not resident
        bandwidth = system.storage.bandwidth_gb_s * 1e9
        for unit in units:
            for block in unit.blocks:
                if isinstance(block.spec, MoEFFNBlock):
                    one = _expert_bytes(block.spec, hidden, workload.precision.weights) / layout.expert_tp
                    touched = expected_experts_touched(block.spec, serve.batch, workload.seed + block.index)
                    touched_prompt = expected_experts_touched(block.spec, serve.batch * serve.prompt_tokens,
                                                              workload.seed + block.index)
                    decode_loading += touched * missing * one / bandwidth
                    prefill_loading += touched_prompt * missing * one / bandwidth
    act = DTYPE_BYTES[workload.precision.communication] * hidden
    hops = layout.pp - 1  # each stage hands its output activations to the next
    p2p_decode = hops * cost_item(Comm("pp.send", "p2p", decode_batch.tokens * act, "pp"), system, layout).seconds
    p2p_prefill = hops * cost_item(Comm("pp.send", "p2p", prefill_batch.tokens * act, "pp"), system, layout).seconds
    decode_compute = _stream_seconds(decode, "compute")
    decode_comm = _stream_seconds(decode, "comm") + p2p_decode
    prefill_time = (_stream_seconds(prefill, "compute") + _stream_seconds(prefill, "comm") + p2p_prefill
                    + prefill_loading)
    return ServingBreakdown(prefill_time, decode_compute + decode_comm + decode_loading, decode_compute,
                            decode_comm, decode_loading, prefill_loading, memory, moe_stats)


def _kv_bytes(block: Block, hidden: int, workload: Workload, layout: Layout) -> float:
    """KV cache bytes per token for one attention block on one device (kv heads split by TP,
    replicated when TP exceeds them)."""
    if not isinstance(block.spec, AttentionBlock):
        return 0.0
    kv_heads = block.spec.kv_heads or block.spec.heads
    return kv_cache_bytes_per_token(block.spec, hidden, workload.precision.kv_cache) / min(layout.tp, kv_heads)
