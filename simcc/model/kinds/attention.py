"""Self-attention: QKV projection, the score and value products, output projection."""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import (
    NORM_PARAMS,
    Batch,
    BlockWork,
    Params,
    Shard,
    column_gemm,
    norm,
    residual,
    tp_entry,
    tp_exit,
)
from simcc.model.ops import DTYPE_BYTES, Op, elementwise, gemm
from simcc.specs.blocks import AttentionBlock


def attention_dims(spec: AttentionBlock, hidden: int) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) with the defaults filled in."""
    kv_heads = spec.kv_heads or spec.heads
    head_dim = spec.head_dim or hidden // spec.heads
    return spec.heads, kv_heads, head_dim


def kv_cache_bytes_per_token(spec: AttentionBlock, hidden: int, dtype: str) -> float:
    """K and V for one token in one layer: 2 * kv_heads * head_dim * bytes."""
    _, kv_heads, head_dim = attention_dims(spec, hidden)
    return 2.0 * kv_heads * head_dim * DTYPE_BYTES[dtype]


def params(spec: AttentionBlock, hidden: int) -> Params:
    heads, kv_heads, head_dim = attention_dims(spec, hidden)
    qkv = hidden * (heads + 2 * kv_heads) * head_dim
    out = heads * head_dim * hidden
    rows_cols = (hidden + (heads + 2 * kv_heads) * head_dim) + (heads * head_dim + hidden)
    # fused QKV, output projection, norm
    return Params(dense=qkv + out, replicated=NORM_PARAMS * hidden, dense_rows_cols=rows_cols, tensors=3)


def kv_cache_on_device(spec: AttentionBlock, hidden: int, dtype: str, tp: int) -> float:
    """KV-cache bytes per token on one TP rank: kv heads split by TP, replicated when TP exceeds them."""
    _, kv_heads, _ = attention_dims(spec, hidden)
    return kv_cache_bytes_per_token(spec, hidden, dtype) / min(tp, kv_heads)


@block_costing(AttentionBlock, params, kv_cache=kv_cache_on_device)
def work(spec: AttentionBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    heads, kv_heads, head_dim = attention_dims(spec, hidden)
    t, T, dt = shard.tp, batch.tokens, shard.dtype
    b = DTYPE_BYTES[dt]
    local_heads, local_kv = heads / t, max(kv_heads / t, 1)
    result = BlockWork()
    fwd = result.forward
    fwd.append(norm("attn.norm", T, hidden, shard))
    fwd += tp_entry("attn.tp_gather", T, hidden, shard)
    q_bytes = T * local_heads * head_dim * b
    kv_bytes = batch.sequences * batch.kv_len * local_kv * head_dim * b * 2
    # Q, K and V outlive the forward pass whichever way the core runs (selective recomputation
    # replays the core from them: Korthikanti et al. 2022, sec. 4.3).
    fwd.append(column_gemm("attn.qkv", T, hidden, (local_heads + 2 * local_kv) * head_dim, shard,
                           kept=q_bytes + kv_bytes))
    # Score and value products: 2 * (2 * q * kv * d) FLOPs per head and sequence. A fused kernel
    # skips the masked half of a causal score matrix (executed work only; model FLOPs count it all,
    # as Megatron does); unfused attention multiplies the whole matrix and masks in the softmax
    # (Megatron-LM 2022: batched GEMM, then fused scale-mask-softmax).
    skips_masked = spec.impl == "flash" and spec.causal and shard.executed and batch.q_len > 1
    causal_share = 0.5 if skips_masked else 1.0
    core_flops = 4.0 * batch.sequences * batch.q_len * batch.kv_len * local_heads * head_dim * causal_share
    if spec.impl == "flash":  # keeps its output (the out projection's input, stored once) and the fp32 log-sum-exp
        fwd.append(Op("attn.core", "attention", core_flops, 2 * q_bytes + kv_bytes, dt, saved_bytes=T * local_heads * 4))
    else:
        scores = batch.sequences * local_heads * batch.q_len * batch.kv_len
        products = max(1, round(batch.sequences * local_heads))  # one batched GEMM kernel over (sequence, head)
        q, kv = batch.q_len, batch.kv_len
        core = [
            Op("attn.scores", "gemm", core_flops / 2, q_bytes + kv_bytes / 2 + scores * b, dt,
               kernels=(((q, head_dim, kv, products),),)),
            # softmax reads and writes the s x s scores; dropout writes a 1-byte mask too.
            elementwise("attn.softmax", scores, 1, 1, dt, flops_per_element=5, saved_elements=scores),
            elementwise("attn.dropout", scores, 1, 1 + 1 / b, dt, saved_elements=scores / b),
            Op("attn.context", "gemm", core_flops / 2, scores * b + kv_bytes / 2 + q_bytes, dt, saved_bytes=scores * b,
               kernels=(((q, kv, head_dim, products),),)),
        ]
        fwd += core
        result.selective_recompute = list(core)
    fwd.append(gemm("attn.out", T, local_heads * head_dim, hidden, dt, operands=shard.dense_gemm))
    fwd += tp_exit("attn.tp_reduce", T, hidden, shard)
    fwd.append(residual("attn.residual", T, hidden, shard))
    return result
