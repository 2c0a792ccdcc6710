"""Multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2", arXiv 2405.04434, sec. 2.1; the
DeepSeek-V3 report, arXiv 2412.19437, sec. 2.1.1): low-rank query and key-value compression with a
decoupled RoPE key.

Per token: queries c_Q = x W_DQ (q_lora_rank wide, normed), q = c_Q W_UQ (heads x (nope + rope));
the shared latent and RoPE key [c_KV, k_rope] = x W_DKV (kv_lora_rank + rope wide, c_KV normed);
per-head keys and values [k_nope, v] = c_KV W_UKV (heads x (nope + v)); attention over
(nope + rope)-wide keys and v-wide values; output (heads x v) W_O. Under tensor parallelism the
per-head projections and the output are split by heads and the two down-projections are computed
whole on every rank (Megatron-Core's MLA keeps them unsplit). A decode step attends over the cached
latent with W_UK folded into the query and W_UV into the output (the paper's weight absorption),
which reads kv_lora_rank + rope values per cached token instead of every head's key and value.

Under context parallelism (training) the core runs as attention.py's module docstring derives:
cp ring steps over the whole sequence, 1/cp of its causal work. The ring passes what Megatron-
Core's MLA hands Transformer Engine's core attention: the up-projected per-head keys (nope +
rope wide) and values (v wide), concatenated (AttnFuncWithCPAndKVP2P packs k and v of different
head widths into one buffer, k_numel then v_shape), not the latent.
"""

from __future__ import annotations

from dataclasses import replace

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds.attention import ring_buffer_bytes, ring_exchange
from simcc.model.kinds._shared import NORM_PARAMS, Batch, BlockWork, Params, Shard
from simcc.model.kinds._shared import column_gemm, kv_cache_write, norm, residual, rotary, tp_entry, tp_exit
from simcc.model.ops import DTYPE_BYTES, Op, elementwise, gemm
from simcc.specs.blocks import MLABlock


def latent_cache_bytes_per_token(spec: MLABlock, dtype: str) -> float:
    """What one token leaves in one layer's KV cache: its latent and its RoPE key."""
    return float((spec.kv_lora_rank + spec.qk_rope_head_dim) * DTYPE_BYTES[dtype])


def _widths(spec: MLABlock) -> tuple[int, int, int]:
    """(query/key head width, value head width, latent + RoPE key width)."""
    return spec.qk_nope_head_dim + spec.qk_rope_head_dim, spec.v_head_dim, spec.kv_lora_rank + spec.qk_rope_head_dim


def params(spec: MLABlock, hidden: int) -> Params:
    qk, v, down_kv = _widths(spec)
    heads = spec.heads
    if spec.q_lora_rank:
        q_down, q_up = hidden * spec.q_lora_rank, spec.q_lora_rank * heads * qk
        norms = spec.q_lora_rank + spec.kv_lora_rank
        q_rows_cols = hidden + 2 * spec.q_lora_rank + heads * qk
    else:
        q_down, q_up, norms = 0, hidden * heads * qk, spec.kv_lora_rank
        q_rows_cols = hidden + heads * qk
    kv_down = hidden * down_kv
    kv_up = spec.kv_lora_rank * heads * (spec.qk_nope_head_dim + v)
    out = heads * v * hidden
    kv_up_rows_cols = spec.kv_lora_rank + heads * (spec.qk_nope_head_dim + v)
    rows_cols = q_rows_cols + (hidden + down_kv) + kv_up_rows_cols + (heads * v + hidden)
    # The down-projections are replicated across TP ranks like norms; the per-head ones are split.
    return Params(dense=q_up + kv_up + out, replicated=q_down + kv_down + norms + NORM_PARAMS * hidden,
                  dense_rows_cols=rows_cols, tensors=(5 + 3) if spec.q_lora_rank else (4 + 2))  # weights + norms


def latent_cache_on_device(spec: MLABlock, hidden: int, dtype: str, tp: int) -> float:
    """Every TP rank keeps the whole latent: its heads all read it."""
    return latent_cache_bytes_per_token(spec, dtype)


@block_costing(MLABlock, params, kv_cache=latent_cache_on_device)
def work(spec: MLABlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    qk, v, down_kv = _widths(spec)
    t, T, dt = shard.tp, batch.tokens, shard.dtype
    b = DTYPE_BYTES[dt]
    local = spec.heads / t
    seqs, q_len, kv_len = batch.sequences, batch.q_len, batch.kv_len
    causal_share = 0.5 if spec.causal and shard.executed and q_len > 1 else 1.0
    q_bytes, out_bytes = T * local * qk * b, T * local * v * b
    result = BlockWork()
    fwd = result.forward
    fwd.append(norm("mla.norm", T, hidden, shard))
    fwd += tp_entry("mla.tp_gather", T, hidden, shard)
    # Down-projections, whole on every TP rank; they share the gathered input (kept once).
    if spec.q_lora_rank:
        fwd.append(column_gemm("mla.q_down", T, hidden, spec.q_lora_rank, shard))
        fwd.append(elementwise("mla.q_norm", T * spec.q_lora_rank, 1, 1, dt, flops_per_element=4,
                               saved_elements=T * spec.q_lora_rank))
        fwd.append(replace(gemm("mla.q_up", T, spec.q_lora_rank, local * qk, dt, saved=False, operands=shard.dense_gemm),
                           saved_bytes=q_bytes))  # its output, the queries, kept for the core's backward
    else:
        fwd.append(column_gemm("mla.q", T, hidden, local * qk, shard, kept=q_bytes))
    fwd.append(gemm("mla.kv_down", T, hidden, down_kv, dt, saved=not spec.q_lora_rank, operands=shard.dense_gemm))
    fwd.append(elementwise("mla.kv_norm", T * spec.kv_lora_rank, 1, 1, dt, flops_per_element=4,
                           saved_elements=T * spec.kv_lora_rank))
    fwd.append(replace(gemm("mla.kv_up", T, spec.kv_lora_rank, local * (spec.qk_nope_head_dim + v), dt, saved=False,
                            operands=shard.dense_gemm), saved_bytes=T * local * (qk + v) * b))  # keys and values, kept
    # The decoupled RoPE (DeepSeek-V2 sec. 2.1.3): each local head's rope-wide query part and the
    # one shared rope-wide key; a serving step caches the latent and that key.
    fwd.append(rotary("mla.rope", T, (local + 1) * spec.qk_rope_head_dim, dt))
    fwd += kv_cache_write("mla.kv_write", batch, down_kv, dt)
    if q_len < kv_len:
        # Decode (or a prefill chunk after cached tokens): attend over the cached latent with the
        # key and value up-projections absorbed; a score reads latent + RoPE key, a value the latent.
        core_flops = 2.0 * seqs * q_len * kv_len * local * (down_kv + spec.kv_lora_rank)
        cache = seqs * kv_len * down_kv * b
        fwd.append(Op("mla.core", "attention", core_flops, q_bytes + cache + out_bytes, dt, saved_bytes=T * local * 4))
    else:
        # Prefill and training: per-head keys (nope + rope wide) and values, flash-style; the up
        # projections keep Q, K and V for its backward, the out projection keeps its output, and it
        # keeps its fp32 log-sum-exp.
        # Context parallelism: the local queries attend over the whole sequence in cp ring steps,
        # each its own kernel reading the queries and one rank's keys and values.
        cp = shard.cp
        core_flops = 2.0 * seqs * q_len * kv_len * cp * local * (qk + v) * causal_share
        kv_bytes = seqs * kv_len * local * (qk + v) * b
        fwd += ring_exchange("mla", kv_bytes, shard)
        fwd.append(Op("mla.core", "attention", core_flops, cp * (q_bytes + kv_bytes + out_bytes), dt, saved_bytes=T * local * 4,
                      kernel_flops=core_flops / cp if cp > 1 else None, launches=cp))
        result.transient_bytes = ring_buffer_bytes(kv_bytes, cp)
    fwd.append(gemm("mla.out", T, local * v, hidden, dt, operands=shard.dense_gemm))
    fwd += tp_exit("mla.tp_reduce", T, hidden, shard)
    fwd.append(residual("mla.residual", T, hidden, shard))
    return result
