"""Block kinds a model is built from, each registered under the YAML key that names it.

A model is a list of blocks so that it can express the source papers' models (LSTMs, MLP stacks,
conv stages), not only transformers. A kind is one class here, registered with `@block_spec`,
plus one costing module in simcc/model/kinds/; the workload's `blocks:` items are generated
from this registry (specs/workload.py), so nothing else needs to list the kinds.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from simcc.specs.base import (
    MAX_EXPERTS,
    MAX_FIRING_SAMPLES,
    MAX_OVERLAP_DEGREE,
    MAX_SAMPLED_ROUTES,
    MAX_TOKENS,
    MAX_TRAINED_GATE_EXPERTS,
    MAX_TREE_BLOCKS,
    MAX_WIDTH,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StrictModel,
    int_up_to,
)
from simcc.specs.vocab import CapacityFormula, Dtype, GatingPolicy

Activation = Literal["gelu", "relu", "silu", "swiglu", "geglu", "tanh", "sigmoid"]

# Keys of a `blocks:` item that are not block kinds.
REPEAT_KEYS = ("repeat", "blocks")


class BlockSpec(StrictModel):
    """One layer kind of a model; `kind` is its YAML key, set by `@block_spec`."""

    kind: ClassVar[str]


BLOCK_SPECS: dict[str, type[BlockSpec]] = {}  # YAML key -> spec class, in registration order

SpecT = TypeVar("SpecT", bound=BlockSpec)


def block_spec(kind: str) -> Callable[[type[SpecT]], type[SpecT]]:
    """Register a spec class under its YAML key (`- attention: {...}` in a model's blocks)."""

    def register(cls: type[SpecT]) -> type[SpecT]:
        if kind in BLOCK_SPECS or kind in REPEAT_KEYS:
            raise ValueError(f"block kind {kind!r} is already taken")
        if not cls.__doc__:
            raise ValueError(f"block kind {kind!r}: {cls.__name__} needs a docstring saying what it is (simcc list shows it)")
        cls.kind = kind
        BLOCK_SPECS[kind] = cls
        return cls

    return register


def help_line(spec_type: type[BlockSpec]) -> str:
    """A spec's docstring as one line, for `simcc list`."""
    return " ".join((spec_type.__doc__ or "").split())


@block_spec("attention")
class AttentionBlock(BlockSpec):
    """Self-attention with Q, K, V and output projections (MHA, or GQA/MQA with fewer kv_heads);
    optionally a sliding window (Mistral 7B, GPT-OSS), StreamingLLM sink tokens kept beyond it, and
    GPT-OSS's learned per-head sink logits."""

    heads: int_up_to(MAX_WIDTH)
    kv_heads: int_up_to(MAX_WIDTH) | None = None  # GQA/MQA; defaults to heads (MHA)
    head_dim: int_up_to(MAX_WIDTH) | None = None  # defaults to hidden / heads
    causal: bool = True
    # flash: fused kernel, no s^2 tensors; unfused: QK^T, softmax, dropout, AV as separate kernels.
    impl: Literal["flash", "unfused"] = "flash"
    # Sliding window: a query attends to at most this many most recent positions, itself included
    # (flash_attn's window_size=(window - 1, 0); Megatron-Core's window_size); None: unlimited.
    window: int_up_to(MAX_TOKENS) | None = None
    # StreamingLLM (Xiao et al. 2023, arXiv 2309.17453, sec. 3.2): the first sink_tokens positions
    # stay attendable, and cached, beyond the window.
    sink_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS)
    # GPT-OSS (OpenAI 2025 model card; openai/gpt-oss gpt_oss/torch/model.py `sinks`): one learned
    # logit per head joins each softmax's denominator, so a head can attend to nothing.
    learned_sinks: bool = False
    # QK-norm (Qwen3, OLMo 2, Gemma 3): an RMSNorm over each head's query and key before the
    # rotary embedding (Megatron-Core's --qk-layernorm; the q_norm and k_norm of Hugging Face's Qwen3).
    qk_norm: bool = False
    # Rotary position embedding on queries and keys (RoFormer; Llama, Mistral, Qwen, GPT-OSS);
    # false for learned absolute positions (GPT-2/3, Megatron's GPT runs) or relative biases (T5).
    rotary: bool = True

    @model_validator(mode="after")
    def _kv_divides(self) -> "AttentionBlock":
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        if self.sink_tokens and self.window is None:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) are kept beyond a sliding window; set `window` "
                             "(without one every position is attended already)")
        if self.window is not None and not self.causal:
            raise ValueError("window is modelled for causal attention only; set causal: true or drop the window")
        return self


@block_spec("mla")
class MLABlock(BlockSpec):
    """Multi-head latent attention (DeepSeek-V2/V3): queries through a low-rank bottleneck (or one
    projection), keys and values up-projected per head from a shared kv_lora_rank latent, plus a
    decoupled RoPE key shared by all heads; a KV cache keeps only the latent and the RoPE key."""

    heads: int_up_to(MAX_WIDTH)
    q_lora_rank: int_up_to(MAX_WIDTH) | None = None  # None: queries from one hidden x heads projection
    kv_lora_rank: int_up_to(MAX_WIDTH)
    qk_nope_head_dim: int_up_to(MAX_WIDTH) = 128
    qk_rope_head_dim: int_up_to(MAX_WIDTH) = 64
    v_head_dim: int_up_to(MAX_WIDTH) = 128
    causal: bool = True


@block_spec("dense_ffn")
class DenseFFNBlock(BlockSpec):
    """Transformer feed-forward layer: up projection to `hidden`, activation, down projection."""

    hidden: int_up_to(MAX_WIDTH)
    gated: bool = False  # SwiGLU/GeGLU: two input projections
    activation: Activation = "gelu"


class GatingSpec(StrictModel):
    """How tokens choose experts (or experts choose tokens). Each parameter applies only to the
    policies named in its comment; `simcc list` shows them."""

    policy: GatingPolicy = "topk"
    noise_std: NonNegativeFloat = 1.0  # noisy_topk: scale of the N(0,1) * softplus(x Wnoise) term
    groups: PositiveInt | None = None  # hierarchical: primary branching (Shazeer 2017: the device count)
    k_primary: PositiveInt = 2  # hierarchical: groups per token; k / k_primary experts in each
    noisy: bool = False  # hierarchical: noisy top-k gates at both levels (Shazeer 2017)
    vocab: int_up_to(MAX_WIDTH) = 32000  # hash: token-id space
    token_zipf: NonNegativeFloat = 1.0  # hash: token frequencies follow Zipf(token_zipf)
    sample_tokens: PositiveInt = 4096  # tokens routed for real per layer to measure the policy


def independent_overlap(experts: int, k: int) -> float:
    """Chance that two independent uniform picks of k of `experts` share at least one expert:
    1 - C(E - k, k) / C(E, k) (46% for Mixtral's 2 of 8, as its paper's table 5 notes)."""
    if 2 * k > experts:
        return 1.0
    return 1.0 - math.comb(experts - k, k) / math.comb(experts, k)


class LoadSpec(StrictModel):
    """Expert popularity behind the router logits: uniform, Zipf(alpha), a target CV, a measured
    per-expert histogram (CSV), or the balance a noisy top-k gate reaches when it is trained with
    Shazeer et al. 2017's importance and load losses (aux_loss: routing/trained_gate.py)."""

    distribution: Literal["uniform", "zipf", "cv", "histogram", "aux_loss", "trained"] = "uniform"
    alpha: PositiveFloat = 1.0
    cv: float = Field(default=0.0, ge=0.0)
    histogram: str | None = None  # CSV with a `tokens` column, one row per expert
    w_importance: NonNegativeFloat = 0.0  # aux_loss: weight of the importance loss
    w_load: NonNegativeFloat = 0.0  # aux_loss: weight of the load loss
    # aux_loss: tokens the model trains on over the run; with each expert's parameters it sets how
    # much an expert gains from extra data, the pull that makes an unbalanced gate collapse.
    train_tokens: PositiveFloat | None = Field(default=None, le=1e16)
    # Gumbel noise scale on the logits: 1 makes a top-1 router pick experts exactly by popularity;
    # lower sharpens the skew, higher flattens it.
    router_temperature: PositiveFloat = 1.0
    # trained: the load a router trained to balance still leaves, from published statistics
    # (routing/trained_load.py): by an auxiliary loss, or by DeepSeek-V3's loss-free bias; or
    # the max-over-mean excess (MaxVio) a user measured over 64 experts.
    balancing: Literal["aux_loss", "aux_loss_free"] = "aux_loss"
    max_violation: NonNegativeFloat | None = Field(default=None, le=50.0)
    # Share of a sequence's consecutive tokens whose k experts share at least one (the "first or
    # second choice" repetitions of Jiang et al. 2024, Mixtral of Experts, arXiv 2401.04088, table
    # 5: 44.9-49.9% at layer 0, 61.6-67.0% at layer 15, 44.5-53.6% at layer 31, where independent
    # picks give 46%). What an expert cache's hits depend on (plan/serving.py); None: each token
    # picks independently of the one before.
    consecutive_overlap: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _histogram_named(self) -> "LoadSpec":
        if self.distribution == "histogram" and not self.histogram:
            raise ValueError("distribution histogram needs `histogram: FILE.csv`")
        if self.distribution == "aux_loss" and self.train_tokens is None:
            raise ValueError("distribution aux_loss needs `train_tokens`: the tokens the model trains on over the run")
        return self


class RoutingSpec(StrictModel):
    """What happens to routed tokens: capacity, dropping or padding, the all-to-all, placement."""

    capacity_factor: PositiveFloat | None = 1.25
    capacity_formula: CapacityFormula = "switch"  # the formulas: specs/vocab.py, `simcc list`
    min_capacity: NonNegativeInt = 0
    capacity_alignment: PositiveInt = 1
    dropless: bool = False
    # Dropless kernels round each expert's tokens up to their block: 128 in MegaBlocks (Gale et
    # al. 2022); 1 for kernels that do not pad (e.g. decode GEMVs).
    dropless_block: PositiveInt = 128
    # flat: one all-to-all over the EP group; hierarchical: intra-node then inter-node (Tutel 2DH).
    all_to_all: Literal["flat", "hierarchical"] = "flat"
    # Pipeline dispatch, expert compute and combine in this many chunks (Tutel's overlap degree).
    overlap_degree: int_up_to(MAX_OVERLAP_DEGREE) = 1
    placement: Literal["contiguous", "round_robin", "file"] = "contiguous"
    placement_file: str | None = None  # CSV with a `rank` column, one row per expert
    replicate_hot: NonNegativeInt = 0  # hottest experts copied to every EP rank (FasterMoE shadowing)
    # Expert-parallel load balancing (DeepSeek-V3 report sec. 3.4, redundant experts; the EPLB
    # algorithm, deepseek-ai/EPLB): this many extra copies of the most loaded experts, all copies
    # then placed on ranks by load, (experts + redundant) / ep slots each. Static: no per-step copy.
    redundant_experts: NonNegativeInt = 0
    keep_in_node: Fraction | None = None  # topology-aware gating: share of routed tokens kept in the node
    # How routed tokens reach their experts' ranks (simcc/model/kinds/moe_ffn.py):
    #   alltoall: one copy per token and chosen expert, over one all-to-all (Megatron-Core's
    #     alltoall dispatcher);
    #   allgather: every EP rank gathers every rank's tokens and keeps its experts' rows; the
    #     combine reduce-scatters (Megatron-Core's allgather dispatcher);
    #   deduplicated: a token crosses the network once per destination node, then is forwarded
    #     over NVLink once to each GPU holding any of its experts, whose outputs come back summed
    #     (DeepSeek-V3 report sec. 3.2.2; DeepEP's normal kernels);
    #   low_latency: GPU-initiated sends of each token copy straight to its expert's GPU, all
    #     peers at once, NVLink inside the node and RDMA across, for small decode batches
    #     (DeepEP's low-latency kernels).
    dispatcher: Literal["alltoall", "allgather", "deduplicated", "low_latency"] = "alltoall"
    # The shared expert computes while the routed tokens are in flight: its up-projection during
    # the dispatch, its down-projection during the combine (Megatron-Core's
    # --moe-shared-expert-overlap, on a separate CUDA stream).
    shared_expert_overlap: bool = False
    # Node-limited routing: a token's experts lie on at most this many nodes (DeepSeek-V3: 4).
    max_nodes_per_token: PositiveInt | None = None
    # Device-limited routing: on at most this many EP ranks (DeepSeek-V2, arXiv 2405.04434 sec.
    # 2.2.2: M = 3; Megatron-Core's group-limited router with one expert group per EP rank,
    # --moe-router-num-groups = EP and --moe-router-group-topk = this).
    max_ranks_per_token: PositiveInt | None = None
    # The dtype tokens are sent in to the experts (fp8: DeepSeek-V3 quantizes before dispatch and
    # combines in bf16); default the workload's communication dtype.
    dispatch_dtype: Dtype | None = None
    # Where each expert output is scaled by its gate weight: in the combine, which then keeps the
    # expert outputs for the weights' gradient (GShard's combine einsum, DeepSeek-V3's reference
    # MoE), or inside the expert's activation, act(x) * p, whose gradient needs only what the down
    # projection keeps anyway (Megatron-Core's activation_func_with_probs, megatron/core/
    # transformer/moe/experts.py; its dispatchers unpermute with no probs). activation_eager: the
    # same as separate eager ops where no fused weighted-activation kernel applies (TEGroupedMLP's
    # bias_act_func without bias_activation_fusion, or for a plain GeLU): act(x), times the fp32
    # weights (the product promotes to fp32), cast back, two more passes over the activation.
    gate_weights_applied: Literal["combine", "activation", "activation_eager"] = "combine"

    @model_validator(mode="after")
    def _consistent(self) -> "RoutingSpec":
        if self.placement == "file" and not self.placement_file:
            raise ValueError("placement file needs `placement_file: FILE.csv`")
        if self.max_nodes_per_token is not None and self.max_ranks_per_token is not None:
            raise ValueError("set max_nodes_per_token (node-limited) or max_ranks_per_token (device-limited), not both")
        if self.dispatcher in ("allgather", "deduplicated", "low_latency") and self.all_to_all != "flat":
            raise ValueError(f"all_to_all: {self.all_to_all} is a way of running the alltoall dispatcher, not {self.dispatcher}")
        return self


@block_spec("moe_ffn")
class MoEFFNBlock(BlockSpec):
    """Mixture-of-experts feed-forward layer: a router sends each token to k of `experts` FFNs."""

    experts: int_up_to(MAX_EXPERTS)
    expert_hidden: int_up_to(MAX_WIDTH)
    k: PositiveInt
    shared_experts: NonNegativeInt = 0
    shared_expert_hidden: int_up_to(MAX_WIDTH) | None = None  # defaults to expert_hidden
    gated: bool = False
    activation: Activation = "gelu"
    gating: GatingSpec = GatingSpec()
    routing: RoutingSpec = RoutingSpec()
    load: LoadSpec = LoadSpec()

    def _logits_per_sampled_token(self) -> int:
        """A hierarchical gate draws its groups' logits and the chosen groups' (routing/gating.py);
        the others every expert's."""
        groups = self.gating.groups
        if self.gating.policy == "hierarchical" and groups and self.experts % groups == 0:
            return groups + self.gating.k_primary * (self.experts // groups)
        return self.experts

    @model_validator(mode="after")
    def _consistent(self) -> "MoEFFNBlock":
        policy, routing = self.gating.policy, self.routing
        if self.k > self.experts:
            raise ValueError(f"k ({self.k}) must not exceed experts ({self.experts})")
        independent = independent_overlap(self.experts, self.k)
        overlap = self.load.consecutive_overlap
        if overlap is not None and overlap < independent - 1e-9:
            raise ValueError(f"load.consecutive_overlap ({overlap}) is below {independent:.3f}, what independent picks "
                             f"of {self.k} of {self.experts} experts already share")
        per_token = self._logits_per_sampled_token()
        routes = self.gating.sample_tokens * per_token
        if routes > MAX_SAMPLED_ROUTES:
            raise ValueError(f"the routing sample draws gating.sample_tokens x {per_token:,} = {routes:,} logits, more "
                             f"than {MAX_SAMPLED_ROUTES:,}; use gating.sample_tokens <= {max(1, MAX_SAMPLED_ROUTES // per_token)}")
        if policy == "switch" and self.k != 1:
            raise ValueError("switch gating is top-1: set k: 1")
        if policy == "gshard" and self.k != 2:
            raise ValueError("gshard gating is top-2: set k: 2")
        if policy == "hierarchical" and (self.gating.groups is None or self.experts % self.gating.groups):
            raise ValueError("hierarchical gating needs gating.groups dividing the experts")
        if policy == "hierarchical" and self.k % self.gating.k_primary:
            raise ValueError(f"hierarchical gating: k ({self.k}) must be a multiple of k_primary ({self.gating.k_primary})")
        if policy == "round_robin" and self.load.distribution != "uniform":
            raise ValueError("round_robin gating assigns experts by token position, whatever the data: "
                             f"load.distribution must be uniform, got {self.load.distribution}")
        if policy == "expert_choice" and routing.capacity_factor is None:
            raise ValueError("expert_choice needs routing.capacity_factor (each expert takes cf*T*k/E tokens)")
        if policy not in ("base", "expert_choice") and not routing.dropless and routing.capacity_factor is None:
            raise ValueError("routing.capacity_factor is required unless routing.dropless: true")
        if self.load.distribution == "aux_loss" and self.experts > MAX_TRAINED_GATE_EXPERTS:
            raise ValueError(f"load.distribution aux_loss trains a gate over the experts; at most {MAX_TRAINED_GATE_EXPERTS:,} "
                             f"experts, got {self.experts:,} (use distribution cv or histogram)")
        if routing.replicate_hot > self.experts:
            raise ValueError(f"routing.replicate_hot ({routing.replicate_hot}) exceeds experts ({self.experts})")
        if routing.shared_expert_overlap and not self.shared_experts:
            raise ValueError("routing.shared_expert_overlap hides the dispatch behind the shared expert: it needs "
                             "shared_experts >= 1")
        if routing.redundant_experts:
            if routing.redundant_experts > self.experts:
                raise ValueError(f"routing.redundant_experts ({routing.redundant_experts}) exceeds experts ({self.experts})")
            if routing.replicate_hot or routing.placement != "contiguous":
                raise ValueError("routing.redundant_experts places every expert by load (EPLB): leave placement "
                                 "contiguous and replicate_hot 0")
            if not routing.dropless or policy in ("base", "expert_choice"):
                raise ValueError("routing.redundant_experts splits an expert's tokens over its copies: it needs "
                                 "routing.dropless: true and a top-k style gate")
        return self


@block_spec("bitpattern")
class BitPatternBlock(BlockSpec):
    """Bit-pattern gating (Cho & Bengio 2014): the signs of `bits` gater units pick one of 2^bits
    weight matrices; the tree variant sums the matrices on the root-to-leaf path (2^(bits+1) - 1
    stored, bits + 1 products per token)."""

    bits: int_up_to(24)
    input: PositiveInt | None = None  # defaults to the model's hidden size
    output: PositiveInt | None = None  # defaults to the model's hidden size
    tree: bool = True
    activation: Activation = "relu"  # swiglu/geglu: each chosen matrix's product is twice as wide
    # How popular the 2^bits leaves (sign patterns) are, in an MoE layer's load vocabulary; the
    # hot leaves land at random patterns. Uniform: the gater's signs split tokens evenly.
    leaves: LoadSpec = LoadSpec()

    # A leaf's popularity is the gater's, not a router's: no trained-gate balance, no Gumbel
    # temperature, and no per-leaf histogram file (the loader tracks only MoE layers' files).
    LEAF_DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("uniform", "zipf", "cv")
    LEAF_FIELDS: ClassVar[tuple[str, ...]] = ("distribution", "alpha", "cv")

    @field_validator("leaves", mode="before")
    @classmethod
    def _leaf_popularity(cls, leaves: Any) -> Any:
        """Checked before the load spec's own rules, which speak of routers (aux_loss's train_tokens)."""
        given = leaves.model_dump(exclude_unset=True) if isinstance(leaves, LoadSpec) else leaves
        if not isinstance(given, dict):
            return leaves  # the load spec's own validation names what is wrong
        distribution = given.get("distribution", "uniform")
        if distribution not in cls.LEAF_DISTRIBUTIONS:
            raise ValueError(f"distribution {distribution} does not apply to bit-pattern leaves; "
                             f"use one of {', '.join(cls.LEAF_DISTRIBUTIONS)}")
        router_only = sorted(set(given) - set(cls.LEAF_FIELDS))
        if router_only:
            raise ValueError(f"{router_only[0]} is an MoE router setting; bit-pattern leaves take "
                             f"{', '.join(cls.LEAF_FIELDS)}")
        return leaves


@block_spec("threshold_tree")
class ThresholdTreeBlock(BlockSpec):
    """Threshold-fired tree of MLP blocks (Gallicchio & Nuti 2025): a block fires when the rate
    flowing into it exceeds a network-wide threshold. Easy inputs route their rate sharply down
    few paths, hard ones spread it, so harder inputs activate more blocks."""

    widths: tuple[PositiveInt, ...] = Field(min_length=2)  # each block's MLP: input -> ... -> output
    branching: PositiveInt = Field(default=2, ge=2)
    levels: int_up_to(12) = 4
    threshold: Fraction = 0.1  # share of the root's rate a block needs to fire
    concentration_easy: PositiveFloat = 0.2  # Dirichlet concentration of an easy input's routing
    concentration_hard: PositiveFloat = 5.0  # ... and of a hard input's (near-even split)
    hard_fraction: float = Field(default=0.3, ge=0.0, le=1.0)  # the difficulty mix
    samples: PositiveInt = 2000  # inputs simulated to measure the activation distribution
    activation: Activation = "relu"  # swiglu/geglu: each MLP layer's product is twice as wide
    # Paths (rays) sampled per input, each descending from the root to a child it may fire,
    # chosen by the routing shares; None: every child above the threshold fires (all paths).
    rays: int_up_to(4096) | None = None
    # Progressive evaluation: thresholds tried first, highest first, each above `threshold`, which
    # comes last; an anytime answer exists after each.
    progressive: tuple[Fraction, ...] = Field(default=(), max_length=16)
    # A block computed for an earlier ray or an earlier threshold is not computed again (its
    # output is reused); false: every ray and every threshold computes what it visits.
    reuse: bool = True

    @model_validator(mode="after")
    def _bounded(self) -> "ThresholdTreeBlock":
        schedule = (*self.progressive, self.threshold)
        if any(a <= b for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"progressive thresholds must fall, each above the next and the last above threshold "
                             f"{self.threshold}; got {list(self.progressive)}")
        blocks = sum(self.branching**level for level in range(self.levels))
        if blocks > MAX_TREE_BLOCKS:
            raise ValueError(f"branching {self.branching} over {self.levels} levels makes {blocks:,} blocks; "
                             f"at most {MAX_TREE_BLOCKS:,}")
        leaves = self.branching ** (self.levels - 1)
        stages = len(schedule)  # the firing is worked out once per threshold
        if self.samples * leaves * stages > MAX_FIRING_SAMPLES:
            raise ValueError(f"samples x leaf blocks x thresholds = {self.samples * leaves * stages:,} exceeds "
                             f"{MAX_FIRING_SAMPLES:,}; use samples <= {max(1, MAX_FIRING_SAMPLES // (leaves * stages))}")
        ray_steps = self.samples * (self.rays or 0) * self.branching * self.levels * stages
        if ray_steps > MAX_FIRING_SAMPLES:
            raise ValueError(f"samples x rays x branching x levels x thresholds = {ray_steps:,} exceeds "
                             f"{MAX_FIRING_SAMPLES:,}; use rays <= "
                             f"{max(1, MAX_FIRING_SAMPLES // (self.samples * self.branching * self.levels * stages))}")
        return self


@block_spec("lstm")
class LSTMBlock(BlockSpec):
    """LSTM layer over the sequence, optionally with an output projection (LSTMP)."""

    hidden: int_up_to(MAX_WIDTH)
    input_size: int_up_to(MAX_WIDTH) | None = None  # defaults to the model's hidden size
    # LSTMP (Sak et al. 2014): the cell output is projected to this size, which both feeds the
    # next time step and leaves the layer. None: no projection, the output is `hidden` wide.
    projection: int_up_to(MAX_WIDTH) | None = None


@block_spec("mlp")
class MLPBlock(BlockSpec):
    """Stack of fully connected layers through the given widths, an activation after each."""

    widths: list[PositiveInt] = Field(min_length=2)
    activation: Activation = "relu"


@block_spec("conv")
class ConvBlock(BlockSpec):
    """2-D convolution with "same" padding, then batch norm and activation; one token is one image."""

    in_channels: int_up_to(MAX_WIDTH)
    out_channels: int_up_to(MAX_WIDTH)
    kernel: PositiveInt
    input_size: int_up_to(MAX_WIDTH)  # spatial height = width of the input feature map
    stride: PositiveInt = 1
    groups: PositiveInt = 1

    @model_validator(mode="after")
    def _groups_divide(self) -> "ConvBlock":
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups ({self.groups}) must divide in_channels and out_channels")
        return self


@block_spec("embedding")
class EmbeddingBlock(BlockSpec):
    """Token embedding table lookup; rides with the first pipeline stage."""

    vocab: int_up_to(MAX_WIDTH)
    # Sparse updates (TF IndexedSlices, torch sparse=True): a step syncs only the rows its tokens
    # touched, gathered from every data-parallel replica, instead of all-reducing the whole table.
    sparse_gradients: bool = False
    token_zipf: NonNegativeFloat = 1.0  # token frequencies ~ Zipf(token_zipf): how many rows a batch touches


@block_spec("lm_head")
class LMHeadBlock(BlockSpec):
    """Final norm, vocabulary projection and softmax cross-entropy; rides with the last pipeline stage."""

    vocab: int_up_to(MAX_WIDTH)
    tied: bool = False  # shares the embedding's weights


# DeepSeek-V3 trains with one module (arXiv 2412.19437, sec. 4.2); Gloeckle et al. 2024 (arXiv
# 2404.19737) predict up to 8 tokens ahead. A module runs one transformer layer of a few blocks.
MAX_MTP_DEPTH = 16
MAX_MTP_LAYER_BLOCKS = 16


@block_spec("mtp")
class MTPBlock(BlockSpec):
    """Multi-token prediction (DeepSeek-V3, arXiv 2412.19437, sec. 2.2): `depth` sequential modules,
    each normalising the previous depth's hidden states and the shared embedding of the token k
    ahead, projecting them 2d -> d, running one transformer layer (`layer`) and the shared output
    head. Training only: serving skips it. Place it just before the lm_head (the last pipeline stage)."""

    vocab: int_up_to(MAX_WIDTH)  # the shared embedding and output head's vocabulary
    depth: int_up_to(MAX_MTP_DEPTH) = 1  # D sequential modules, each predicting one token further
    # The transformer layer each module runs, as `blocks:` items (`- mla: {...}`, `- moe_ffn: {...}`).
    # The MTP loss weight (lambda, eq. 25) scales the loss, not the work, so it is not a field.
    layer: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MTP_LAYER_BLOCKS)

    # What a module's layer cannot hold: another MTP module, a repeat, or the shared embedding and
    # head (the module uses the model's own).
    NOT_IN_LAYER: ClassVar[tuple[str, ...]] = ("mtp", "embedding", "lm_head", *REPEAT_KEYS)

    @field_validator("layer")
    @classmethod
    def _layer_blocks(cls, layer: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each item validated by its kind's spec class, as the model's `blocks:` items are."""
        from pydantic import ValidationError  # a ValueError whose text spans lines: reported as one

        checked: list[dict[str, Any]] = []
        for position, item in enumerate(layer):
            if len(item) != 1:
                raise ValueError(f"layer item {position} needs exactly one block kind, got {sorted(item) or 'none'}")
            ((kind, value),) = item.items()
            if kind in cls.NOT_IN_LAYER:
                raise ValueError(f"layer item {position}: {kind} cannot sit inside an mtp layer (it takes the blocks "
                                 "of one transformer layer; the embedding and head are the model's own)")
            spec_type = BLOCK_SPECS.get(kind)
            if spec_type is None:
                allowed = [k for k in BLOCK_SPECS if k not in cls.NOT_IN_LAYER]
                raise ValueError(f"layer item {position}: unknown block kind {kind!r}; one of: {', '.join(allowed)}")
            try:
                checked.append({kind: spec_type.model_validate(value)})
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"layer item {position} ({kind}{'.' + where if where else ''}): {first['msg']}") from None
        return checked

    @property
    def layer_specs(self) -> list[BlockSpec]:
        """The layer's block specs, in order."""
        return [spec for item in self.layer for spec in item.values()]
