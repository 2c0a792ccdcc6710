"""What every block kind's costing takes and returns, and the pieces several kinds share.

Shapes follow Megatron-style tensor parallelism: column-parallel input projections, row-parallel
output projections, one all-reduce (or reduce-scatter + all-gather with sequence parallelism)
per block in each direction (Shoeybi et al. 2019; Korthikanti et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from simcc.model.ops import DTYPE_BYTES, Comm, GemmOperands, Op, WorkItem, elementwise, gemm
from simcc.routing.load import LOAD_DRAWS, RankLoads
from simcc.specs.vocab import Dtype

# One weight vector per norm (RMSNorm); a LayerNorm bias would add another, < 0.01% of a layer.
NORM_PARAMS = 1
NORM_TENSORS = 1
# An FFN's up projection (a gated one fused, as Megatron-LM's linear_fc1 holds both halves) and down.
FFN_WEIGHT_TENSORS = 2


@dataclass(frozen=True)
class Batch:
    """The tokens one micro-batch brings to a layer. Under context parallelism (`Shard.cp` > 1) they
    are one rank's share of each sequence, seq_len / cp (Megatron's get_batch_on_this_cp_rank); the
    attention kinds see the whole sequence, kv_len x cp, through the KV ring."""

    sequences: int
    q_len: int  # new tokens per sequence (1 when decoding)
    kv_len: int  # context each new token attends to
    # Tokens whose logits the output head computes. A serving prefill samples one token per sequence
    # and its engine keeps only those positions' hidden states for the head (vLLM's logits processor
    # prunes to the sample indices; llama.cpp asks logits of a prompt's last token); None: every
    # token (training's loss reads them all).
    sampled: int | None = None
    # A serving step: the engine writes each new token's keys and values into its KV cache (vLLM's
    # reshape_and_cache, SGLang's set_kv_buffer, llama.cpp's copies into the cache tensors).
    caches_kv: bool = False

    @property
    def tokens(self) -> int:
        return self.sequences * self.q_len

    @property
    def logit_tokens(self) -> int:
        return self.tokens if self.sampled is None else min(self.sampled, self.tokens)


@dataclass(frozen=True)
class Shard:
    """How one device's share of a layer is cut, and which counting convention applies."""

    tp: int = 1
    sequence_parallel: bool = False
    ep: int = 1
    expert_tp: int = 1
    # Context parallelism: each sequence split over cp ranks, the Batch holding this rank's share;
    # attention exchanges K and V around the cp ranks (model/kinds/attention.py, ring_exchange).
    cp: int = 1
    dtype: Dtype = "bf16"
    router_dtype: Dtype = "fp32"
    comm_dtype: Dtype = "bf16"
    # Executed work halves causal attention and samples expert loads; the reporting convention
    # (model FLOPs) counts full attention and exactly balanced loads.
    executed: bool = True
    seed: int = 0  # expert-load draws
    sample_seed: int = 0  # the gating policy's measured profile (fixed across steps)
    load_draws: int = LOAD_DRAWS  # expert-load draws averaged (1: a single step's draw)
    microbatches: int = 1  # per replica per step: how many tokens a step's gradients cover
    dp: int = 1  # data-parallel replicas whose sparse gradient rows are gathered
    ep_nodes: int = 1  # nodes an expert-parallel group spans (a deduplicating dispatcher's fan-out)
    grad_dtype: Dtype = "fp32"
    # How weight GEMMs read their operands when narrower than `dtype` (FP8 inputs, quantized
    # served weights): dense layers, routed experts and the output head; None: everything at `dtype`.
    dense_gemm: GemmOperands | None = None
    expert_gemm: GemmOperands | None = None
    head_gemm: GemmOperands | None = None
    # Megatron-Core's --tp-comm-overlap: sequence parallelism's collectives beside a dense layer's
    # linear pipeline with its GEMM (Comm.gemm_overlap; plan/training.py, tp_overlap_costs).
    tp_comm_overlap: bool = False


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
    # Parameter tensors (weights, norm vectors, biases): an unfused optimizer launches its passes
    # once per tensor. A TP rank holds a shard of every dense tensor, an EP rank its experts' tensors.
    tensors: float = 0.0
    expert_tensors: float = 0.0  # all experts'
    # Extra copies of experts a load balancer keeps (routing.redundant_experts): held and sharded
    # like experts, but not parameters of the model.
    redundant_expert: float = 0.0

    def add(self, other: "Params") -> "Params":
        return Params(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def scaled(self, times: float) -> "Params":
        return Params(*(a * times for a in self.astuple()))

    def astuple(self) -> tuple[float, ...]:
        return (self.dense, self.replicated, self.expert, self.active_expert, self.dense_rows_cols, self.expert_rows_cols,
                self.sparse_grad, self.tensors, self.expert_tensors, self.redundant_expert)

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
    combine_bytes: float | None = None  # when it differs from the dispatch (an fp8 dispatch)
    # Share of the dispatched bytes that crosses the node's fabric (a deduplicating dispatcher
    # forwards what arrives from other nodes); None: as the ranks lie.
    intra_share: float | None = None


def norm(name: str, tokens: float, hidden: int, shard: Shard) -> Op:
    # LayerNorm/RMSNorm: read x, write y; a handful of FLOPs per element.
    share = tokens / shard.tp if shard.sequence_parallel else tokens
    return elementwise(name, share * hidden, 1, 1, shard.dtype, flops_per_element=5, saved_elements=share * hidden)


def rotary(name: str, tokens: float, width: float, dtype: str) -> Op:
    """Rotary position embedding (Su et al. 2021, RoFormer, arXiv 2104.09864, sec. 3.4) on `width`
    query and key values of each token: each pair of values read, rotated by its position's angle
    and written back, one kernel (vLLM's and SGLang's rotary_embedding take queries and keys
    together; Transformer Engine's fused RoPE and llama.cpp run one per tensor). Nothing is kept
    for the backward pass, which rotates the gradient back by the same angles."""
    return elementwise(name, tokens * width, 1, 1, dtype, flops_per_element=3)


def kv_cache_write(name: str, batch: Batch, width: float, dtype: str) -> list[Op]:
    """A serving step's new keys and values (`width` values a token in this layer on this rank)
    copied into the engine's KV cache, one kernel (vLLM's reshape_and_cache_flash); a training
    step keeps no cache."""
    if not batch.caches_kv:
        return []
    return [elementwise(name, batch.tokens * width, 1, 1, dtype, flops_per_element=0)]


def residual(name: str, tokens: float, hidden: int, shard: Shard) -> Op:
    share = tokens / shard.tp if shard.sequence_parallel else tokens
    return elementwise(name, share * hidden, 2, 1, shard.dtype)


def tp_entry(name: str, tokens: float, hidden: int, shard: Shard, linear: bool = False) -> list[WorkItem]:
    """Sequence parallelism gathers the sequence-sharded input before a column-parallel GEMM.
    `linear`: that GEMM is a Transformer Engine linear, which --tp-comm-overlap pipelines the
    gather with (attention's QKV, a dense FFN's first projection)."""
    if shard.tp > 1 and shard.sequence_parallel:
        return [Comm(name, "all_gather", tokens * hidden * DTYPE_BYTES[shard.comm_dtype], "tp", regathered=True,
                     linear=linear, gemm_overlap=linear and shard.tp_comm_overlap)]
    return []


def column_gemm(name: str, tokens: float, hidden: int, width: float, shard: Shard, kept: float = 0.0) -> Op:
    """The GEMM after `tp_entry`. With sequence parallelism it keeps its input's sequence shard
    for the backward pass and all-gathers it again there (Korthikanti et al. 2022, sec. 4.2.2),
    not the gathered copy. `kept`: bytes of its output the backward needs as well."""
    share = tokens / shard.tp if shard.sequence_parallel else tokens
    op = gemm(name, tokens, hidden, width, shard.dtype, operands=shard.dense_gemm)
    return replace(op, saved_bytes=share * hidden * DTYPE_BYTES[shard.dtype] + kept)


def tp_exit(name: str, tokens: float, hidden: int, shard: Shard, linear: bool = False) -> list[WorkItem]:
    """A row-parallel GEMM's partial sums are all-reduced (or reduce-scattered with SP).
    `linear`: that GEMM is a Transformer Engine linear (attention's output projection, a dense
    FFN's second), which --tp-comm-overlap pipelines the reduce-scatter with."""
    if shard.tp == 1:
        return []
    collective = "reduce_scatter" if shard.sequence_parallel else "all_reduce"
    linear = linear and shard.sequence_parallel
    return [Comm(name, collective, tokens * hidden * DTYPE_BYTES[shard.comm_dtype], "tp", linear=linear,
                 gemm_overlap=linear and shard.tp_comm_overlap)]


def gated_width(hidden: int, gated: bool) -> int:
    """Width of an FFN's input projection: a gated one (SwiGLU/GeGLU) projects twice."""
    return 2 * hidden if gated else hidden


OUTPUT_DERIVED = ("relu", "tanh", "sigmoid")  # activations whose gradient is a function of their output


# A gated activation multiplies an activated half of its input by a gate half (SwiGLU, GeGLU:
# Shazeer 2020, arXiv 2002.05202), so the product feeding it is twice as wide.
GATED_ACTIVATIONS = ("swiglu", "geglu")


def is_gated(activation: str) -> bool:
    """For kinds without a `gated` switch, the activation's name says whether it is gated."""
    return activation in GATED_ACTIVATIONS


def act_saved(activation: str, gated: bool, elements: float) -> float:
    """Elements an activation keeps beyond what the next GEMM keeps: ReLU, tanh and sigmoid take
    their gradient from their output, which is the next GEMM's saved input (one stored tensor, as
    PyTorch's autograd saves their result); GeLU and SiLU need their input; a gated one both halves."""
    if activation in OUTPUT_DERIVED and not gated:
        return 0.0
    return elements * (2 if gated else 1)


def ffn_params(width: int, hidden: int, gated: bool) -> Params:
    """An FFN of inner width `hidden` on a `width`-wide model (dense FFNs and each MoE expert)."""
    up = width * gated_width(hidden, gated)
    down = hidden * width
    return Params(dense=up + down, replicated=NORM_PARAMS * width, dense_rows_cols=(width + gated_width(hidden, gated)) + (hidden + width),
                  tensors=FFN_WEIGHT_TENSORS + NORM_TENSORS)


def activation_op(name: str, elements: float, activation: str, dtype: Dtype) -> Op:
    """The activation on `elements` outputs, gated as its name says: a gated one reads both halves
    of its product and multiplies them (one FLOP more per output); what it keeps: `act_saved`."""
    gated = is_gated(activation)
    return elementwise(name, elements, 2 if gated else 1, 1, dtype, flops_per_element=2.0 if gated else 1.0,
                       saved_elements=act_saved(activation, gated, elements))


def drawn_per_layer(shard: Shard) -> bool:
    """Whether layers draw their own random figures: one simulated step's draw does (layers do not
    repeat one draw); an expectation over draws (expected expert loads, a firing profile) depends
    on the layer's spec and batch, not its position, so alike layers share it (and its costs)."""
    return shard.load_draws == 1


def layer_seeded(shard: Shard, index: int) -> Shard:
    """The shard a layer at `index` draws with, when layers draw their own figures: reproducible,
    and distinct from its neighbours'."""
    return replace(shard, seed=shard.seed * 100_003 + index, sample_seed=shard.sample_seed * 100_003 + index)


def embedding_lookup(prefix: str, tokens: float, hidden: int, shard: Shard) -> list[WorkItem]:
    """A vocabulary-parallel row lookup (Megatron's VocabParallelEmbedding): each TP rank gathers
    the rows of its vocabulary shard and the partial rows are all-reduced (reduce-scattered with
    sequence parallelism)."""
    items: list[WorkItem] = [elementwise(f"{prefix}.lookup", tokens * hidden, 1, 1, shard.dtype, family="embedding")]
    if shard.tp > 1:
        items += tp_exit(f"{prefix}.tp_reduce", tokens, hidden, shard)
    return items


def output_head(prefix: str, tokens: float, hidden: int, vocab: int, shard: Shard) -> list[WorkItem]:
    """Final norm, vocabulary-parallel logits and softmax cross-entropy in fp32 over the local
    vocabulary shard: the LM head's work, which multi-token-prediction modules run again with the
    shared head (DeepSeek-V3 report, arXiv 2412.19437, sec. 2.2, eq. 23)."""
    items: list[WorkItem] = [norm(f"{prefix}.norm", tokens, hidden, shard)]
    items += tp_entry(f"{prefix}.tp_gather", tokens, hidden, shard)
    items.append(gemm(f"{prefix}.logits", tokens, hidden, vocab / shard.tp, shard.dtype, operands=shard.head_gemm))
    items.append(elementwise(f"{prefix}.loss", tokens * vocab / shard.tp, 1, 1, "fp32", flops_per_element=5,
                             saved_elements=0))
    return items
