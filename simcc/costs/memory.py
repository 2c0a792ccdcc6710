"""Memory per device: weights, gradients, optimizer state by ZeRO stage, activations in flight,
MoE all-to-all buffers, KV cache when serving, and the framework reserve."""

from __future__ import annotations

from dataclasses import dataclass

from simcc.layout import Layout
from simcc.model.blocks import Params
from simcc.model.ops import DTYPE_BYTES
from simcc.model.optimizer import moment_bytes
from simcc.specs.vocab import bytes_per_weight
from simcc.specs.hardware import System
from simcc.specs.workload import Workload

GB = 1e9
# Parts of a device's memory a workload's settings shrink (estimate.MEMORY_REMEDIES says how).
SHRINKABLE_PARTS = ("weights", "gradients", "optimizer", "activations", "kv_cache")


@dataclass(frozen=True)
class MemoryBreakdown:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    kv_cache: float
    reserve: float
    capacity: float
    offloaded_weights: float = 0.0  # edge: expert weights left on the storage tier

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers + self.kv_cache + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    @property
    def headroom(self) -> float:
        return self.capacity - self.total

    def largest_part(self) -> tuple[str, float]:
        """The part a user can shrink that takes the most (the reserve and buffers are fixed costs):
        what to act on first when memory is tight."""
        name = max(SHRINKABLE_PARTS, key=lambda part: getattr(self, part))
        return name, getattr(self, name)

    def as_gb(self) -> dict[str, float]:
        fields = ("weights", "gradients", "optimizer", "activations", "buffers", "kv_cache", "reserve",
                  "offloaded_weights", "total", "capacity", "headroom")
        return {f: getattr(self, f) / GB for f in fields}


def optimizer_state_bytes(params: Params, workload: Workload, layout: Layout) -> float:
    """Mixed-precision Adam keeps an fp32 master copy and two fp32 moments (12 B/param; Rajbhandari
    et al. 2020), 8 B with bf16 moments; Adafactor keeps a factored second moment, O(rows + cols)
    per matrix (Shazeer & Stern 2018), plus the master copy; ZeRO >= 1 shards all of it over data-parallel ranks (with
    context parallelism, dp x cp: Megatron's distributed optimizer shards over the data-parallel
    group with context parallel, parallel_state.get_data_parallel_group(with_context_parallel=True))."""
    opt, prec = workload.optimizer, workload.precision
    dense, expert = layout.local_params(params)
    master = 4 if (opt.master_weights and prec.weights != "fp32") else 0
    if opt.type == "adam":
        moments = moment_bytes(opt)
        dense_state, expert_state = dense * (master + moments), expert * (master + moments)
    elif opt.type == "adafactor":
        dense_state = dense * master + 4 * params.dense_rows_cols / layout.tp
        expert_state = expert * master + 4 * params.expert_rows_cols / (layout.ep * layout.expert_tp)
    else:
        dense_state, expert_state = dense * master, expert * master
    if workload.parallelism.zero_stage >= 1:
        dense_state, expert_state = dense_state / layout.dp_cp, expert_state / layout.expert_dp
    return dense_state + expert_state


def in_flight_microbatches(workload: Workload, layout: Layout, stage: int = 0) -> float:
    """Micro-batches whose activations pipeline rank `stage` holds at its peak (through all its
    chunks): its warm-up forwards plus the one its first backward waits for. GPipe: all m. 1F1B:
    p - stage. Interleaved 1F1B: 2(p - stage - 1) + (v - 1)p + 1 chunk forwards, v chunks a
    micro-batch (Narayanan 2021; Megatron-Core's interleaved schedule,
    num_warmup_microbatches in pipeline_parallel/schedules.py): p + (p - 1)/v on the first rank.
    EP-communication overlap's one extra warm-up forward is counted apart
    (`paired_extra_bytes`). DualPipe and DualPipeV: `dual_in_flight` chunk-micro-batches of the
    rank's two chunks, half of that through both (PP + 1 chunks' worth at the peak, PP = pp x vpp
    stages: (PP + 1) / 2), taking the rank's two chunks as alike."""
    m, p, v = layout.microbatches_per_run, layout.pp, layout.vpp  # each schedule run drains before the next
    schedule = workload.parallelism.schedule
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved":
        return min(float(m), (2 * (p - stage - 1) + (v - 1) * p + 1) / v)
    if schedule in DUAL_SCHEDULES:
        return sum(dual_in_flight(schedule, p, stage, workload.parallelism.overlap_moe_comm)) / 2
    return float(min(m, p - stage))


DUAL_SCHEDULES = ("dualpipe", "dualpipev")


def dual_in_flight(schedule: str, pp: int, stage: int, paired: bool) -> tuple[int, int]:
    """Micro-batches of each of its two chunks (in the rank's order, as plan.training's
    chunk_placement gives them) whose activations a DualPipe or DualPipeV rank holds at its peak,
    from the schedule's order (deepseek-ai/DualPipe dualpipe.py, step(); sim/training.py,
    dual_items). With S = 2 x R pipeline stages (R ranks to the middle; DualPipe: S = pp,
    DualPipeV: 2 pp) and h = min(r, pp-1-r) (DualPipe) or r (DualPipeV), the warm-up runs
    S - h - 1 forwards of the chunk whose micro-batches come first and h + 1 of the other; the
    zero-bubble step 3 (B, then its W at once) frees one for each further forward, so the rank holds
    S until its first steady-state forward makes it S + 1: S - h of the first chunk and h + 1 of
    the second (DeepSeek-V3 report, Table 2: activations PP + 1). A merged forward/backward pair
    goes layer against layer, so with `paired` the pair's forward is only one layer ahead (counted
    apart, `paired_extra_bytes`), except on the middle ranks (h = R - 1), which run their first
    steady-state forward and backward apart ("we don't overlap these two chunks to further
    reduce bubble size")."""
    ranks = pp // 2 if schedule == "dualpipe" else pp
    half = min(stage, pp - 1 - stage) if schedule == "dualpipe" else stage
    first = 2 * ranks - half - (1 if paired and half < ranks - 1 else 0)
    # DualPipe's second half of ranks first meets the direction fed from the last rank: its second chunk.
    return (half + 1, first) if schedule == "dualpipe" and stage >= pp // 2 else (first, half + 1)


def paired_extra_bytes(workload: Workload, layout: Layout, activation_bytes_per_microbatch: float,
                       largest_unit_saved: float, stage: int = 0) -> float:
    """EP-communication overlap warms up one more forward so that each steady-state forward runs
    merged with an earlier micro-batch's backward (sim/training.py, task_order). The merged pair
    goes layer against layer, the forward's first layer with the backward's last (Megatron-Core's
    combined 1F1B schedule plan, megatron/core/pipeline_parallel/combined_1f1b.py): as the forward
    keeps one more layer's activations the backward frees one, so the pair holds one layer more
    than the warm-up left, not a second micro-batch. Without enough micro-batches to pair there is
    no extra."""
    if not workload.parallelism.overlap_moe_comm or workload.parallelism.schedule == "gpipe":
        return 0.0
    if workload.parallelism.schedule in DUAL_SCHEDULES:
        # a rank whose pairs all merge (`dual_in_flight`): one layer over S chunks' worth
        apart = dual_in_flight(workload.parallelism.schedule, layout.pp, stage, False)
        paired = dual_in_flight(workload.parallelism.schedule, layout.pp, stage, True)
        return min(largest_unit_saved, activation_bytes_per_microbatch) if paired != apart else 0.0
    if in_flight_microbatches(workload, layout, stage) >= layout.microbatches_per_run:
        return 0.0
    return min(largest_unit_saved, activation_bytes_per_microbatch)


def training_memory(workload: Workload, system: System, layout: Layout, stage_params: Params,
                    activation_bytes_per_microbatch: float, buffer_bytes: float,
                    largest_unit_saved: float = 0.0, stage: int = 0) -> MemoryBreakdown:
    """`stage`: the pipeline rank (a DualPipe rank's peak depends on its distance from the middle)."""
    prec = workload.precision
    zero = workload.parallelism.zero_stage
    dense, expert = layout.local_params(stage_params)
    dense_held = dense / (layout.dp_cp if zero >= 3 else 1)  # ZeRO-3 shards the weights themselves (over dp x cp)
    expert_held = expert / (layout.expert_dp if zero >= 3 else 1)
    weights = dense_held * bytes_per_weight(prec.weights) + expert_held * bytes_per_weight(prec.expert_weights or prec.weights)
    if prec.matmul is not None and DTYPE_BYTES[prec.matmul] < min(DTYPE_BYTES[prec.compute], bytes_per_weight(prec.weights)):
        # FP8 GEMMs read an FP8 copy of each weight, cast once per step and kept (Transformer
        # Engine caches it across micro-batches).
        weights += (dense_held + expert_held) * DTYPE_BYTES[prec.matmul]
    # Sparse embedding gradients are their touched rows, a transient buffer (embedding_work).
    dense_grads = dense - stage_params.sparse_grad / layout.tp
    grads = (dense_grads / (layout.dp_cp if zero >= 2 else 1) + expert / (layout.expert_dp if zero >= 2 else 1)) * DTYPE_BYTES[prec.gradients]
    optimizer = optimizer_state_bytes(stage_params, workload, layout)
    activations = (activation_bytes_per_microbatch * in_flight_microbatches(workload, layout, stage)
                   + paired_extra_bytes(workload, layout, activation_bytes_per_microbatch, largest_unit_saved, stage))
    device = system.device
    return MemoryBreakdown(weights, grads, optimizer, activations, buffer_bytes, 0.0,
                           device.reserve_gb * GB, device.memory_gb * GB)


def worst_stage_memory(workload: Workload, system: System, layout: Layout,
                       footprints: list[tuple[Params, float, float, float]]) -> MemoryBreakdown:
    """The pipeline stage that holds the most, from each stage's (parameters, activation bytes
    one micro-batch leaves, largest transient buffer, most one unit keeps), in stage order: the
    one a layout must fit."""
    memories = [training_memory(workload, system, layout, params, saved, buffers, unit_saved, stage)
                for stage, (params, saved, buffers, unit_saved) in enumerate(footprints)]
    return max(memories, key=lambda memory: memory.total)


def serving_memory(system: System, layout: Layout, weight_bytes: float, expert_weight_bytes: float,
                   kv_bytes: float, activation_bytes: float) -> MemoryBreakdown:
    """On an edge device, expert weights that do not fit stay on the storage tier and stream in."""
    device = system.device
    capacity = device.memory_gb * GB
    reserve = device.reserve_gb * GB
    offloaded = 0.0
    if system.storage is not None:
        room_for_experts = capacity - reserve - kv_bytes - activation_bytes - (weight_bytes - expert_weight_bytes)
        offloaded = min(expert_weight_bytes, max(0.0, expert_weight_bytes - max(0.0, room_for_experts)))
    return MemoryBreakdown(weight_bytes - offloaded, 0.0, 0.0, activation_bytes, 0.0, kv_bytes, reserve, capacity,
                           offloaded_weights=offloaded)
