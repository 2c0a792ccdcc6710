"""What an estimate returns, as types: one dataclass per report section, one per table row.

Field names carry their unit (`_s`, `_gb`, `_mb`, `usd`, `kwh`) and are the keys users see in
JSON and CSV; renderers derive every output format from these fields, so a metric is named in
exactly one place. A field made with `optional()` is left out of the output while it is None
(a section that only some workloads have a value for); other None values print as "-".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

OMIT_IF_NONE = "omit_if_none"


def optional() -> Any:
    """A field that only some estimates have: absent from the output when None."""
    return field(default=None, metadata={OMIT_IF_NONE: True})


class Record:
    """A dataclass whose fields render as (name, value) pairs, in declaration order."""

    def items(self) -> Iterator[tuple[str, Any]]:
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            if value is None and spec.metadata.get(OMIT_IF_NONE):
                continue
            yield spec.name, value

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items())


class Section(Record):
    title: ClassVar[str]


@dataclass(frozen=True)
class LayoutSection(Section):
    title: ClassVar[str] = "Parallel layout"
    devices: int
    nodes: int
    dp: int
    tp: int
    cp: int  # context parallelism: ranks that split each sequence
    pp: int
    vpp: int
    ep: int
    expert_tp: int
    expert_dp: int
    microbatches_per_step: int


@dataclass(frozen=True)
class ModelSection(Section):
    title: ClassVar[str] = "Model"
    params_b: float
    active_params_b: float
    # threshold activation (Gallicchio & Nuti 2025): expected and tail compute per input
    input_dependent_flop_share: float | None = optional()
    blocks_fired_mean: float | None = optional()
    blocks_fired_p95: float | None = optional()
    blocks_fired_p99: float | None = optional()
    forward_gflop_per_token: float | None = optional()  # training: model FLOPs convention
    # capacity-to-computation ratio (Cho & Bengio 2014): parameters per forward FLOP of one token
    params_per_token_flop: float | None = optional()
    serve_width: float | None = optional()  # anytime networks: the width served


@dataclass(frozen=True)
class StepSection(Section):
    """Where the critical (busiest) stage's step time goes, measured from the simulated timeline."""

    title: ClassVar[str] = "Training step (critical stage)"
    step_s: float
    step_p95_s: float
    compute_s: float
    exposed_comm_s: float
    imbalance_s: float
    bubble_s: float
    optimizer_s: float
    simulated_steps: int
    simulated_events: int

    # The parts a step is split into, in report order (compare and sweep columns, validation's
    # dominant part, plots).
    BREAKDOWN: ClassVar[tuple[str, ...]] = ("compute_s", "exposed_comm_s", "imbalance_s", "bubble_s", "optimizer_s")

    def breakdown(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.BREAKDOWN}

    def dominant(self) -> str:
        """The part that takes most of the step, with its share: 'compute 77%'."""
        parts = self.breakdown()
        name = max(parts, key=lambda key: parts[key])
        return f"{name.removesuffix('_s')} {parts[name] / self.step_s:.0%}"


@dataclass(frozen=True)
class LatencySection(Section):
    title: ClassVar[str] = "Serving latency"
    requests_simulated: int
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    tpot_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    queueing_mean_s: float
    queueing_p95_s: float


@dataclass(frozen=True)
class TrainingThroughput(Section):
    title: ClassVar[str] = "Throughput"
    tokens_per_s: float
    model_tflops_per_device: float  # model FLOPs (Narayanan et al. 2021 convention) per second
    mfu: float
    # Megatron-Bridge's formula (causal attention products at half, no router): what Megatron-Core
    # MoE recipes and their published tables report
    megatron_tflops_per_device: float


@dataclass(frozen=True)
class ServingThroughput(Section):
    title: ClassVar[str] = "Throughput"
    requests_per_s: float
    output_tokens_per_s: float
    busy_fraction: float
    model_tflops_per_device: float
    mfu: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens_per_s


@dataclass(frozen=True)
class MemorySection(Section):
    """Per device, of the stage that holds the most."""

    title: ClassVar[str] = "Memory per device"
    weights_gb: float
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    buffers_gb: float
    kv_cache_gb: float
    reserve_gb: float
    offloaded_weights_gb: float
    total_gb: float
    capacity_gb: float
    headroom_gb: float
    fits: bool
    largest_part: str  # the part a setting can shrink that takes the most (weights, gradients, ...)
    largest_share: float  # its share of total_gb


@dataclass(frozen=True)
class MoESection(Section):
    title: ClassVar[str] = "MoE routing"
    moe_layers: int
    load_cv: float
    max_over_mean_load: float
    # the busiest expert-parallel rank's assignments over the mean rank's (mean over layers): what a
    # dropless step waits for, in its expert GEMMs and in its all-to-all's busiest receiver
    busiest_rank_over_mean: float
    dropped_fraction: float
    padding_fraction: float
    experts_per_token: float
    all_to_all_mb_per_layer: float


@dataclass(frozen=True)
class CommSection(Section):
    """Communication per step on the stage with the most of it, by parallel dimension: the time its
    transfers take on the links (link) and the part of the step spent waiting for them (exposed)."""

    title: ClassVar[str] = "Communication per step by parallel dimension"
    tp_link_s: float
    tp_exposed_s: float
    # context parallelism's KV ring: link includes the transfers hidden behind the attention steps
    cp_link_s: float
    cp_exposed_s: float
    ep_link_s: float
    ep_exposed_s: float
    dp_link_s: float
    dp_exposed_s: float
    pp_link_s: float
    pp_exposed_s: float


@dataclass(frozen=True)
class ExpertCacheSection(Section):
    title: ClassVar[str] = "Expert cache (edge)"
    resident_experts: int
    hit_rate: float
    loading_share_of_busy_time: float
    policy: str  # "lru (global)": one cache over all layers; lru | lfu: per layer (serve.expert_cache)
    per_layer: int | None = optional()  # experts cached per MoE layer
    prefetch_hit_share: float | None = optional()  # of the experts prefetched, the share needed
    bytes_per_output_token: float = 0.0  # storage-tier bytes a full-batch decode step moves, per token
    load_hidden_s_per_decode_step: float = 0.0  # needed prefetches done under the previous layer's compute
    load_exposed_s_per_decode_step: float = 0.0  # misses and prefetch overflow: added to the step
    load_wasted_s_per_decode_step: float = 0.0  # link time on prefetched experts not needed


@dataclass(frozen=True)
class DisaggregatedSection(Section):
    """Prefill and decode on separate pools (DistServe, Zhong et al. 2024; Splitwise, Patel et al.
    2024): each pool's busy share, the KV cache each request's prompt hands over (per device: every
    device of an instance sends its own shard at once), the time on the link, and the handoff from
    the first token to joining a decode batch (waiting for a slot, KV room and the link, then the
    transfer). TPOT percentiles here: the transfer falls between the first and second tokens."""

    title: ClassVar[str] = "Prefill/decode disaggregation"
    prefill_instances: int
    decode_instances: int
    kv_link: str  # inter | intra
    prefill_busy_share: float
    decode_busy_share: float
    kv_mb_per_device_mean: float
    kv_gb_per_device_total: float  # all requests simulated
    kv_transfer_mean_s: float
    kv_transfer_p99_s: float
    kv_link_busy_share: float  # of one instance port's time, mean over the ports of both pools
    handoff_mean_s: float
    handoff_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float


@dataclass(frozen=True)
class GoodputSection(Section):
    """Requests that met every latency objective given (DistServe's goodput, Zhong et al. 2024):
    their share, and the requests and output tokens per second they account for."""

    title: ClassVar[str] = "Goodput under SLOs"
    slo_ttft_s: float | None
    slo_tpot_s: float | None
    share_meeting_slo: float
    goodput_requests_per_s: float
    goodput_tokens_per_s: float


@dataclass(frozen=True)
class TrainingRunSection(Section):
    title: ClassVar[str] = "Whole run"
    total_tokens: float
    days: float
    device_hours: float
    usd: float | None  # None: the profile has no price
    kwh: float


@dataclass(frozen=True)
class ServingRunSection(Section):
    title: ClassVar[str] = "Whole run"
    seconds_per_million_tokens: float
    usd_per_million_tokens: float | None
    kwh_per_million_tokens: float


@dataclass(frozen=True, kw_only=True)
class ScheduleSection(Section):
    """A dense/sparse schedule's whole run (SSD, Zhang et al. 2024), next to all-dense training."""

    title: ClassVar[str] = "Dense/sparse schedule (whole run, next to all-dense)"
    phases: int
    switches: int
    total_tokens: float
    sparse_token_share: float
    days: float
    device_hours: float
    usd: float | None = optional()  # None: the profile has no price
    kwh: float
    switch_hours: float
    dense_baseline_days: float
    dense_baseline_usd: float | None = optional()
    dense_baseline_kwh: float
    speedup_vs_dense: float  # wall time: all-dense days over the schedule's
    # Training FLOPs (model-FLOPs convention: 3x the forward FLOPs the phase's model executes, a
    # multiply-add = 2), as SSD states its savings: all-dense over the schedule's.
    training_pflop: float
    dense_baseline_pflop: float
    flops_saved_vs_dense: float
    # The most-trained sparse shape against dense, per step: where the FLOP saving exceeds the time
    # saving, the MoE layers' router, token permutation and small expert GEMMs eat the difference.
    sparse_flops_ratio: float | None = optional()
    sparse_step_ratio: float | None = optional()
    # One FFN layer (forward + backward, one micro-batch): MoEfied over dense time, and the share of
    # the MoEfied layer's time in ops a dense FFN does not have (router, top-k, permutation, dispatch).
    sparse_layer_time_ratio: float | None = optional()
    sparse_layer_overhead_share: float | None = optional()
    peak_memory_gb: float
    peak_memory_phase: str
    fits: bool


@dataclass(frozen=True)
class DenseVsMoESection(Section):
    title: ClassVar[str] = "Serving the trained model: dense vs MoEfied"
    moe_experts: int
    moe_k: int
    dense_latency_p50_s: float
    dense_tpot_mean_s: float
    dense_output_tokens_per_s: float
    moe_latency_p50_s: float
    moe_tpot_mean_s: float
    moe_output_tokens_per_s: float
    moe_speedup_tpot: float


@dataclass(frozen=True)
class LayerSection(Section):
    """One block for one micro-batch (training) or one prefill batch (serving) on one device,
    costed as the step plan costs it (`estimate --layer N`): to check a calibration against a
    real layer."""

    title: ClassVar[str] = "One layer (one micro-batch, one device)"
    layer: int  # position in the expanded model, from 0
    kind: str
    tokens: int
    passes: str  # forward | backward | both
    seconds: float
    compute_s: float
    comm_s: float
    forward_s: float
    backward_s: float  # includes recomputation; no gradient sync
    gflop: float  # executed, forward (and backward) as asked


@dataclass(frozen=True)
class BlockCostRow(Record):
    """One block of the expanded model for one training micro-batch (or one serving prefill batch)
    on one device, costed as the step plan costs it (`estimate --layers`): where a step's time,
    FLOPs and memory traffic go, block by block."""

    layer: int  # position in the expanded model, from 0 (as --layer counts)
    kind: str
    forward_gflop: float  # executed
    backward_gflop: float  # executed, recomputation excluded
    forward_gb_moved: float  # bytes the forward's compute ops read and write
    forward_s: float
    backward_s: float  # recomputation excluded; no gradient sync
    recompute_s: float  # the forward work the recompute policy replays before the backward
    comm_s: float  # of the above, time in collectives (forward, backward and replay)
    saved_gb: float  # activations kept for the backward pass under the recompute policy


@dataclass(frozen=True)
class MoELayerRow(Record):
    """One MoE layer per step: load, drops, padding, all-to-all traffic in and out of the node,
    its link time and the part the layer hides, and the wait its imbalance causes."""

    layer: int
    tokens_per_expert_mean: float
    tokens_per_expert_max: float
    load_cv: float
    busiest_rank_over_mean: float
    dropped_fraction: float
    padding_fraction: float
    experts_per_token: float
    no_expert_fraction: float
    a2a_intra_mb: float
    a2a_inter_mb: float
    imbalance_wait_s: float
    a2a_s: float = 0.0  # dispatch and combine link time, forward and backward
    a2a_hidden_s: float = 0.0  # of it, hidden behind the layer's own compute (shared expert); the
    # pairing of micro-batches (EP overlap, DualPipe) hides more, per step: the comm section's ep rows


@dataclass(frozen=True)
class PhaseRow(Record):
    """One phase or switch of a dense/sparse schedule."""

    schedule: str
    phase: str
    mode: str
    experts: int | None
    k: int | None
    tokens: float
    steps: float
    step_s: float | None
    seconds: float
    hours: float
    usd: float | None
    kwh: float
    pflop: float = 0.0  # training FLOPs of the phase (3x forward, model-FLOPs convention); switches 0


@dataclass(frozen=True)
class AnytimeWidthRow(Record):
    """One width of an anytime supernet (TIPS, Li et al. 2023): its computed importance, how often
    a training step runs it, or the share of requests a serving latency budget gave it."""

    width: float
    tips_score: float  # the training DTMC's stationary mass on this sub-network (model/anytime.py)
    trained_per_step: float | None = optional()  # expected passes per step (sandwich ends: 1)
    served_share: float | None = optional()  # of requests, under anytime.serve_latency_budget_s
    predicted_latency_s: float | None = optional()  # a nominal request in a full batch, queueing excluded


@dataclass
class Estimate:
    """Everything one estimate found. Sections a run does not have are None (a serving run has
    no step; a layout that does not fit is not simulated, so it has only layout, model, memory)."""

    workload: str
    hardware: str
    layout: LayoutSection
    model: ModelSection
    memory: MemorySection | None = None
    step: StepSection | None = None
    latency: LatencySection | None = None
    throughput: TrainingThroughput | ServingThroughput | None = None
    expert_cache: ExpertCacheSection | None = None
    goodput: GoodputSection | None = None
    disaggregated: DisaggregatedSection | None = None
    moe: MoESection | None = None
    comm: CommSection | None = None
    run: TrainingRunSection | ServingRunSection | None = None
    schedules: dict[str, ScheduleSection] = field(default_factory=dict)  # by report key
    dense_vs_moe: DenseVsMoESection | None = None
    layer: LayerSection | None = None
    moe_layers: list[MoELayerRow] = field(default_factory=list)
    block_costs: list[BlockCostRow] = field(default_factory=list)  # --layers
    phases: list[PhaseRow] = field(default_factory=list)
    anytime_widths: list[AnytimeWidthRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def sections(self) -> list[tuple[str, Section]]:
        """(report key, section) in report order; the keys are the JSON object names."""
        ordered: list[tuple[str, Section | None]] = [
            ("layout", self.layout), ("model", self.model), ("step", self.step), ("latency", self.latency),
            ("throughput", self.throughput), ("goodput", self.goodput),
            ("disaggregated", self.disaggregated), ("memory", self.memory),
            ("expert_cache", self.expert_cache),
            ("moe", self.moe), ("comm", self.comm), ("run", self.run), *self.schedules.items(), ("serving dense vs moe", self.dense_vs_moe),
            ("layer", self.layer),
        ]
        return [(key, section) for key, section in ordered if section is not None]

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.fits

    @property
    def tokens_per_s(self) -> float | None:
        """Training tokens, or serving output tokens, per second; None when not simulated."""
        return self.throughput.tokens_per_s if self.throughput is not None else None
