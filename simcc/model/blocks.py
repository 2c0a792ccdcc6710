"""What each block kind runs for one micro-batch on one device, and how many parameters it holds.

Shapes follow Megatron-style tensor parallelism: column-parallel input projections, row-parallel
output projections, one all-reduce (or reduce-scatter + all-gather with sequence parallelism)
per block in each direction (Shoeybi et al. 2019; Korthikanti et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from simcc.model.ops import DTYPE_BYTES, Comm, Op, WorkItem, elementwise, gemm, grouped_gemm
from simcc.routing.gating import router_products
from simcc.routing.load import LOAD_DRAWS, RankLoads, rank_loads
from simcc.model.threshold import firing_sample
from simcc.specs.workload import (
    AttentionBlock,
    BitPatternBlock,
    ConvBlock,
    DenseFFNBlock,
    EmbeddingBlock,
    LMHeadBlock,
    LSTMBlock,
    MLPBlock,
    MoEFFNBlock,
    ThresholdTreeBlock,
)


# One weight vector per norm (RMSNorm); a LayerNorm bias would add another, < 0.01% of a layer.
NORM_PARAMS = 1


@dataclass(frozen=True)
class Batch:
    """The tokens one micro-batch brings to a layer."""

    sequences: int
    q_len: int  # new tokens per sequence (1 when decoding)
    kv_len: int  # context each new token attends to

    @property
    def tokens(self) -> int:
        return self.sequences * self.q_len


@dataclass(frozen=True)
class Shard:
    """How one device's share of a layer is cut, and which counting convention applies."""

    tp: int = 1
    sequence_parallel: bool = False
    ep: int = 1
    expert_tp: int = 1
    dtype: str = "bf16"
    router_dtype: str = "fp32"
    comm_dtype: str = "bf16"
    # Executed work halves causal attention and samples expert loads; the reporting convention
    # (model FLOPs) counts full attention and exactly balanced loads.
    executed: bool = True
    seed: int = 0  # expert-load draws
    sample_seed: int = 0  # the gating policy's measured profile (fixed across steps)
    load_draws: int = LOAD_DRAWS  # expert-load draws averaged (1: a single step's draw)
    microbatches: int = 1  # per replica per step: how many tokens a step's gradients cover
    dp: int = 1  # data-parallel replicas whose sparse gradient rows are gathered
    grad_dtype: str = "fp32"


@dataclass
class Params:
    """Parameter counts of the full (unsharded) layer, split by how they are sharded."""

    dense: float = 0.0  # sharded by tensor parallelism
    replicated: float = 0.0  # norms, routers, biases kept whole on every TP rank
    expert: float = 0.0  # all experts; sharded by expert parallelism x expert TP
    active_expert: float = 0.0  # expert parameters one token uses (k experts)
    # Sum of (rows + cols) over weight matrices: a factored optimizer keeps O(rows + cols) state.
    dense_rows_cols: float = 0.0
    expert_rows_cols: float = 0.0
    sparse_grad: float = 0.0  # of `dense`: embedding rows whose gradients sync as touched rows only

    def add(self, other: "Params") -> "Params":
        return Params(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def scaled(self, times: float) -> "Params":
        return Params(*(a * times for a in self.astuple()))

    def astuple(self) -> tuple[float, ...]:
        return (self.dense, self.replicated, self.expert, self.active_expert, self.dense_rows_cols, self.expert_rows_cols,
                self.sparse_grad)

    @property
    def total(self) -> float:
        return self.dense + self.replicated + self.expert

    @property
    def active(self) -> float:
        return self.dense + self.replicated + self.active_expert


@dataclass
class BlockWork:
    forward: list[WorkItem] = field(default_factory=list)
    # Ops replayed before the backward pass under selective recomputation (Korthikanti 2022 sec. 4.2).
    selective_recompute: list[WorkItem] = field(default_factory=list)
    moe: "MoEStats | None" = None
    per_step: list[WorkItem] = field(default_factory=list)  # once per step, before the first forward
    per_step_grads: list[WorkItem] = field(default_factory=list)  # once per step, with the gradients
    transient_bytes: float = 0.0  # a short-lived buffer the block needs besides saved activations


@dataclass(frozen=True)
class MoEStats:
    loads: RankLoads
    dispatch_bytes: float  # all-to-all bytes each rank sends in one direction
    experts_per_token: float
    remote_share: float | None = None  # topology-aware gating: share sent out of the node
    experts: int = 1


def _norm(name: str, tokens: float, hidden: int, shard: Shard) -> Op:
    # LayerNorm/RMSNorm: read x, write y; a handful of FLOPs per element.
    share = tokens / shard.tp if shard.sequence_parallel else tokens
    return elementwise(name, share * hidden, 1, 1, shard.dtype, flops_per_element=5, saved_elements=share * hidden)


def _residual(name: str, tokens: float, hidden: int, shard: Shard) -> Op:
    share = tokens / shard.tp if shard.sequence_parallel else tokens
    return elementwise(name, share * hidden, 2, 1, shard.dtype)


def _tp_entry(name: str, tokens: float, hidden: int, shard: Shard) -> list[WorkItem]:
    """Sequence parallelism gathers the sequence-sharded input before a column-parallel GEMM."""
    if shard.tp > 1 and shard.sequence_parallel:
        return [Comm(name, "all_gather", tokens * hidden * DTYPE_BYTES[shard.comm_dtype], "tp")]
    return []


def _column_gemm(name: str, tokens: float, hidden: int, width: float, shard: Shard, kept: float = 0.0) -> Op:
    """The GEMM after `_tp_entry`. With sequence parallelism it keeps its input's sequence shard
    for the backward pass and all-gathers it again there (Korthikanti et al. 2022, sec. 4.2.2),
    not the gathered copy. `kept`: bytes of its output the backward needs as well."""
    share = tokens / shard.tp if shard.sequence_parallel else tokens
    op = gemm(name, tokens, hidden, width, shard.dtype)
    return replace(op, saved_bytes=share * hidden * DTYPE_BYTES[shard.dtype] + kept)


def _tp_exit(name: str, tokens: float, hidden: int, shard: Shard) -> list[WorkItem]:
    """A row-parallel GEMM's partial sums are all-reduced (or reduce-scattered with SP)."""
    if shard.tp == 1:
        return []
    collective = "reduce_scatter" if shard.sequence_parallel else "all_reduce"
    return [Comm(name, collective, tokens * hidden * DTYPE_BYTES[shard.comm_dtype], "tp")]


# ------------------------------------------------------------------------------------------ attention

def attention_params(spec: AttentionBlock, hidden: int) -> Params:
    heads, kv_heads, head_dim = _attention_dims(spec, hidden)
    qkv = hidden * (heads + 2 * kv_heads) * head_dim
    out = heads * head_dim * hidden
    rows_cols = (hidden + (heads + 2 * kv_heads) * head_dim) + (heads * head_dim + hidden)
    return Params(dense=qkv + out, replicated=NORM_PARAMS * hidden, dense_rows_cols=rows_cols)


def _attention_dims(spec: AttentionBlock, hidden: int) -> tuple[int, int, int]:
    kv_heads = spec.kv_heads or spec.heads
    head_dim = spec.head_dim or hidden // spec.heads
    return spec.heads, kv_heads, head_dim


def attention_work(spec: AttentionBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    heads, kv_heads, head_dim = _attention_dims(spec, hidden)
    t, T, dt = shard.tp, batch.tokens, shard.dtype
    b = DTYPE_BYTES[dt]
    local_heads, local_kv = heads / t, max(kv_heads / t, 1)
    work = BlockWork()
    fwd = work.forward
    fwd.append(_norm("attn.norm", T, hidden, shard))
    fwd += _tp_entry("attn.tp_gather", T, hidden, shard)
    q_bytes = T * local_heads * head_dim * b
    kv_bytes = batch.sequences * batch.kv_len * local_kv * head_dim * b * 2
    # Q, K and V outlive the forward pass whichever way the core runs (selective recomputation
    # replays the core from them: Korthikanti et al. 2022, sec. 4.3).
    fwd.append(_column_gemm("attn.qkv", T, hidden, (local_heads + 2 * local_kv) * head_dim, shard,
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
        work.selective_recompute = list(core)
    fwd.append(gemm("attn.out", T, local_heads * head_dim, hidden, dt))
    fwd += _tp_exit("attn.tp_reduce", T, hidden, shard)
    fwd.append(_residual("attn.residual", T, hidden, shard))
    return work


def kv_cache_bytes_per_token(spec: AttentionBlock, hidden: int, dtype: str) -> float:
    """K and V for one token in one layer: 2 * kv_heads * head_dim * bytes."""
    _, kv_heads, head_dim = _attention_dims(spec, hidden)
    return 2.0 * kv_heads * head_dim * DTYPE_BYTES[dtype]


# ------------------------------------------------------------------------------------------ FFNs

def _gated_width(hidden: int, gated: bool) -> int:
    return 2 * hidden if gated else hidden


OUTPUT_DERIVED = ("relu", "tanh", "sigmoid")  # activations whose gradient is a function of their output


def _act_saved(activation: str, gated: bool, elements: float) -> float:
    """Elements an activation keeps beyond what the next GEMM keeps: ReLU, tanh and sigmoid take
    their gradient from their output, which is the next GEMM's saved input (one stored tensor, as
    PyTorch's autograd saves their result); GeLU and SiLU need their input; a gated one both halves."""
    if activation in OUTPUT_DERIVED and not gated:
        return 0.0
    return elements * (2 if gated else 1)


def ffn_params(width: int, hidden: int, gated: bool) -> Params:
    up = width * _gated_width(hidden, gated)
    down = hidden * width
    return Params(dense=up + down, replicated=NORM_PARAMS * width, dense_rows_cols=(width + _gated_width(hidden, gated)) + (hidden + width))


def dense_ffn_work(spec: DenseFFNBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    t, T, dt = shard.tp, batch.tokens, shard.dtype
    work = BlockWork()
    fwd = work.forward
    fwd.append(_norm("ffn.norm", T, hidden, shard))
    fwd += _tp_entry("ffn.tp_gather", T, hidden, shard)
    fwd.append(_column_gemm("ffn.up", T, hidden, _gated_width(spec.hidden, spec.gated) / t, shard))
    reads = 2 if spec.gated else 1
    fwd.append(elementwise("ffn.act", T * spec.hidden / t, reads, 1, dt, flops_per_element=8,
                           saved_elements=_act_saved(spec.activation, spec.gated, T * spec.hidden / t)))
    fwd.append(gemm("ffn.down", T, spec.hidden / t, hidden, dt))
    fwd += _tp_exit("ffn.tp_reduce", T, hidden, shard)
    fwd.append(_residual("ffn.residual", T, hidden, shard))
    return work


def moe_params(spec: MoEFFNBlock, hidden: int) -> Params:
    one_expert = ffn_params(hidden, spec.expert_hidden, spec.gated)
    shared = ffn_params(hidden, spec.shared_expert_hidden or spec.expert_hidden, spec.gated).scaled(spec.shared_experts)
    per_expert = one_expert.dense  # expert weights only; biases/norm counted once below
    return Params(
        dense=shared.dense,
        replicated=_router_params(spec, hidden) + NORM_PARAMS * hidden,
        expert=per_expert * spec.experts,
        active_expert=per_expert * spec.k,
        dense_rows_cols=shared.dense_rows_cols,
        expert_rows_cols=one_expert.dense_rows_cols * spec.experts,
    )


def _router_params(spec: MoEFFNBlock, hidden: int) -> int:
    """Gate weights: d x E (noisy top-k: twice); hierarchical: d x G primary plus one d x E/G gate
    per group; hash routing: none."""
    policy = spec.gating.policy
    if policy == "hash":
        return 0
    if policy == "hierarchical":
        return (hidden * (spec.gating.groups or 0) + hidden * spec.experts) * (2 if spec.gating.noisy else 1)
    return hidden * spec.experts * (2 if policy == "noisy_topk" else 1)


def _copies_per_assignment(spec: MoEFFNBlock, ep: int) -> float:
    """Token copies crossing the all-to-all per token-expert assignment. A hierarchical MoE whose
    secondary MoEs each live whole on one device sends a token once to every group it picks; the
    group's own gate and weighted sum run there (Shazeer et al. 2017, sec. 3.1): k_primary copies
    per token, not k."""
    gating, routing = spec.gating, spec.routing
    whole_groups = (gating.policy == "hierarchical" and gating.groups is not None and gating.groups % ep == 0
                    and routing.placement == "contiguous" and not routing.replicate_hot)
    return gating.k_primary / spec.k if whole_groups else 1.0


def moe_ffn_work(spec: MoEFFNBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    T, dt = batch.tokens, shard.dtype
    ep, etp = shard.ep, shard.expert_tp
    b = DTYPE_BYTES[dt]
    work = BlockWork()
    fwd = work.forward
    fwd.append(_norm("moe.norm", T, hidden, shard))
    fwd += _tp_entry("moe.tp_gather", T, hidden, shard)
    # Gate products per the policy (noisy top-k adds a d x E noise product; hierarchical gates
    # primary d x G then d x E/G per chosen group; hash routing looks the expert up).
    for name, multiplier, width in router_products(spec, ep):
        fwd.append(gemm(name, T * multiplier, hidden, width, shard.router_dtype))
    if spec.gating.policy != "hash":
        fwd.append(elementwise("moe.topk", T * spec.experts, 1, 1, shard.router_dtype, flops_per_element=6, family="gate"))
    # Permute tokens into expert order: gather k copies of each token, read once and written once.
    fwd.append(elementwise("moe.permute", T * spec.k * hidden, 1, 1, dt, family="permute"))

    loads = rank_loads(spec, T, ep, shard.seed, shard.sample_seed, balanced=not shard.executed, draws=shard.load_draws)
    # Dropless: each rank sends its routed token copies. Capacity: the padded E x C buffers move
    # whole (2*E*C*d*b per group for dispatch + combine, mechanisms.md), so traffic grows with cf.
    if loads.capacity is None:
        sent_per_rank = (loads.routed - loads.dropped) / ep
    else:
        sent_per_rank = loads.capacity * spec.experts / ep
    sent_per_rank *= _copies_per_assignment(spec, ep)
    dispatch = sent_per_rank * hidden * DTYPE_BYTES[shard.comm_dtype] if ep > 1 else 0.0
    routing = spec.routing
    remote = None if routing.keep_in_node is None else 1.0 - routing.keep_in_node
    if ep > 1:
        fwd.append(Comm("moe.dispatch", "all_to_all", dispatch, "ep", routing.all_to_all, routing.overlap_degree, remote))
    busiest, mean = list(loads.busiest_rank), list(loads.mean_rank)
    up_width = _gated_width(spec.expert_hidden, spec.gated) / etp
    fwd.append(grouped_gemm("moe.expert_up", busiest, mean, hidden, int(up_width), dt))
    reads = 2 if spec.gated else 1
    act = elementwise("moe.expert_act", sum(busiest) * spec.expert_hidden / etp, reads, 1, dt, flops_per_element=8,
                      saved_elements=_act_saved(spec.activation, spec.gated, sum(busiest) * spec.expert_hidden / etp))
    mean_act = sum(mean) * spec.expert_hidden / etp
    fwd.append(Op(act.name, act.family, act.flops, act.bytes, dt, act.saved_bytes,
                  mean_flops=mean_act * 8, mean_bytes=mean_act * (reads + 1) * b))
    fwd.append(grouped_gemm("moe.expert_down", busiest, mean, int(spec.expert_hidden / etp), hidden, dt))
    if etp > 1:
        fwd.append(Comm("moe.expert_tp_reduce", "all_reduce", sum(busiest) * hidden * DTYPE_BYTES[shard.comm_dtype], "tp"))
    if ep > 1:
        fwd.append(Comm("moe.combine", "all_to_all", dispatch, "ep", routing.all_to_all, routing.overlap_degree, remote))
    # Un-permute and weight: read k expert outputs per token and its gate weights, write one.
    fwd.append(elementwise("moe.unpermute", T * spec.k * hidden, 1, 1.0 / spec.k, dt, family="combine",
                           saved_elements=T * spec.k * hidden))
    if spec.shared_experts:
        shared_hidden = (spec.shared_expert_hidden or spec.expert_hidden) * spec.shared_experts
        fwd.append(gemm("moe.shared_up", T, hidden, _gated_width(shared_hidden, spec.gated) / shard.tp, dt))
        fwd.append(elementwise("moe.shared_act", T * shared_hidden / shard.tp, reads, 1, dt, flops_per_element=8,
                               saved_elements=_act_saved(spec.activation, spec.gated, T * shared_hidden / shard.tp)))
        fwd.append(gemm("moe.shared_down", T, shared_hidden / shard.tp, hidden, dt))
    fwd += _tp_exit("moe.tp_reduce", T, hidden, shard)
    fwd.append(_residual("moe.residual", T, hidden, shard))
    if routing.replicate_hot and ep > 1:
        # Shadowing (He et al. 2022, FasterMoE): hot experts' weights go to every rank each step,
        # and their gradients come back to the home rank.
        shadow = routing.replicate_hot * _gated_width(spec.expert_hidden, spec.gated) * hidden * 1.5 / etp
        work.per_step.append(Comm("moe.shadow_broadcast", "all_gather", shadow * DTYPE_BYTES[shard.dtype], "ep"))
        work.per_step_grads.append(Comm("moe.shadow_grad_reduce", "reduce_scatter", shadow * DTYPE_BYTES[shard.dtype], "ep"))
    kept_per_token = (loads.routed - loads.dropped) / (T * ep) if T else 0.0
    work.moe = MoEStats(loads, dispatch, kept_per_token, remote, spec.experts)
    return work


# ------------------------------------------------------------------------------------------ bit-pattern gating

def bitpattern_matrices(spec: BitPatternBlock) -> int:
    """Stored weight matrices: every node of a depth-`bits` binary tree, or only its leaves."""
    return 2 ** (spec.bits + 1) - 1 if spec.tree else 2**spec.bits


def bitpattern_params(spec: BitPatternBlock, hidden: int) -> Params:
    """The matrices count like experts: all stored, only the path's (bits + 1, or one) used per token."""
    d_in, d_out = spec.input or hidden, spec.output or hidden
    used = spec.bits + 1 if spec.tree else 1
    return Params(replicated=spec.bits * d_in + d_out, expert=bitpattern_matrices(spec) * d_in * d_out,
                  active_expert=used * d_in * d_out, expert_rows_cols=bitpattern_matrices(spec) * (d_in + d_out))


def bitpattern_work(spec: BitPatternBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    """Gater product, then one grouped product per tree level: at level l the tokens sharing a
    prefix form one of 2^l small batches (only the leaf level without the tree)."""
    d_in, d_out = spec.input or hidden, spec.output or hidden
    T, dt = batch.tokens, shard.dtype
    work = BlockWork()
    work.forward.append(gemm("bits.gater", T, d_in, spec.bits, dt))
    levels = range(spec.bits + 1) if spec.tree else [spec.bits]
    rng = np.random.default_rng(shard.seed)
    for level in levels:
        groups = 2**level
        if shard.executed:  # sign bits of random projections: tokens spread evenly over the prefixes
            tokens = rng.multinomial(T, np.full(groups, 1.0 / groups)).astype(float).tolist()
        else:
            tokens = [T / groups] * groups
        work.forward.append(grouped_gemm(f"bits.level{level}", tokens, tokens, d_in, d_out, dt))
    if spec.tree:  # sum the per-level products
        work.forward.append(elementwise("bits.sum", T * d_out, len(levels), 1, dt))
    work.forward.append(elementwise("bits.act", T * d_out, 1, 1, dt, saved_elements=T * d_out))
    return work


# ------------------------------------------------------------------------------------------ threshold trees

def threshold_tree_params(spec: ThresholdTreeBlock) -> Params:
    """Every block's MLP is stored; an input uses the blocks that fire (counted like experts)."""
    pairs = list(zip(spec.widths, spec.widths[1:]))
    per_block = sum(a * b for a, b in pairs)
    profile = firing_sample(spec, 0)
    blocks = profile.blocks
    return Params(replicated=sum(b for _, b in pairs) * blocks, expert=per_block * blocks,
                  active_expert=per_block * blocks * profile.mean_fraction,
                  expert_rows_cols=sum(a + b for a, b in pairs) * blocks)


def threshold_tree_work(spec: ThresholdTreeBlock, batch: Batch, shard: Shard) -> BlockWork:
    """Per level, the token-block pairs that fire run as one grouped product per MLP layer."""
    profile = firing_sample(spec, shard.sample_seed)
    T, dt = batch.tokens, shard.dtype
    work = BlockWork()
    for level, active in enumerate(profile.active_per_level):
        blocks = spec.branching**level
        tokens = [T * active / blocks] * blocks
        for i, (a, b) in enumerate(zip(spec.widths, spec.widths[1:])):
            work.forward.append(grouped_gemm(f"tree.level{level}.fc{i}", tokens, tokens, a, b, dt))
            work.forward.append(elementwise(f"tree.level{level}.act{i}", T * active * b, 1, 1, dt,
                                            saved_elements=T * active * b))
    # the router of each fired block: softmax over its children
    work.forward.append(elementwise("tree.route", T * sum(profile.active_per_level) * spec.branching, 1, 1, dt,
                                    flops_per_element=6, family="gate"))
    return work


# ------------------------------------------------------------------------------------------ others

def lstm_params(spec: LSTMBlock, hidden: int) -> Params:
    inputs, recurrent = spec.input_size or hidden, spec.projection or spec.hidden
    # gates: 4h x (inputs + recurrent); LSTMP adds the h x r projection (Sak et al. 2014)
    weights = 4 * spec.hidden * (inputs + recurrent) + (spec.hidden * recurrent if spec.projection else 0)
    rows_cols = (inputs + recurrent) + 4 * spec.hidden + ((spec.hidden + recurrent) if spec.projection else 0)
    return Params(dense=weights, replicated=4 * spec.hidden, dense_rows_cols=rows_cols)


def lstm_work(spec: LSTMBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    """cuDNN-style LSTM: one GEMM over all time steps for the input projection, then small per-step
    GEMMs (batch rows only) that cannot be batched across time: the recurrent product and, for an
    LSTMP, the output projection that the next step consumes."""
    inputs, width = spec.input_size or hidden, spec.projection or spec.hidden
    dt, T, t = shard.dtype, batch.tokens, shard.tp
    gates = 4 * spec.hidden / t
    b = DTYPE_BYTES[dt]
    steps = batch.q_len
    work = BlockWork()
    work.forward.append(gemm("lstm.input", T, inputs, gates, dt))

    def per_step(name: str, k: float, n: float, saved_width: float) -> Op:
        step = gemm(name, batch.sequences, k, n, dt)
        return Op(name, "lstm", step.flops * steps, step.bytes * steps, dt, saved_bytes=T * saved_width * b,
                  kernel_flops=step.flops, launches=steps, kernels=step.kernels)

    work.forward.append(per_step("lstm.recurrent", width, gates, width))
    work.forward.append(elementwise("lstm.cell", T * gates, 2, 1, dt, flops_per_element=10, saved_elements=T * gates))
    if spec.projection:
        work.forward.append(per_step("lstm.projection", spec.hidden / t, spec.projection, spec.hidden / t))
    return work


def mlp_params(spec: MLPBlock) -> Params:
    pairs = list(zip(spec.widths, spec.widths[1:]))
    return Params(dense=sum(a * b for a, b in pairs), replicated=sum(b for _, b in pairs),
                  dense_rows_cols=sum(a + b for a, b in pairs))


def mlp_work(spec: MLPBlock, batch: Batch, shard: Shard) -> BlockWork:
    work = BlockWork()
    T, dt = batch.tokens, shard.dtype
    for i, (a, b) in enumerate(zip(spec.widths, spec.widths[1:])):
        work.forward.append(gemm(f"mlp.fc{i}", T, a, b / shard.tp, dt))
        work.forward.append(elementwise(f"mlp.act{i}", T * b / shard.tp, 1, 1, dt,
                                        saved_elements=_act_saved(spec.activation, False, T * b / shard.tp)))
    return work


def conv_output_size(spec: ConvBlock) -> int:
    # "same" padding: output = ceil(input / stride)
    return math.ceil(spec.input_size / spec.stride)


def conv_params(spec: ConvBlock) -> Params:
    weights = spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel**2
    return Params(dense=weights, replicated=2 * spec.out_channels,
                  dense_rows_cols=spec.out_channels + (spec.in_channels // spec.groups) * spec.kernel**2)


def conv_work(spec: ConvBlock, batch: Batch, shard: Shard) -> BlockWork:
    """Implicit GEMM: M = images x output pixels, K = C_in/groups x kernel^2, N = C_out."""
    dt = shard.dtype
    b = DTYPE_BYTES[dt]
    images = batch.tokens  # one "token" is one image for conv models
    out = conv_output_size(spec)
    m = images * out * out
    k = (spec.in_channels // spec.groups) * spec.kernel**2
    flops = 2.0 * m * k * spec.out_channels
    in_bytes = images * spec.input_size**2 * spec.in_channels * b
    out_bytes = m * spec.out_channels * b
    weight_bytes = conv_params(spec).dense * b
    work = BlockWork()
    work.forward.append(Op("conv", "conv", flops, in_bytes + out_bytes + weight_bytes, dt, saved_bytes=in_bytes))
    # Batch norm + activation: read and write the output map.
    work.forward.append(elementwise("conv.bn_act", m * spec.out_channels, 1, 1, dt, flops_per_element=6,
                                    saved_elements=m * spec.out_channels))
    return work


def embedding_params(spec: EmbeddingBlock, hidden: int) -> Params:
    table = spec.vocab * hidden
    return Params(dense=table, sparse_grad=table if spec.sparse_gradients else 0.0)


@lru_cache(maxsize=1024)
def distinct_rows(vocab: int, draws: float, zipf: float) -> float:
    """Expected distinct tokens among `draws` drawn by Zipf(zipf) frequency from a vocabulary:
    sum over tokens of 1 - (1 - p)^draws (Zipf's law for word frequencies, exponent ~1)."""
    ranks = np.arange(1, vocab + 1, dtype=float)
    p = ranks ** -zipf
    p /= p.sum()
    return float(np.sum(-np.expm1(draws * np.log1p(-p))))


def embedding_work(spec: EmbeddingBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    work = BlockWork()
    T = batch.tokens
    work.forward.append(elementwise("embed.lookup", T * hidden, 1, 1, shard.dtype, family="embedding"))
    if shard.tp > 1:  # vocabulary-parallel lookup: partial rows are all-reduced
        work.forward += _tp_exit("embed.tp_reduce", T, hidden, shard)
    if spec.sparse_gradients:
        # The gradient is the touched rows only (ids + values; TF IndexedSlices), not a table-sized
        # buffer; with data parallelism every replica's rows are gathered by all.
        rows = distinct_rows(spec.vocab, T * shard.microbatches, spec.token_zipf)
        row_bytes = hidden / shard.tp * DTYPE_BYTES[shard.grad_dtype] + 8  # int64 row id
        work.transient_bytes = shard.dp * rows * row_bytes
        if shard.dp > 1:
            work.per_step_grads.append(Comm("embed.sparse_grad_all_gather", "all_gather", work.transient_bytes, "dp"))
    return work


def lm_head_params(spec: LMHeadBlock, hidden: int) -> Params:
    return Params(dense=0 if spec.tied else spec.vocab * hidden, replicated=NORM_PARAMS * hidden)


def lm_head_work(spec: LMHeadBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    T, dt = batch.tokens, shard.dtype
    work = BlockWork()
    work.forward.append(_norm("head.norm", T, hidden, shard))
    work.forward += _tp_entry("head.tp_gather", T, hidden, shard)
    work.forward.append(gemm("head.logits", T, hidden, spec.vocab / shard.tp, dt))
    # Softmax cross-entropy in fp32 over the local vocabulary shard.
    work.forward.append(elementwise("head.loss", T * spec.vocab / shard.tp, 1, 1, "fp32", flops_per_element=5,
                                    saved_elements=0))
    return work
