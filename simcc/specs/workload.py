"""Workload schema: model blocks, MoE, parallelism, precision, optimizer, train or serve.

A model is a list of blocks so that it can express the source papers' models (LSTMs, MLP stacks,
conv stages), not only transformers. `repeat` keeps a 94-layer model to a few lines.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from simcc.specs.base import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StrictModel,
)
from simcc.specs.hardware import Dtype

Activation = Literal["gelu", "relu", "silu", "swiglu", "geglu", "tanh", "sigmoid"]


class AttentionBlock(StrictModel):
    heads: PositiveInt
    kv_heads: PositiveInt | None = None  # GQA/MQA; defaults to heads (MHA)
    head_dim: PositiveInt | None = None  # defaults to hidden / heads
    causal: bool = True
    # flash: fused kernel, no s^2 tensors; unfused: QK^T, softmax, dropout, AV as separate kernels.
    impl: Literal["flash", "unfused"] = "flash"

    @model_validator(mode="after")
    def _kv_divides(self) -> "AttentionBlock":
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        return self


class DenseFFNBlock(StrictModel):
    hidden: PositiveInt
    gated: bool = False  # SwiGLU/GeGLU: two input projections
    activation: Activation = "gelu"


GATING_POLICIES = ("topk", "noisy_topk", "switch", "gshard", "expert_choice", "base", "hash", "hierarchical",
                   "moefication")


class GatingSpec(StrictModel):
    """How tokens choose experts (or experts choose tokens). Each parameter applies only to the
    policies named in its comment; `simcc list` shows them."""

    policy: Literal["topk", "noisy_topk", "switch", "gshard", "expert_choice", "base", "hash", "hierarchical",
                    "moefication"] = "topk"
    noise_std: NonNegativeFloat = 1.0  # noisy_topk: scale of the N(0,1) * softplus(x Wnoise) term
    groups: PositiveInt | None = None  # hierarchical: primary branching (Shazeer 2017: the device count)
    k_primary: PositiveInt = 2  # hierarchical: groups per token; k / k_primary experts in each
    noisy: bool = False  # hierarchical: noisy top-k gates at both levels (Shazeer 2017)
    vocab: PositiveInt = 32000  # hash: token-id space
    token_zipf: NonNegativeFloat = 1.0  # hash: token frequencies follow Zipf(token_zipf)
    sample_tokens: PositiveInt = 4096  # tokens routed for real per layer to measure the policy


class LoadSpec(StrictModel):
    """Expert popularity behind the router logits: uniform, Zipf(alpha), a target CV, a measured
    per-expert histogram (CSV), or the balance that an auxiliary loss reached in Shazeer et al.
    2017 (table 6, via the CV it measured for the given loss weights)."""

    distribution: Literal["uniform", "zipf", "cv", "histogram", "aux_loss"] = "uniform"
    alpha: PositiveFloat = 1.0
    cv: float = Field(default=0.0, ge=0.0)
    histogram: str | None = None  # CSV with a `tokens` column, one row per expert
    w_importance: NonNegativeFloat = 0.0
    w_load: NonNegativeFloat = 0.0
    # Gumbel noise scale on the logits: 1 makes a top-1 router pick experts exactly by popularity;
    # lower sharpens the skew, higher flattens it.
    router_temperature: PositiveFloat = 1.0

    @model_validator(mode="after")
    def _histogram_named(self) -> "LoadSpec":
        if self.distribution == "histogram" and not self.histogram:
            raise ValueError("distribution histogram needs `histogram: FILE.csv`")
        return self


class RoutingSpec(StrictModel):
    capacity_factor: PositiveFloat | None = 1.25
    # switch: ceil(cf*k*T/E); gshard: ceil(cf*2*T/E); deepspeed: max(ceil(cf*T/E)*(2 if top-2),
    # min_capacity); tutel: k*int(cf*ceil(T/E)) rounded up to capacity_alignment (mechanisms.md).
    capacity_formula: Literal["switch", "gshard", "deepspeed", "tutel"] = "switch"
    min_capacity: NonNegativeInt = 0
    capacity_alignment: PositiveInt = 1
    dropless: bool = False
    # Dropless kernels round each expert's tokens up to their block: 128 in MegaBlocks (Gale et
    # al. 2022); 1 for kernels that do not pad (e.g. decode GEMVs).
    dropless_block: PositiveInt = 128
    # flat: one all-to-all over the EP group; hierarchical: intra-node then inter-node (Tutel 2DH).
    all_to_all: Literal["flat", "hierarchical"] = "flat"
    # Pipeline dispatch, expert compute and combine in this many chunks (Tutel's overlap degree).
    overlap_degree: PositiveInt = 1
    placement: Literal["contiguous", "round_robin", "file"] = "contiguous"
    placement_file: str | None = None  # CSV with a `rank` column, one row per expert
    replicate_hot: NonNegativeInt = 0  # hottest experts copied to every EP rank (FasterMoE shadowing)
    keep_in_node: Fraction | None = None  # topology-aware gating: share of routed tokens kept in the node

    @model_validator(mode="after")
    def _consistent(self) -> "RoutingSpec":
        if self.placement == "file" and not self.placement_file:
            raise ValueError("placement file needs `placement_file: FILE.csv`")
        return self


class MoEFFNBlock(StrictModel):
    experts: PositiveInt
    expert_hidden: PositiveInt
    k: PositiveInt
    shared_experts: NonNegativeInt = 0
    shared_expert_hidden: PositiveInt | None = None  # defaults to expert_hidden
    gated: bool = False
    activation: Activation = "gelu"
    gating: GatingSpec = GatingSpec()
    routing: RoutingSpec = RoutingSpec()
    load: LoadSpec = LoadSpec()

    @model_validator(mode="after")
    def _consistent(self) -> "MoEFFNBlock":
        policy, routing = self.gating.policy, self.routing
        if self.k > self.experts:
            raise ValueError(f"k ({self.k}) must not exceed experts ({self.experts})")
        if policy == "switch" and self.k != 1:
            raise ValueError("switch gating is top-1: set k: 1")
        if policy == "gshard" and self.k != 2:
            raise ValueError("gshard gating is top-2: set k: 2")
        if policy == "hierarchical" and (self.gating.groups is None or self.experts % self.gating.groups):
            raise ValueError("hierarchical gating needs gating.groups dividing the experts")
        if policy == "hierarchical" and self.k % self.gating.k_primary:
            raise ValueError(f"hierarchical gating: k ({self.k}) must be a multiple of k_primary ({self.gating.k_primary})")
        if policy == "expert_choice" and routing.capacity_factor is None:
            raise ValueError("expert_choice needs routing.capacity_factor (each expert takes cf*T*k/E tokens)")
        if policy not in ("base", "expert_choice") and not routing.dropless and routing.capacity_factor is None:
            raise ValueError("routing.capacity_factor is required unless routing.dropless: true")
        if routing.replicate_hot > self.experts:
            raise ValueError(f"routing.replicate_hot ({routing.replicate_hot}) exceeds experts ({self.experts})")
        return self


class BitPatternBlock(StrictModel):
    """Cho & Bengio 2014: the signs of `bits` gater units pick one of 2^bits weight matrices; the
    tree variant sums the matrices on the root-to-leaf path (2^(bits+1) - 1 stored, bits + 1
    products per token)."""

    bits: PositiveInt = Field(le=24)
    input: PositiveInt | None = None  # defaults to the model's hidden size
    output: PositiveInt | None = None  # defaults to the model's hidden size
    tree: bool = True
    activation: Activation = "relu"


class ThresholdTreeBlock(StrictModel):
    """Gallicchio & Nuti 2025: a tree of MLP blocks; a block fires when the rate flowing into it
    exceeds a network-wide threshold. Easy inputs route their rate sharply down few paths, hard
    ones spread it, so harder inputs activate more blocks."""

    widths: tuple[PositiveInt, ...] = Field(min_length=2)  # each block's MLP: input -> ... -> output
    branching: PositiveInt = Field(default=2, ge=2)
    levels: PositiveInt = Field(default=4, le=12)
    threshold: Fraction = 0.1  # share of the root's rate a block needs to fire
    concentration_easy: PositiveFloat = 0.2  # Dirichlet concentration of an easy input's routing
    concentration_hard: PositiveFloat = 5.0  # ... and of a hard input's (near-even split)
    hard_fraction: float = Field(default=0.3, ge=0.0, le=1.0)  # the difficulty mix
    samples: PositiveInt = 2000  # inputs simulated to measure the activation distribution
    activation: Activation = "relu"


class LSTMBlock(StrictModel):
    hidden: PositiveInt
    input_size: PositiveInt | None = None  # defaults to the model's hidden size
    # LSTMP (Sak et al. 2014): the cell output is projected to this size, which both feeds the
    # next time step and leaves the layer. None: no projection, the output is `hidden` wide.
    projection: PositiveInt | None = None


class MLPBlock(StrictModel):
    widths: list[PositiveInt] = Field(min_length=2)
    activation: Activation = "relu"


class ConvBlock(StrictModel):
    in_channels: PositiveInt
    out_channels: PositiveInt
    kernel: PositiveInt
    input_size: PositiveInt  # spatial height = width of the input feature map
    stride: PositiveInt = 1
    groups: PositiveInt = 1

    @model_validator(mode="after")
    def _groups_divide(self) -> "ConvBlock":
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups ({self.groups}) must divide in_channels and out_channels")
        return self


class EmbeddingBlock(StrictModel):
    vocab: PositiveInt
    # Sparse updates (TF IndexedSlices, torch sparse=True): a step syncs only the rows its tokens
    # touched, gathered from every data-parallel replica, instead of all-reducing the whole table.
    sparse_gradients: bool = False
    token_zipf: NonNegativeFloat = 1.0  # token frequencies ~ Zipf(token_zipf): how many rows a batch touches


class LMHeadBlock(StrictModel):
    vocab: PositiveInt
    tied: bool = False  # shares the embedding's weights


BLOCK_KINDS = ("attention", "dense_ffn", "moe_ffn", "bitpattern", "threshold_tree", "lstm", "mlp", "conv",
               "embedding", "lm_head")


class BlockItem(StrictModel):
    """Exactly one block kind, or `repeat: N` with a nested `blocks:` list."""

    attention: AttentionBlock | None = None
    dense_ffn: DenseFFNBlock | None = None
    moe_ffn: MoEFFNBlock | None = None
    bitpattern: BitPatternBlock | None = None
    threshold_tree: ThresholdTreeBlock | None = None
    lstm: LSTMBlock | None = None
    mlp: MLPBlock | None = None
    conv: ConvBlock | None = None
    embedding: EmbeddingBlock | None = None
    lm_head: LMHeadBlock | None = None
    repeat: PositiveInt | None = None
    blocks: list["BlockItem"] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "BlockItem":
        kinds = [k for k in BLOCK_KINDS if getattr(self, k) is not None]
        if self.repeat is not None or self.blocks is not None:
            if kinds or self.repeat is None or not self.blocks:
                raise ValueError("a repeat item needs `repeat: N` and a non-empty `blocks:` list, and nothing else")
        elif len(kinds) != 1:
            raise ValueError(f"each block needs exactly one of: {', '.join(BLOCK_KINDS)} (or repeat + blocks)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in BLOCK_KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> StrictModel:
        return getattr(self, self.kind)


class ModelSpec(StrictModel):
    name: str
    hidden: PositiveInt
    blocks: list[BlockItem] = Field(min_length=1)


class Parallelism(StrictModel):
    dp: PositiveInt | None = None  # derived from the device count when omitted
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    vpp: PositiveInt = 1  # virtual stages per pipeline rank (interleaved 1F1B)
    ep: PositiveInt = 1
    expert_tp: PositiveInt | None = None  # defaults to tp
    micro_batch: PositiveInt = 1
    sequence_parallel: bool | None = None  # defaults to tp > 1
    zero_stage: Literal[0, 1, 2, 3] = 0
    recompute: Literal["none", "selective", "full"] = "none"
    schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    overlap_grad_reduce: bool = True
    # false: a pipeline stage waits for each activation/gradient send to finish before computing on,
    # as Megatron-LM's p2p calls do (Megatron-Core's overlap_p2p_comm defaults off); true: sends
    # complete in the background while the next task computes.
    overlap_p2p: bool = False

    @model_validator(mode="after")
    def _schedule_matches_vpp(self) -> "Parallelism":
        if self.schedule == "interleaved" and self.vpp < 2:
            raise ValueError("schedule interleaved needs vpp >= 2")
        if self.schedule != "interleaved" and self.vpp > 1:
            raise ValueError(f"vpp > 1 needs schedule: interleaved (got {self.schedule})")
        return self

    @property
    def effective_expert_tp(self) -> int:
        return self.expert_tp or self.tp

    @property
    def effective_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel


class Precision(StrictModel):
    weights: Dtype = "bf16"
    compute: Dtype = "bf16"
    gradients: Dtype = "bf16"
    communication: Dtype = "bf16"
    router: Dtype = "fp32"
    kv_cache: Dtype = "bf16"


class Optimizer(StrictModel):
    # adam: two moments; adafactor: factored second moment, no first moment (Shazeer 2017 sec. D).
    type: Literal["adam", "adafactor", "sgd"] = "adam"
    master_weights: bool = True  # fp32 copy when weights are kept in lower precision
    # Global gradient-norm clipping (Megatron-LM's default, clip-grad 1.0): the step reads every
    # gradient once more for the norm.
    clip_grad_norm: bool = True


class TrainSpec(StrictModel):
    seq_len: PositiveInt
    global_batch: PositiveInt  # sequences per step
    total_tokens: PositiveFloat | None = None


class ServeSpec(StrictModel):
    batch: PositiveInt  # requests decoded together
    prompt_tokens: PositiveInt
    output_tokens: PositiveInt
    arrival_rate: PositiveFloat | None = None  # requests/s


class AnytimeSpec(StrictModel):
    """TIPS (Li et al. 2023): an anytime supernet whose sub-networks are its width slices. Each
    training step runs a sandwich: the largest, the smallest, and the rest sampled by importance."""

    widths: tuple[Fraction, ...] = Field(min_length=2)  # width multipliers, ascending, ending at 1.0
    subnets_per_step: PositiveInt = Field(default=4, ge=2)
    importance: tuple[PositiveFloat, ...] | None = None  # weights of the widths between the ends; even if omitted
    serve_width: Fraction = 1.0

    @model_validator(mode="after")
    def _consistent(self) -> "AnytimeSpec":
        if list(self.widths) != sorted(set(self.widths)) or self.widths[-1] != 1.0:
            raise ValueError("widths must ascend without repeats and end at 1.0 (the supernet)")
        if self.importance is not None and len(self.importance) != len(self.widths) - 2:
            raise ValueError(f"importance needs one weight per width between the ends ({len(self.widths) - 2})")
        if self.serve_width not in self.widths:
            raise ValueError(f"serve_width {self.serve_width} is not one of the widths")
        if self.subnets_per_step > 2 and len(self.widths) < 3:
            raise ValueError("subnets_per_step > 2 needs widths between the smallest and the largest")
        return self


class SchedulePhase(StrictModel):
    """One phase of an SSD run: dense steps, or sparse steps with every FFN MoEfied into `experts`
    clusters of which `k` are active (defaults: the schedule's)."""

    mode: Literal["dense", "sparse"]
    steps: PositiveFloat | None = None
    tokens: PositiveFloat | None = None
    experts: PositiveInt | None = None
    k: PositiveInt | None = None

    @model_validator(mode="after")
    def _length_and_shape(self) -> "SchedulePhase":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give a phase either steps or tokens")
        if self.mode == "dense" and (self.experts is not None or self.k is not None):
            raise ValueError("a dense phase has no experts or k")
        return self


class ScheduleRule(StrictModel):
    """SSD's shape (Zhang et al. 2024): dense warm-up, then sparse and dense phases alternating until
    the run's last `final_dense_tokens`, which train dense."""

    warmup_tokens: PositiveFloat
    sparse_tokens: PositiveFloat
    dense_tokens: PositiveFloat
    final_dense_tokens: PositiveFloat


class Schedule(StrictModel):
    """Dense/sparse phases of a training run: an explicit list, or a rule over train.total_tokens."""

    experts: PositiveInt | None = None  # sparse phases' default E
    k: PositiveInt | None = None  # sparse phases' default active experts
    phases: list[SchedulePhase] | None = None
    rule: ScheduleRule | None = None
    conversion_iterations: PositiveInt = 10  # balanced k-means iterations per dense->sparse switch
    load: LoadSpec = LoadSpec()  # how unevenly tokens use the clustered experts

    @model_validator(mode="after")
    def _one_form(self) -> "Schedule":
        if (self.phases is None) == (self.rule is None):
            raise ValueError("give a schedule either phases or rule")
        shapes = [(p.experts or self.experts, p.k or self.k) for p in self.phases or [] if p.mode == "sparse"]
        if self.rule is not None:
            shapes.append((self.experts, self.k))
        for experts, k in shapes:
            if experts is None or k is None:
                raise ValueError("sparse phases need experts and k (on the phase or the schedule)")
            if k > experts:
                raise ValueError(f"k ({k}) must not exceed experts ({experts})")
        return self


class Workload(StrictModel):
    name: str
    description: str = ""
    source: str = ""
    mode: Literal["train", "serve"]
    model: ModelSpec
    parallelism: Parallelism = Parallelism()
    precision: Precision = Precision()
    optimizer: Optimizer = Optimizer()
    train: TrainSpec | None = None
    serve: ServeSpec | None = None
    anytime: AnytimeSpec | None = None
    schedule: Schedule | None = None  # SSD dense/sparse phases
    schedules: dict[str, Schedule] | None = None  # several, compared by name
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _mode_section(self) -> "Workload":
        if self.mode == "train" and self.train is None:
            raise ValueError("mode train needs a `train:` section (seq_len, global_batch)")
        if self.mode == "serve" and self.serve is None:
            raise ValueError("mode serve needs a `serve:` section (batch, prompt_tokens, output_tokens)")
        if self.schedule is not None and self.schedules is not None:
            raise ValueError("give either schedule or schedules (named), not both")
        if (self.schedule or self.schedules) and self.mode != "train":
            raise ValueError("a dense/sparse schedule belongs to a training workload (mode: train)")
        return self

    @property
    def named_schedules(self) -> dict[str, "Schedule"]:
        if self.schedule is not None:
            return {"schedule": self.schedule}
        return dict(self.schedules or {})
