"""Self-attention: QKV projection, the score and value products, output projection.

A sliding window (and StreamingLLM's sink tokens) limits which (query, key) pairs are scored. The
new queries of a step are the last q_len positions of a kv_len context (training and prefill:
q_len = kv_len; decode: q_len = 1); the query at position i (0-based) sees

    min(i + 1, w)  keys of its window, and  min(S, max(0, i + 1 - w))  sink keys before it

for window w and S sink tokens. With F(n; c) = sum over m = 1..n of min(m, c), which is
n(n + 1)/2 when n <= c and c(c + 1)/2 + (n - c)c beyond, the step's pairs are

    pairs = F(kv; w) - F(kv - q; w) + F(max(0, kv - w); S) - F(max(0, kv - q - w); S),

since the sink term of the query at m = i + 1 is min(S, m - w) for m > w, a shifted F. Training
over s = 8 positions with w = 3 scores F(8; 3) = 3*4/2 + 5*3 = 21 pairs where full causal attention
scores 36. A window w >= kv_len changes nothing (F(n; w) = n(n + 1)/2).

Executed work: a flash kernel skips the tiles a causal mask or a window masks out entirely
(FlashAttention-2, Dao 2023, sec. 3.1.1 for the causal mask; for the window, flash_attn's
`window_size=(left, right)` in Dao-AILab/flash-attention flash_attn/flash_attn_interface.py, whose
query i sees keys i + seqlen_k - seqlen_q - left onward: w = left + 1), so its score and value
products follow the pairs: the existing causal convention (half the square) scaled by the share of
causal pairs the window keeps, which is exactly 1 without a window. Model FLOPs (the reporting
convention, `Shard.executed` false) take the same share of their full square. Megatron-LM's
num_floating_point_operations (megatron/training/training.py) charges every standard attention
layer its full causal L^2/2 whatever its `window_size`/`window_attn_skip_freq`; simcc deliberately
does not follow it there, since a windowed layer never needs the masked pairs (MFU counts the FLOPs
the model needs: Chowdhery et al. 2022, app. B).

Context parallelism (`Shard.cp` > 1, training): the batch holds this rank's s/cp tokens of each
sequence, Megatron's load-balanced split (rank i of cp holds chunks i and 2cp-1-i of 2cp). The
core runs cp ring steps (Liu et al. 2023, "Ring Attention", arXiv 2310.01889, sec. 3; Transformer
Engine's AttnFuncWithCPAndKVP2P, cp_comm_type "p2p", transformer_engine/pytorch/attention/
dot_product_attention/context_parallel.py): step k attends the local queries to the K and V that
started on rank i-k while sending the current K and V on to rank i+1. With chunks of L = s/2cp
tokens, a chunk against itself is L^2/2 causal pairs and against an earlier chunk L^2: step 0
(own chunks) scores L^2/2 + L^2/2 + L^2, a step with an earlier rank's K and V (TE: "kv first
half") 2 L^2, with a later rank's (TE: "q second half") 2 L^2. Every step is 2 L^2, and the cp
steps 2 cp L^2 = s^2/(2cp): 1/cp of the causal work whatever the rank. So the executed core is
the causal half of (s/cp local queries) x (s keys), in cp kernels of equal size; the exchange
is `ring_exchange`, timed against those steps in plan/training.py.
"""

from __future__ import annotations

from dataclasses import replace

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import (
    NORM_PARAMS,
    Batch,
    BlockWork,
    Params,
    Shard,
    column_gemm,
    kv_cache_write,
    norm,
    residual,
    rotary,
    tp_entry,
    tp_exit,
)
from simcc.model.ops import DTYPE_BYTES, Comm, Op, WorkItem, elementwise, gemm
from simcc.specs.blocks import AttentionBlock


def ring_exchange(prefix: str, chunk_bytes: float, shard: Shard) -> list[WorkItem]:
    """Context parallelism's KV ring, placed before the core it overlaps: `chunk_bytes` is the K
    and V of this rank's tokens and heads, which each ring step passes to the next cp rank (the
    steps and their overlap with the core: plan/training.py, ring_costs)."""
    if shard.cp == 1:
        return []
    return [Comm(f"{prefix}.cp_ring", "p2p", chunk_bytes, "cp")]


# K/V chunks Transformer Engine's p2p ring holds at once (AttnFuncWithCPAndKVP2P, context_parallel.py):
# the forward keeps every step's received buffer until it returns (p2p_comm_buffers, cp of them),
# the backward two send/receive buffers each of K, V and their gradient (2 x 2 chunks).
RING_BACKWARD_CHUNKS = 4


def ring_buffer_bytes(chunk_bytes: float, cp: int) -> float:
    """The KV ring's transient buffers: the larger of the forward's and the backward's."""
    return max(cp, RING_BACKWARD_CHUNKS) * chunk_bytes if cp > 1 else 0.0


def attention_dims(spec: AttentionBlock, hidden: int) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) with the defaults filled in."""
    kv_heads = spec.kv_heads or spec.heads
    head_dim = spec.head_dim or hidden // spec.heads
    return spec.heads, kv_heads, head_dim


def _capped_prefix(n: float, cap: float) -> float:
    """F(n; cap) = sum over m = 1..n of min(m, cap): the pairs n causal queries from position 0 see
    under a window of `cap` (the module docstring derives it)."""
    if n <= 0:
        return 0.0
    if n <= cap:
        return n * (n + 1) / 2
    return cap * (cap + 1) / 2 + (n - cap) * cap


def attended_pairs(q_len: int, kv_len: int, window: int | None = None, sink_tokens: int = 0) -> float:
    """(query, key) pairs the last q_len queries of a kv_len causal context score, per sequence and head."""
    w = kv_len if window is None else window
    pairs = _capped_prefix(kv_len, w) - _capped_prefix(kv_len - q_len, w)
    if sink_tokens:
        pairs += _capped_prefix(kv_len - w, sink_tokens) - _capped_prefix(kv_len - q_len - w, sink_tokens)
    return pairs


def keys_read(q_len: int, kv_len: int, window: int | None = None, sink_tokens: int = 0) -> int:
    """Distinct keys (and values) the last q_len queries of a kv_len context reach: the window's
    span back from the first of them and the sinks before it (a decode step: window + sinks)."""
    if window is None:
        return kv_len
    span = min(kv_len, q_len + window - 1)
    return span + min(sink_tokens, kv_len - span)


def window_share(spec: AttentionBlock, q_len: int, kv_len: int) -> float:
    """Share of full causal attention's pairs a windowed layer scores (1 without a window)."""
    if spec.window is None or spec.window >= kv_len:
        return 1.0
    return attended_pairs(q_len, kv_len, spec.window, spec.sink_tokens) / attended_pairs(q_len, kv_len)


def cached_tokens(spec: AttentionBlock) -> int | None:
    """Tokens one sequence keeps in this layer's KV cache: a windowed layer evicts what no later
    query can see, keeping the window and the sinks (StreamingLLM's rolling cache, sec. 3.2; vLLM
    frees sliding-window blocks the same way); None: the whole context."""
    return None if spec.window is None else spec.window + spec.sink_tokens


def kv_cache_bytes_per_token(spec: AttentionBlock, hidden: int, dtype: str) -> float:
    """K and V for one token in one layer: 2 * kv_heads * head_dim * bytes."""
    _, kv_heads, head_dim = attention_dims(spec, hidden)
    return 2.0 * kv_heads * head_dim * DTYPE_BYTES[dtype]


def params(spec: AttentionBlock, hidden: int) -> Params:
    heads, kv_heads, head_dim = attention_dims(spec, hidden)
    qkv = hidden * (heads + 2 * kv_heads) * head_dim
    out = heads * head_dim * hidden
    rows_cols = (hidden + (heads + 2 * kv_heads) * head_dim) + (heads * head_dim + hidden)
    # Learned sinks: one logit per head, split over TP with their heads; a factored optimizer keeps
    # a vector's second moment whole (Shazeer & Stern 2018 factor matrices only).
    sinks = heads if spec.learned_sinks else 0
    # QK-norm: a head_dim-wide RMSNorm weight for the queries and one for the keys, on every rank.
    qk_norms = 2 if spec.qk_norm else 0
    # fused QKV, output projection, norm (and the sinks, the QK norms)
    return Params(dense=qkv + out + sinks, replicated=NORM_PARAMS * hidden + qk_norms * NORM_PARAMS * head_dim,
                  dense_rows_cols=rows_cols + sinks, tensors=3 + (1 if sinks else 0) + qk_norms)


def kv_cache_on_device(spec: AttentionBlock, hidden: int, dtype: str, tp: int) -> float:
    """KV-cache bytes per token on one TP rank: kv heads split by TP, replicated when TP exceeds them."""
    _, kv_heads, _ = attention_dims(spec, hidden)
    return kv_cache_bytes_per_token(spec, hidden, dtype) / min(tp, kv_heads)


def qk_norm(tokens: float, local_heads: float, local_kv: float, head_dim: int, dtype: str) -> Op:
    """QK-norm on this rank's heads: the queries' and the keys' RMSNorm over each head's head_dim,
    two kernels (Megatron-Core's q_layernorm and k_layernorm; vLLM's and SGLang's Qwen3 q_norm and
    k_norm), each keeping its input for the backward pass; the normalised queries and keys are
    what the core keeps (the QKV projection's `kept`)."""
    elements = tokens * (local_heads + local_kv) * head_dim
    op = elementwise("attn.qk_norm", elements, 1, 1, dtype, flops_per_element=5, saved_elements=elements)
    return replace(op, launches=2)


@block_costing(AttentionBlock, params, kv_cache=kv_cache_on_device, kv_window=cached_tokens)
def work(spec: AttentionBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    heads, kv_heads, head_dim = attention_dims(spec, hidden)
    t, T, dt = shard.tp, batch.tokens, shard.dtype
    b = DTYPE_BYTES[dt]
    local_heads, local_kv = heads / t, max(kv_heads / t, 1)
    # Context parallelism: the local queries attend over the whole sequence, cp ring steps.
    cp = shard.cp
    context = batch.kv_len * cp
    result = BlockWork()
    fwd = result.forward
    fwd.append(norm("attn.norm", T, hidden, shard))
    fwd += tp_entry("attn.tp_gather", T, hidden, shard, linear=True)
    q_bytes = T * local_heads * head_dim * b
    kv_bytes = batch.sequences * batch.kv_len * local_kv * head_dim * b * 2
    # A window reads only the keys it reaches (a decode step: the cached window and sinks).
    keys = keys_read(batch.q_len, batch.kv_len, spec.window, spec.sink_tokens)
    read_kv_bytes = batch.sequences * keys * local_kv * head_dim * b * 2
    # Q, K and V outlive the forward pass whichever way the core runs (selective recomputation
    # replays the core from them: Korthikanti et al. 2022, sec. 4.3).
    fwd.append(column_gemm("attn.qkv", T, hidden, (local_heads + 2 * local_kv) * head_dim, shard,
                           kept=q_bytes + kv_bytes))
    if spec.qk_norm:
        fwd.append(qk_norm(T, local_heads, local_kv, head_dim, dt))
    if spec.rotary:
        fwd.append(rotary("attn.rope", T, (local_heads + local_kv) * head_dim, dt))
    fwd += kv_cache_write("attn.kv_write", batch, 2 * local_kv * head_dim, dt)
    # Score and value products: 2 * (2 * q * kv * d) FLOPs per head and sequence. A fused kernel
    # skips the masked half of a causal score matrix (executed work only; model FLOPs count it all,
    # as Megatron does); unfused attention multiplies the whole matrix and masks in the softmax
    # (Megatron-LM 2022: batched GEMM, then fused scale-mask-softmax).
    skips_masked = spec.impl == "flash" and spec.causal and shard.executed and batch.q_len > 1
    causal_share = 0.5 if skips_masked else 1.0
    if spec.impl == "flash" or not shard.executed:
        # A flash kernel skips masked tiles; the reporting convention counts the pairs a window keeps.
        core_flops = 4.0 * batch.sequences * batch.q_len * context * local_heads * head_dim * causal_share
        if spec.window is not None:
            core_flops *= window_share(spec, batch.q_len, batch.kv_len)
    else:  # unfused: whole score rows over the keys reached, masked in the softmax
        core_flops = 4.0 * batch.sequences * batch.q_len * keys * local_heads * head_dim
    # A learned sink is one more logit per (query, head) in the softmax: an exp and an add, executed
    # work only (the reporting convention counts matmul FLOPs).
    sink_logits = T * local_heads if spec.learned_sinks else 0.0
    if spec.impl == "flash":  # keeps its output (the out projection's input, stored once) and the fp32 log-sum-exp
        sink_flops = 2.0 * sink_logits if shard.executed else 0.0
        # Under CP each of the cp steps is its own kernel, reading the queries and one rank's K and
        # V and writing a partial output (layout.py refuses windows, sinks and unfused cores with CP).
        fwd += ring_exchange("attn", kv_bytes, shard)
        fwd.append(Op("attn.core", "attention", core_flops + sink_flops, cp * 2 * q_bytes + cp * read_kv_bytes, dt,
                      saved_bytes=T * local_heads * 4, kernel_flops=(core_flops + sink_flops) / cp if cp > 1 else None,
                      launches=cp))
        result.transient_bytes = ring_buffer_bytes(kv_bytes, cp)
    else:
        q, kv = batch.q_len, keys
        scores = batch.sequences * local_heads * q * kv
        products = max(1, round(batch.sequences * local_heads))  # one batched GEMM kernel over (sequence, head)
        core = [
            Op("attn.scores", "gemm", core_flops / 2, q_bytes + read_kv_bytes / 2 + scores * b, dt,
               kernels=(((q, head_dim, kv, products),),)),
            # softmax reads and writes the s x s scores (and the sink column: gpt-oss's reference
            # concatenates the sink logits before the softmax); dropout writes a 1-byte mask too.
            elementwise("attn.softmax", scores + sink_logits, 1, 1, dt, flops_per_element=5, saved_elements=scores),
            elementwise("attn.dropout", scores, 1, 1 + 1 / b, dt, saved_elements=scores / b),
            Op("attn.context", "gemm", core_flops / 2, scores * b + read_kv_bytes / 2 + q_bytes, dt,
               saved_bytes=scores * b, kernels=(((q, kv, head_dim, products),),)),
        ]
        fwd += core
        result.selective_recompute = list(core)
    fwd.append(gemm("attn.out", T, local_heads * head_dim, hidden, dt, operands=shard.dense_gemm))
    fwd += tp_exit("attn.tp_reduce", T, hidden, shard, linear=True)
    fwd.append(residual("attn.residual", T, hidden, shard))
    return result
