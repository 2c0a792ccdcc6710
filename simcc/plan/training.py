"""A costed plan of one training step or one serving batch: every item already in seconds.

This is the hand-off between the cost model and the discrete-event simulator: the simulator
reads `Cost.seconds` and never re-derives it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from simcc.costs.collectives import collective_time, host_copy_time, latency_floor, ring_exposed, ring_steps
from simcc.costs.compute import op_cost
from simcc.layout import CommGroup, Layout
from simcc.memo import Memo
from simcc.model.blocks import Batch, BlockWork, MoEStats, Params, Shard
from simcc.model.anytime import sandwich, scale_units
from simcc.model.graph import (Unit, block_params, block_work, blocks_of, drawn_per_layer, stage_units, units_of,
                               units_params, without_data_parallel)
from simcc.model.kinds import costing_of
from simcc.model.ops import (BLOCK_SCALE_BYTES, DTYPE_BYTES, TWO_KERNEL_BACKWARD, Comm, GemmOperands, Op, WorkItem,
                             backward_of)
from simcc.model.optimizer import optimizer_step
from simcc.plan.recompute import recomputed
from simcc.routing.load import LOAD_DRAWS
from simcc.specs.hardware import System
from simcc.specs.vocab import DEQUANT_FLOPS_PER_WEIGHT, OTHER_FORMATS, bytes_per_weight, is_quantized
from simcc.specs.workload import MoEFFNBlock, Precision, Workload


@dataclass(frozen=True)
class Cost:
    name: str
    stream: str  # "compute" | "comm"
    seconds: float
    imbalance: float = 0.0  # share of `seconds` due to the busiest rank's extra load
    group: str = ""
    bytes: float = 0.0
    link: str = ""  # comm only: "intra" (node fabric) or "inter" (NIC) -- the link it loads
    bucket: int = -1  # stream "bucket": a marker where the unit's gradients are complete
    overlap_chunks: int = 1  # comm only: pipelined in pieces with the compute up to its partner
    latency: float = 0.0  # comm only: the part of `seconds` every piece pays again when chunked
    flops: float = 0.0  # compute only: the op's executed FLOPs
    # A backward GEMM's seconds that are its weight-gradient kernel (dW = X^T dY), the rest its
    # input-gradient one (dX = dY W^T): zero-bubble schedules run the two apart (`split_backward`).
    wgrad: float = 0.0
    # comm only: transfer seconds that ran behind compute and are not in `seconds` (a context-
    # parallel KV ring's steps hidden by the attention kernels, `ring_costs`): link time, not waited for.
    hidden: float = 0.0


@dataclass
class ChunkPlan:
    """One pipeline chunk (virtual stage) for one micro-batch."""

    units: list[Unit]
    forward: list[Cost] = field(default_factory=list)  # expected expert loads, or the first sampled step's
    backward: list[Cost] = field(default_factory=list)  # includes recomputation
    params: Params = field(default_factory=Params)
    saved_bytes: float = 0.0  # activations kept per micro-batch under the recompute policy
    transient_bytes: float = 0.0  # largest short-lived buffer (all-to-all send + receive)
    largest_unit_saved: float = 0.0  # of `saved_bytes`, the most one unit (layer) keeps
    moe: list[MoEStats] = field(default_factory=list)
    moe_imbalance: list[float] = field(default_factory=list)  # per MoE layer: busiest-rank wait per micro-batch (s)
    # per MoE layer and micro-batch: (expert-parallel link seconds, forward and backward; the part
    # of them hidden behind compute the plan pairs them with, e.g. the shared expert)
    moe_ep_comm: list[tuple[float, float]] = field(default_factory=list)
    # One (forward, backward) per simulated step, each with a fresh expert-load draw (MoE only).
    sampled: list[tuple[list[Cost], list[Cost]]] = field(default_factory=list)
    # One gradient bucket per unit (layer), launched where that unit's backward ends.
    grad_buckets: list[list[Cost]] = field(default_factory=list)
    param_sync: list[Cost] = field(default_factory=list)  # ZeRO: gather its updated weights

    def step_work(self, step: int) -> tuple[list[Cost], list[Cost]]:
        if self.sampled:
            return self.sampled[step % len(self.sampled)]
        return self.forward, self.backward


@dataclass
class StagePlan:
    chunks: list[ChunkPlan]
    p2p: Cost  # activation (or its gradient) sent to the neighbouring stage, per chunk and direction
    optimizer: Cost

    @property
    def params(self) -> Params:
        total = Params()
        for chunk in self.chunks:
            total = total.add(chunk.params)
        return total


@dataclass
class TrainingPlan:
    stages: list[StagePlan]
    microbatches: int
    pp: int
    vpp: int
    schedule: str
    overlap_grad_reduce: bool
    overlap_p2p: bool = True  # false: a stage waits for its pipeline sends
    overlap_moe_comm: bool = False  # steady-state forward/backward pairs hide each other's EP all-to-alls
    comm_sm_share: float = 0.0  # of the SMs, held by overlapped dispatch/combine kernels
    runs: int = 1  # pipeline schedule runs per step, `microbatches` split evenly (train.local_batch)

    @property
    def microbatches_per_run(self) -> int:
        return self.microbatches // self.runs


def shard_of(workload: Workload, layout: Layout, step: int | None = None) -> Shard:
    """How this device's share is cut; `step` asks for that simulated step's own load draw."""
    prec = workload.precision
    seed, draws = (workload.seed, LOAD_DRAWS) if step is None else (workload.seed * 7919 + 1 + step, 1)
    # Sparse embedding gradients gather over every rank that holds the same table: dp x cp (each
    # context-parallel rank looks up its own share of the tokens).
    return Shard(tp=layout.tp, sequence_parallel=workload.parallelism.effective_sequence_parallel and layout.tp > 1,
                 ep=layout.ep, expert_tp=layout.expert_tp, cp=layout.cp, dtype=prec.compute, router_dtype=prec.router,
                 comm_dtype=prec.communication, seed=seed, sample_seed=workload.seed, load_draws=draws,
                 microbatches=layout.microbatches, dp=layout.dp_cp, grad_dtype=prec.gradients,
                 ep_nodes=layout.groups["ep"].nodes, dense_gemm=gemm_operands(prec.weights, prec),
                 expert_gemm=gemm_operands(prec.expert_weights or prec.weights, prec, expert_gemm_runs(workload)),
                 head_gemm=gemm_operands(prec.head_weights or prec.weights, prec),
                 tp_comm_overlap=workload.parallelism.tp_comm_overlap)


def expert_gemm_runs(workload: Workload) -> str:
    """How FP8 expert GEMMs run when the workload does not say: per expert through cuBLAS in
    training (Transformer Engine's GroupedLinear), as one grouped kernel in serving engines."""
    chosen = workload.precision.fp8_expert_gemm
    return chosen if chosen is not None else ("per_expert" if workload.mode == "train" else "grouped")


def quantized_format(stored: str | float) -> str:
    """The stored weights' format as engines pick kernels by it: a named format, or `other` for
    a bits-per-weight figure (a mix of formats)."""
    return stored if isinstance(stored, str) else OTHER_FORMATS


def gemm_operands(stored: str | float, precision: Precision, expert_gemm: str = "grouped") -> GemmOperands | None:
    """How weight GEMMs read their operands: FP8 inputs when `precision.matmul` is narrower than
    the compute dtype (block scaling adds one fp32 scale per 128 activations, DeepSeek-V3 sec.
    3.3.2); weights stored narrower than what the kernel reads stay at their stored size and are
    dequantized in the kernel (training keeps a compute-precision copy of fp32 masters)."""
    compute = precision.compute
    narrower = precision.matmul is not None and DTYPE_BYTES[precision.matmul] < DTYPE_BYTES[compute]
    inputs = precision.matmul if narrower else None
    read = DTYPE_BYTES[inputs or compute]
    weight = bytes_per_weight(stored)
    if inputs is None and weight >= read:
        return None
    scale = BLOCK_SCALE_BYTES if inputs is not None and precision.fp8_scaling == "block" else 0.0
    reads = 2.0 if inputs is not None and precision.fp8_scaling == "tensor" else 1.0
    launches, per_expert = CAST_KERNELS[precision.fp8_scaling] if inputs is not None else (1, False)
    narrower_weights = weight < read
    dequant = DEQUANT_FLOPS_PER_WEIGHT if narrower_weights and is_quantized(stored) else 0.0
    return GemmOperands(inputs, weight if narrower_weights else None, dequant, scale, reads, launches, per_expert,
                        amax_from_tensor=inputs is not None and precision.fp8_scaling == "tensor",
                        per_expert_gemms=inputs == "fp8" and expert_gemm == "per_expert",
                        weight_format=quantized_format(stored) if dequant else "")


# Kernels Transformer Engine launches to cast one tensor to FP8, by scaling, and whether a grouped
# GEMM's inputs are cast expert by expert. Current scaling: zero the amax, reduce it over the
# tensor, compute the scale in a one-thread kernel, then cast (transformer_engine/common/recipe/
# current_scaling.cu; pytorch/csrc/quantizer.cpp, Float8CurrentScalingQuantizer::quantize_impl).
# Delayed scaling: one cast that records the amax as it goes, and GroupedLinear casts every expert
# in one fused multi-tensor launch (nvte_multi_cast_transpose). Block scaling: one cast computing
# its tile scales on chip. Every quantizer but the delayed one splits a grouped input and casts
# each expert's rows apart (pytorch/csrc/extensions/cast.cpp, split_quantize).
CAST_KERNELS = {"tensor": (4, True), "delayed": (1, False), "block": (1, True)}


# Costs by item and system object, and for a collective by the group it runs over: a model
# repeats its layers' items, every micro-batch shape and recompute replay asks again, and a search
# costs many layouts on one system.
_ITEM_COSTS: Memo[Cost] = Memo(200_000)


def cost_item(item: WorkItem, system: System, layout: Layout) -> Cost:
    key = (item, id(system), layout.groups[item.group]) if isinstance(item, Comm) else (item, id(system))
    return _ITEM_COSTS.get(key, lambda: _cost_item(item, system, layout), system)


def _cost_item(item: WorkItem, system: System, layout: Layout) -> Cost:
    if isinstance(item, Comm):
        group = layout.groups[item.group]
        seconds = collective_time(item.collective, item.bytes * item.busiest_share, group, system, item.algorithm,
                                  item.remote_share)
        link = "inter" if group.nodes > 1 else "intra"
        latency = latency_floor(item.collective, group, system, item.algorithm) if item.overlap_chunks > 1 else 0.0
        return Cost(item.name, "comm", seconds, group=item.group, bytes=item.bytes, link=link,
                    overlap_chunks=item.overlap_chunks, latency=min(latency, seconds))
    cost = op_cost(system.device, item)
    return Cost(item.name, "compute", cost.seconds, imbalance=cost.seconds - cost.mean_seconds, flops=item.flops)


def _saved(items: list[WorkItem]) -> float:
    return sum(i.saved_bytes for i in items if isinstance(i, Op))


@dataclass
class ForwardWork:
    items: list[WorkItem] = field(default_factory=list)
    replay: list[WorkItem] = field(default_factory=list)  # recomputed before the backward pass
    params: Params = field(default_factory=Params)
    saved_bytes: float = 0.0
    transient_bytes: float = 0.0
    largest_unit_saved: float = 0.0  # of `saved_bytes`, the most one unit keeps
    moe: list[MoEStats] = field(default_factory=list)
    unit_starts: list[int] = field(default_factory=list)  # index in `items` where each unit begins
    unit_params: list[Params] = field(default_factory=list)
    per_step: list[WorkItem] = field(default_factory=list)  # once per step, before the first forward
    moe_ranges: list[tuple[int, int]] = field(default_factory=list)  # each MoE layer's slice of `items`
    unit_step_grads: list[list[WorkItem]] = field(default_factory=list)  # once per step, with each unit's gradients
    unit_works: list["_UnitWork"] = field(default_factory=list)  # what `items` and `replay` concatenate, unit by unit
    offloaded: list[float] = field(default_factory=list)  # saved bytes each offloaded unit sends to the host


@dataclass(frozen=True)
class _UnitWork:
    """One pipeline unit's share of a ForwardWork (MoE ranges relative to the unit's first item)."""

    items: tuple[WorkItem, ...]
    replay: tuple[WorkItem, ...]
    params: Params
    saved_bytes: float
    transient_bytes: float
    moe: tuple[MoEStats, ...]
    moe_ranges: tuple[tuple[int, int], ...]
    per_step: tuple[WorkItem, ...]
    step_grads: tuple[WorkItem, ...]


# Unit works by what they depend on: a model repeats its layers (a dense model's units are all
# alike), and a search builds many plans from the same layers.
_UNIT_WORKS: Memo[_UnitWork] = Memo(20_000)


def forward_work(units: list[Unit], workload: Workload, layout: Layout, batch: Batch,
                 step: int | None = None) -> ForwardWork:
    """The forward items of some pipeline units, with what the recompute policy keeps and replays."""
    hidden = workload.model.hidden
    shard = shard_of(workload, layout, step)
    policy = (workload.parallelism.recompute, tuple(workload.parallelism.recompute_modules))
    offloaded = workload.parallelism.offload_activation_layers if workload.train is not None else 0
    per_layer = drawn_per_layer(shard)
    tokens = tuple(_alike(unit, per_layer) for unit in units)
    if not any(reads_dp for _, reads_dp in tokens):
        shard = without_data_parallel(shard)  # the same work for any dp and micro-batch count
    return _FORWARD_WORKS.get((tokens, hidden, batch, shard, policy, offloaded),
                              lambda: _assembled(units, hidden, batch, shard, policy, layout.tp, offloaded))


# Whole chunks' works, for plans that meet the same chunk again (a search's layouts that differ
# only in options the work does not read). Callers read a work, never change it.
_FORWARD_WORKS: Memo[ForwardWork] = Memo(2_000)


def _assembled(units: list[Unit], hidden: int, batch: Batch, shard: Shard, policy: tuple[str, tuple[str, ...]],
               tp: int, offloaded: int = 0) -> ForwardWork:
    out = ForwardWork()
    per_layer = drawn_per_layer(shard)
    for unit in units:
        work = _UNIT_WORKS.get((_alike(unit, per_layer), hidden, batch, shard, policy),
                               lambda: _unit_work(unit, hidden, batch, shard, *policy, tp))
        first = len(out.items)
        out.unit_works.append(work)
        out.unit_starts.append(first)
        out.unit_params.append(work.params)
        out.unit_step_grads.append(list(work.step_grads))
        out.items += work.items
        out.replay += work.replay
        out.params = out.params.add(work.params)
        out.saved_bytes += work.saved_bytes
        out.largest_unit_saved = max(out.largest_unit_saved, work.saved_bytes)
        out.transient_bytes = max(out.transient_bytes, work.transient_bytes)
        out.moe += work.moe
        out.moe_ranges += [(first + start, first + end) for start, end in work.moe_ranges]
        out.per_step += work.per_step
    if offloaded:
        # Transformer Engine's offload handler (get_cpu_offload_context, double-buffered) copies one
        # offloaded layer out while the next computes, and prefetches one back ahead of its
        # backward: of the offloaded layers, one layer's activations are on the device at a time.
        out.offloaded = [work.saved_bytes for work in out.unit_works[:offloaded]]
        out.saved_bytes -= sum(out.offloaded) - max(out.offloaded)
    return out


# What a unit's work depends on, as a small token that hashes fast (its blocks' specs, and their
# positions where `per_layer` draws are per layer and the work draws), with whether that work
# reads dp or the micro-batch count. By unit object, then by the blocks' spec objects. Tokens
# come from a counter and are never reused, so either table may start again empty.
_ALIKE: Memo[tuple[int, bool]] = Memo(100_000)
_KINDS: Memo[tuple[int, bool]] = Memo(100_000)
_NEXT_TOKEN = itertools.count()


def _alike(unit: Unit, per_layer: bool) -> tuple[int, bool]:
    """(token, whether the unit's work reads dp): alike units share the token."""
    return _ALIKE.get((id(unit), per_layer), lambda: _kind_of(unit, per_layer), unit)


def _kind_of(unit: Unit, per_layer: bool) -> tuple[int, bool]:
    specs = [block.spec for block in unit.blocks]
    key = tuple((id(block.spec), block.index if per_layer and costing_of(block.spec).per_layer_seed else -1)
                for block in unit.blocks)
    return _KINDS.get(key, lambda: (next(_NEXT_TOKEN), any(costing_of(spec).reads_data_parallel for spec in specs)),
                      *specs)


def _unit_work(unit: Unit, hidden: int, batch: Batch, shard: Shard, recompute: str, modules: tuple[str, ...],
               tp: int) -> _UnitWork:
    items: list[WorkItem] = []
    replay: list[WorkItem] = []
    params = Params()
    saved = transient = 0.0
    moe: list[MoEStats] = []
    ranges: list[tuple[int, int]] = []
    per_step: list[WorkItem] = []
    grads: list[WorkItem] = []
    for block in unit.blocks:
        work: BlockWork = block_work(block, hidden, batch, shard)
        params = params.add(block_params(block, hidden))
        first = len(items)
        items += work.forward
        if recompute == "selective":
            replay += work.selective_recompute
            saved += _saved(work.forward) - _saved(work.selective_recompute)
        elif recompute == "none":
            saved += _saved(work.forward)
        if modules and recompute != "full":
            replayed, freed = recomputed(work.forward, modules)
            replay += replayed
            saved -= freed
        per_step += work.per_step
        grads += work.per_step_grads
        transient = max(transient, work.transient_bytes)
        if work.moe is not None:
            moe.append(work.moe)
            ranges.append((first, first + len(work.forward)))
            transient = max(transient, 2 * work.moe.dispatch_bytes)
    if recompute == "full":
        # Full recomputation keeps only each unit's input (Korthikanti et al. 2022, sec. 4).
        share = batch.tokens / tp if shard.sequence_parallel else batch.tokens
        saved += share * hidden * DTYPE_BYTES[shard.dtype]
        replay += items
    return _UnitWork(tuple(items), tuple(replay), params, saved, transient, tuple(moe), tuple(ranges), tuple(per_step),
                     tuple(grads))


def _costed(work: ForwardWork, system: System, layout: Layout) -> tuple[list[Cost], list[Cost]]:
    """Forward and backward costs; the backward carries a bucket marker where each unit's
    gradients are complete (units run backward in reverse order)."""
    forward, backward, _ = _costed_by_item(work, system, layout)
    return forward, backward


# Costed works by work object, system object and the groups collectives run over: a search meets
# the same chunk under layouts that differ only in options its costs do not read.
_COSTED: Memo[tuple[list[Cost], list[Cost], list[Cost]]] = Memo(2_000)


def _costed_by_item(work: ForwardWork, system: System, layout: Layout) -> tuple[list[Cost], list[Cost], list[Cost]]:
    """`_costed`, and each forward item's backward cost in item order (for per-layer figures).
    Callers read the lists, never change them."""
    key = (id(work), id(system), tuple(sorted(layout.groups.items())))
    return _COSTED.get(key, lambda: _cost_work(work, system, layout), work, system)


def _cost_work(work: ForwardWork, system: System, layout: Layout) -> tuple[list[Cost], list[Cost], list[Cost]]:
    forward: list[Cost] = []
    per_item: list[Cost] = []
    backward: list[Cost] = []
    groups = tuple(sorted(layout.groups.items()))
    for unit_work in work.unit_works:  # alike layers share one unit work, so one costing
        unit_forward, unit_backward, unit_replay = _UNIT_COSTS.get(
            (id(unit_work), id(system), groups), lambda: _cost_unit(unit_work, system, layout), unit_work, system)
        forward += unit_forward
        per_item += unit_backward
        backward += unit_replay
    ends = work.unit_starts[1:] + [len(work.items)]
    for unit in reversed(range(len(work.unit_starts))):
        backward += per_item[work.unit_starts[unit] : ends[unit]][::-1]
        backward.append(Cost(f"grad_bucket{unit}", "bucket", 0.0, bucket=unit))
    return forward, backward, per_item


# Costed unit works by unit work object, system object and the groups collectives run over: the
# chunks of different pipeline splits (and a search's layouts) are made of the same unit works.
_UNIT_COSTS: Memo[tuple[list[Cost], list[Cost], list[Cost]]] = Memo(20_000)


def _cost_unit(unit_work: "_UnitWork", system: System, layout: Layout) -> tuple[list[Cost], list[Cost], list[Cost]]:
    """A unit's forward costs, each forward item's backward cost, and its replayed items' costs."""
    forward = [cost_item(i, system, layout) for i in unit_work.items]
    backward = [_backward_cost(i, system, layout) for i in unit_work.items]
    replay = [cost_item(i, system, layout) for i in unit_work.replay]
    if layout.cp > 1:
        forward = ring_costs(unit_work.items, forward, system, layout, backward=False)
        backward = ring_costs(unit_work.items, backward, system, layout, backward=True)
        replay = ring_costs(unit_work.replay, replay, system, layout, backward=False)
    if any(isinstance(item, Comm) and item.gemm_overlap for item in unit_work.items):
        forward = tp_overlap_costs(unit_work.items, forward, system, layout, backward=False)
        backward = tp_overlap_costs(unit_work.items, backward, system, layout, backward=True)
        replay = tp_overlap_costs(unit_work.replay, replay, system, layout, backward=False)
    if any(isinstance(item, Comm) and item.alongside for item in unit_work.items):
        forward = alongside_costs(unit_work.items, forward)
        backward = alongside_costs(unit_work.items, backward)
        replay = alongside_costs(unit_work.replay, replay)
    return forward, backward, replay


def waited_beyond(cost: Cost, exposed: float) -> Cost:
    """A collective that compute hides in part: only `exposed` of it is waited for; the rest stays
    link time (`hidden`), so waited + hidden is still the transfer's whole time."""
    return replace(cost, seconds=exposed, hidden=cost.hidden + cost.seconds - exposed)


def alongside_costs(items: tuple[WorkItem, ...], costs: list[Cost]) -> list[Cost]:
    """`costs` (one per item, in item order) with each collective that runs alongside named
    compute items of its block on another stream waited for only beyond their time: max(comm,
    compute) for the pair; the hidden part stays link time (`hidden`). The backward pairs the
    same way, each item's backward with the collective's (autograd runs the shared expert's
    backward on its stream while the all-to-all's backward is in flight)."""
    out = list(costs)
    for index, item in enumerate(items):
        if not (isinstance(item, Comm) and item.alongside):
            continue
        beside = sum(costs[j].seconds for j, other in enumerate(items) if isinstance(other, Op) and other.name in item.alongside)
        cost = costs[index]
        exposed = max(0.0, cost.seconds - beside)
        out[index] = waited_beyond(cost, exposed)
    return out


def tp_overlap_costs(items: tuple[WorkItem, ...], costs: list[Cost], system: System, layout: Layout,
                     backward: bool) -> list[Cost]:
    """`costs` (one per item, in item order; each item's backward cost when `backward`) with
    sequence parallelism's collectives overlapped with their linear's GEMM as Transformer
    Engine's userbuffers do under Megatron-Core's --tp-comm-overlap
    (transformer_engine/pytorch/module/base.py initialize_ub; megatron/core/model_parallel_config.py
    tp_comm_overlap_ag, tp_comm_overlap_rs, tp_comm_bulk_wgrad, tp_comm_bulk_dgrad):

    - pipelined (the forward all-gather with the GEMM after it, the reduce-scatter with the one
      before, and the backward all-gather of the reduce-scatter's gradient with that GEMM's
      input-gradient kernel): input and GEMM split in tp chunks, each of the tp - 1 exchanged
      chunks moving while another chunk multiplies, so a collective of C seconds beside a GEMM of
      G is waited for only beyond the GEMM's other chunks: max(0, C - G (tp - 1) / tp);
    - bulk (the backward of the forward all-gather: the input shard gathered again for the weight
      gradient, and the input gradient reduce-scattered): the gather runs beside the
      input-gradient kernel and the reduce-scatter beside the weight-gradient kernel, each waited
      for beyond its partner's time.

    The hidden part stays link time (`hidden`). The SMs the copy kernels hold are not modelled."""
    out = list(costs)
    for index, item in enumerate(items):
        if not (isinstance(item, Comm) and item.gemm_overlap):
            continue
        gathers = item.collective == "all_gather"
        span = range(index + 1, len(items)) if gathers else range(index - 1, -1, -1)
        # the GEMM itself, past the FP8 casts of its input
        partner = next((j for j in span if isinstance(items[j], Op) and items[j].family == "gemm"), None)
        if partner is None:
            continue
        gemm, cost = costs[partner], costs[index]
        data_grad = gemm.seconds - gemm.wgrad  # the whole GEMM in the forward pass (wgrad 0)
        if backward and gathers:  # bulk: gather again beside dX, reduce-scatter beside dW
            again = cost_item(item, system, layout).seconds
            exposed = max(0.0, again - data_grad) + max(0.0, cost.seconds - again - gemm.wgrad)
        else:
            exposed = max(0.0, cost.seconds - data_grad * (layout.tp - 1) / layout.tp)
        out[index] = waited_beyond(cost, exposed)
    return out


def ring_costs(items: tuple[WorkItem, ...], costs: list[Cost], system: System, layout: Layout,
               backward: bool) -> list[Cost]:
    """`costs` (one per item, in item order) with each context-parallel KV ring (a cp-group item,
    model/kinds/attention.py ring_exchange) timed against the attention core that follows it: its
    cp steps' transfers (costs/collectives.py ring_steps: cp-1 K/V chunks forward, 2(cp-1) with the
    dK/dV backward) each overlap one of the core's cp equal steps, so only what a transfer takes
    beyond its step's compute is waited for (`seconds`); the rest is `hidden` link time. A ring
    replayed without its core (nothing to hide behind) is waited for whole."""
    out = list(costs)
    cp, group = layout.cp, layout.groups["cp"]
    for index, item in enumerate(items):
        if not (isinstance(item, Comm) and item.group == "cp"):
            continue
        core = next((j for j in range(index + 1, len(items)) if isinstance(items[j], Op) and items[j].family == "attention"),
                    None)
        step_compute = costs[core].seconds / cp if core is not None else 0.0
        transfers = ring_steps(lambda size: collective_time("p2p", size, group, system), item.bytes, cp, backward)
        link = sum(transfers)
        exposed = ring_exposed(transfers, step_compute)
        moved = item.bytes * (cp - 1) * (2 if backward else 1)
        out[index] = replace(costs[index], seconds=exposed, hidden=link - exposed, bytes=moved)
    return out


def _backward_cost(item: WorkItem, system: System, layout: Layout) -> Cost:
    """An item's backward cost; a GEMM's (and a convolution's or LSTM's) is a data-gradient and a
    weight-gradient kernel, each as large as the forward one (model/ops.py, backward_of), so half
    of its seconds are the weight gradient's."""
    cost = cost_item(backward_of(item), system, layout)
    if isinstance(item, Op) and item.family in TWO_KERNEL_BACKWARD:
        return replace(cost, wgrad=cost.seconds / 2)
    if isinstance(item, Comm) and item.regathered:  # the saved shard gathered again, then the reduce-scatter
        again = cost_item(item, system, layout)
        return replace(cost, seconds=cost.seconds + again.seconds, bytes=cost.bytes + again.bytes,
                       latency=cost.latency + again.latency)
    return cost


def _part(cost: Cost, seconds: float, suffix: str) -> Cost:
    """`seconds` of a backward compute cost, with its share of the imbalance and FLOPs."""
    share = seconds / cost.seconds
    return replace(cost, name=cost.name + suffix, seconds=seconds, imbalance=cost.imbalance * share,
                   flops=cost.flops * share, wgrad=0.0)


_SPLIT: Memo[tuple[list[Cost], list[Cost]]] = Memo(2_000)


def split_backward(backward: list[Cost]) -> tuple[list[Cost], list[Cost]]:
    """A chunk's backward as zero-bubble pipelining runs it (Qi et al. 2023, arXiv 2401.10241,
    sec. 2; DualPipe's WeightGradStore): the input-gradient pass B, which the previous stage waits
    for (recomputation, every collective, each GEMM's data-gradient kernel), and the weight-gradient
    pass W, deferrable to fill bubbles (each GEMM's weight-gradient kernel), which carries the
    gradient-bucket markers since a unit's gradients are complete only after it. Seconds are the
    plan's, partitioned, never re-derived. By list object: alike chunks share their lists."""

    def split() -> tuple[list[Cost], list[Cost]]:
        inputs: list[Cost] = []
        weights: list[Cost] = []
        for cost in backward:
            if cost.stream == "bucket":
                weights.append(cost)
            elif cost.wgrad > 0:
                inputs.append(_part(cost, cost.seconds - cost.wgrad, ".dgrad"))
                weights.append(_part(cost, cost.wgrad, ".wgrad"))
            else:
                inputs.append(cost)
        return inputs, weights

    return _SPLIT.get(id(backward), split, backward)


def layer_costs(workload: Workload, system: System, layout: Layout, index: int, batch: Batch) -> tuple[list[Cost], list[Cost]]:
    """Forward and backward costs of one block (its position in the expanded model) for one batch
    on one device, as the step plan costs it: for checking a calibration against one real layer.
    The backward includes what the recompute policy replays; no gradient sync or optimizer."""
    forward, backward = _costed(layer_work(workload, layout, index, batch), system, layout)
    return forward, [c for c in backward if c.stream != "bucket"]


def layer_work(workload: Workload, layout: Layout, index: int, batch: Batch) -> ForwardWork:
    """One block's forward work items (its position in the expanded model) for one batch."""
    return forward_work([Unit((blocks_of(workload.model)[index],))], workload, layout, batch)


def _subnet_costs(units: list[Unit], workload: Workload, system: System, layout: Layout, batch: Batch,
                  step: int | None) -> tuple[list[Cost], list[Cost], float]:
    """An anytime step trains its sandwich of widths one after another; gradients accumulate and
    reduce once, so only the last sub-network's backward launches gradient buckets."""
    assert workload.anytime is not None
    forward: list[Cost] = []
    backward: list[Cost] = []
    saved = 0.0
    widths = sandwich(workload.anytime, step, workload.seed)
    for position, width in enumerate(widths):
        work = forward_work(scale_units(units, width), workload, layout, batch, step)
        f, b = _costed(work, system, layout)
        forward += f
        backward += b if position == len(widths) - 1 else [c for c in b if c.stream != "bucket"]
        saved = max(saved, work.saved_bytes)  # one sub-network's activations live at a time
    return forward, backward, saved


def build_chunk(units: list[Unit], workload: Workload, system: System, layout: Layout, batch: Batch,
                sampled_steps: int = 0, work: ForwardWork | None = None) -> ChunkPlan:
    """`work`: these units' expected-load forward work, when the caller already built it."""
    if work is None:
        work = forward_work(units, workload, layout, batch)
    chunk = ChunkPlan(units, params=work.params, saved_bytes=work.saved_bytes, transient_bytes=work.transient_bytes,
                      largest_unit_saved=work.largest_unit_saved, moe=work.moe)
    if work.moe_ranges:  # forward and backward waits caused by the busiest rank (expected loads)
        expected_forward, _, backward_by_item = _costed_by_item(work, system, layout)
        chunk.moe_imbalance = [sum(expected_forward[i].imbalance + backward_by_item[i].imbalance for i in range(start, end))
                               for start, end in work.moe_ranges]
        ep_costs = [[c for i in range(start, end) for c in (expected_forward[i], backward_by_item[i])
                     if c.stream == "comm" and c.group == "ep"] for start, end in work.moe_ranges]
        chunk.moe_ep_comm = [(sum(c.seconds + c.hidden for c in costs), sum(c.hidden for c in costs)) for costs in ep_costs]
    if workload.anytime is not None:
        chunk.forward, chunk.backward, chunk.saved_bytes = _subnet_costs(units, workload, system, layout, batch, None)
        chunk.sampled = [_subnet_costs(units, workload, system, layout, batch, step)[:2] for step in range(sampled_steps)]
    elif sampled_steps > 0 and any(stats.loads.drawn for stats in work.moe):
        # Drawn expert loads change from step to step; everything else, exact loads included, does not.
        chunk.sampled = [_costed(forward_work(units, workload, layout, batch, step), system, layout)
                         for step in range(sampled_steps)]
        chunk.forward, chunk.backward = chunk.sampled[0]  # the expected-load costs would never be played
    else:
        chunk.forward, chunk.backward = _costed(work, system, layout)  # memoised: the costs above, if any
    if work.offloaded:
        copies = offload_costs(work, system, layout)
        chunk.forward, chunk.backward = chunk.forward + [copies[0]], [copies[1]] + chunk.backward
        chunk.sampled = [(forward + [copies[0]], [copies[1]] + backward) for forward, backward in chunk.sampled]
    synced: dict[tuple[float, ...], list[Cost]] = {}  # alike layers reduce alike gradients
    for params, extra in zip(work.unit_params, work.unit_step_grads):
        key = params.astuple()
        if key not in synced:
            synced[key] = _grad_sync(params, workload, system, layout)
        chunk.grad_buckets.append(synced[key] + [cost_item(i, system, layout) for i in extra])
    chunk.param_sync = (_param_gather(work.params, workload, system, layout)
                        + [cost_item(i, system, layout) for i in work.per_step])
    return chunk


def offload_costs(work: ForwardWork, system: System, layout: Layout) -> tuple[Cost, Cost]:
    """What activation offloading makes a micro-batch wait for, in its forward and its backward.
    Each offloaded layer's saved bytes cross the host link (PCIe, one direction each way) while
    the next layer computes: out during that layer's forward, back during its backward, which
    runs just before (Transformer Engine's double-buffered offload handler). Only a copy's time
    beyond its neighbour's compute is waited for."""
    forward, _, backward = _costed_by_item(work, system, layout)
    ends = work.unit_starts[1:] + [len(work.items)]

    def compute(costs: list[Cost], unit: int) -> float:
        if unit >= len(work.unit_starts):
            return 0.0
        return sum(c.seconds for c in costs[work.unit_starts[unit]:ends[unit]] if c.stream == "compute")

    out = back = 0.0
    for unit, saved in enumerate(work.offloaded):
        copy = host_copy_time(saved, system)
        out += max(0.0, copy - compute(forward, unit + 1))
        back += max(0.0, copy - compute(backward, unit + 1))
    moved = sum(work.offloaded)
    return (Cost("offload.to_host", "compute", out, bytes=moved), Cost("offload.from_host", "compute", back, bytes=moved))


def _sharded_groups(params: Params, layout: Layout) -> list[tuple[str, float]]:
    """(data-parallel group, parameters of this device it syncs): dense over DP (with CP: the "dp"
    group is dp x cp ranks, layout.py), experts over expert-DP."""
    dense, expert = layout.local_params(params)
    return [(group, count) for group, count in (("dp", dense), ("edp", expert)) if count > 0]


def _grad_sync(params: Params, workload: Workload, system: System, layout: Layout) -> list[Cost]:
    """Data-parallel gradient reduction: an all-reduce, or with a distributed optimizer (ZeRO,
    Rajbhandari 2020) a reduce-scatter."""
    collective = "all_reduce" if workload.parallelism.zero_stage == 0 else "reduce_scatter"
    grad_bytes = DTYPE_BYTES[workload.precision.gradients]
    # Sparse embedding rows are gathered by the block itself (embedding_work), not reduced here.
    dense_only = replace(params, dense=params.dense - params.sparse_grad, sparse_grad=0.0)
    groups = _sharded_groups(dense_only, layout)
    synced = [cost_item(Comm(f"grad_{collective}.{group}", collective, count * grad_bytes, group), system, layout)
              for group, count in groups]
    if workload.parallelism.schedule == "dualpipe" and groups:
        synced.append(_mirror_sync(groups, workload, system, layout))
    return synced


def _mirror_sync(groups: list[tuple[str, float]], workload: Workload, system: System, layout: Layout) -> Cost:
    """DualPipe keeps each model chunk on two ranks, r and pp-1-r, one per direction, whose
    gradients must be added before the update (deepseek-ai/DualPipe examples/example_dualpipe.py
    adds each rank's gradients to its mirror's): an all-reduce between the pair of what the
    device holds after the data-parallel reduction (its ZeRO shard, or all of it). The pair is in
    one node only when the whole pipeline is; reported as data-parallel traffic."""
    zero = workload.parallelism.zero_stage >= 1
    held = sum(count / ({"dp": layout.dp_cp, "edp": layout.expert_dp}[group] if zero else 1) for group, count in groups)
    pair = CommGroup(2, 2 if layout.groups["pp"].nodes == 1 else 1)
    mirrored = replace(layout, groups={**layout.groups, "dp": pair})
    return cost_item(Comm("grad_all_reduce.mirror", "all_reduce", held * DTYPE_BYTES[workload.precision.gradients], "dp"),
                     system, mirrored)


def _param_gather(params: Params, workload: Workload, system: System, layout: Layout) -> list[Cost]:
    """ZeRO: all-gather the updated weights before the next forward."""
    if workload.parallelism.zero_stage == 0:
        return []
    weight_bytes = DTYPE_BYTES[workload.precision.weights]
    return [cost_item(Comm(f"param_all_gather.{group}", "all_gather", count * weight_bytes, group), system, layout)
            for group, count in _sharded_groups(params, layout)]


def _optimizer(params: Params, workload: Workload, system: System, layout: Layout) -> Cost:
    dense, expert = layout.local_params(params)
    if workload.parallelism.zero_stage >= 1:
        dense, expert = dense / layout.dp_cp, expert / layout.expert_dp
    tensors = params.tensors + params.expert_tensors / layout.ep  # a TP or ZeRO shard of each is still one tensor
    return cost_item(optimizer_step(dense + expert, tensors, workload.optimizer, workload.precision), system, layout)


def micro_batch(workload: Workload) -> Batch:
    """One micro-batch as one rank sees it: micro_batch sequences of seq_len / cp tokens each
    (context parallelism splits every sequence; layout.py checks it divides)."""
    assert workload.train is not None
    local = workload.train.seq_len // workload.parallelism.cp
    return Batch(workload.parallelism.micro_batch, local, local)


def chunk_placement(schedule: str, pp: int, vpp: int) -> list[list[tuple[int, int]]]:
    """Per pipeline rank, the model chunks it holds, each as (direction, position): micro-batches
    of a direction pass through positions 0, 1, ... in turn, and position k runs model chunk k
    (of pp x vpp). Interleaved 1F1B: chunk v x pp + r on rank r (Narayanan et al. 2021). DualPipe:
    chunk r for micro-batches fed from rank 0 and chunk pp-1-r for those fed from rank pp-1
    (deepseek-ai/DualPipe examples/example_dualpipe.py: full_modules[rank] and
    full_modules[pp_size - 1 - rank]), so every chunk sits on two ranks. DualPipeV: chunks r and
    2pp-1-r of one direction, down the V and back up (dualpipe/dualpipev.py: the last rank hands
    its first chunk's output to its second chunk on the spot)."""
    if schedule == "dualpipe":
        return [[(0, rank), (1, pp - 1 - rank)] for rank in range(pp)]
    if schedule == "dualpipev":
        return [[(0, rank), (0, 2 * pp - 1 - rank)] for rank in range(pp)]
    virtual = vpp if schedule == "interleaved" else 1
    return [[(0, v * pp + rank) for v in range(virtual)] for rank in range(pp)]


def chunk_works(workload: Workload, layout: Layout) -> list[ForwardWork]:
    """Each model chunk's expected-load forward work, in global chunk order: what a fit check
    reads and the plan then costs, built once for both."""
    batch = micro_batch(workload)
    return [forward_work(units, workload, layout, batch)
            for units in stage_units(units_of(workload.model), layout.pp * layout.vpp, workload.parallelism.pipeline_layout)]


# parameters, saved activation bytes, largest transient buffer, most activation bytes one unit keeps
Footprint = tuple[Params, float, float, float]


def footprint(chunks: list[ForwardWork] | list[ChunkPlan]) -> Footprint:
    """What memory needs of one stage, from its chunks' works or plans: their parameters, the
    activations one micro-batch leaves through all of them, the largest transient buffer, and the
    most one unit (layer) of them keeps."""
    params = Params()
    for chunk in chunks:
        params = params.add(chunk.params)
    return (params, sum(c.saved_bytes for c in chunks), max((c.transient_bytes for c in chunks), default=0.0),
            max((c.largest_unit_saved for c in chunks), default=0.0))


def stage_params(workload: Workload, layout: Layout) -> list[Params]:
    """Each pipeline stage's parameters (all its chunks'), before any work is built: what weights,
    gradients and optimizer state need whatever the activations. A DualPipe rank's two chunks
    make 2/pp of the model, twice 1F1B's share (DeepSeek-V3 report, Table 2: parameters 2x)."""
    chunks = stage_units(units_of(workload.model), layout.pp * layout.vpp, workload.parallelism.pipeline_layout)
    hidden = workload.model.hidden
    per_chunk = [_chunk_params(units, hidden) for units in chunks]
    totals = []
    for placed in chunk_placement(workload.parallelism.schedule, layout.pp, layout.vpp):
        total = Params()
        for _, position in placed:
            total = total.add(per_chunk[position])
        totals.append(total)
    return totals


_CHUNK_PARAMS: Memo[Params] = Memo(10_000)


def _chunk_params(units: list[Unit], hidden: int) -> Params:
    """A chunk's parameters, by what its units are (alike chunks of a search's layouts share them)."""
    return _CHUNK_PARAMS.get((tuple(_alike(unit, False) for unit in units), hidden), lambda: units_params(units, hidden))


def stage_footprints(workload: Workload, layout: Layout, works: list[ForwardWork]) -> list[Footprint]:
    """Per pipeline stage, its footprint before anything is costed: the same numbers as the full
    plan's (a sweep checks fit first); not for anytime supernets, whose saved activations depend
    on the sandwich."""
    assert workload.anytime is None
    return [footprint([works[position] for _, position in placed])
            for placed in chunk_placement(workload.parallelism.schedule, layout.pp, layout.vpp)]


def _pipeline_send(workload: Workload, system: System, layout: Layout, batch: Batch) -> Cost:
    """One activation (or its gradient) to the next stage. Tensor-parallel ranks hold the same
    activation, so each sends 1/tp of it over its own link and the receivers all-gather it over
    the node fabric (Narayanan et al. 2021, sec. 4.1, scatter/gather); with sequence parallelism
    each rank's shard is already 1/tp. The send's link carries the pair, in that order."""
    act_bytes = batch.tokens * workload.model.hidden * DTYPE_BYTES[workload.precision.communication]
    if layout.tp == 1:
        return cost_item(Comm("pp.send", "p2p", act_bytes, "pp"), system, layout)
    send = cost_item(Comm("pp.send", "p2p", act_bytes / layout.tp, "pp"), system, layout)
    if workload.parallelism.effective_sequence_parallel:
        return send
    gather = cost_item(Comm("pp.gather", "all_gather", act_bytes, "tp"), system, layout)
    return replace(send, name="pp.send+gather", seconds=send.seconds + gather.seconds)


def build_training_plan(workload: Workload, system: System, layout: Layout, sampled_steps: int = 0,
                        works: list[ForwardWork] | None = None) -> TrainingPlan:
    """`works`: `chunk_works` of this workload and layout, when a fit check already built them."""
    assert workload.train is not None
    par = workload.parallelism
    batch = micro_batch(workload)
    units = units_of(workload.model)
    chunks = stage_units(units, layout.pp * layout.vpp, par.pipeline_layout)
    p2p = _pipeline_send(workload, system, layout, batch) if layout.pp > 1 else Cost("pp.send", "comm", 0.0)
    stages: list[StagePlan] = []
    for placed in chunk_placement(par.schedule, layout.pp, layout.vpp):
        plans = [build_chunk(chunks[index], workload, system, layout, batch, sampled_steps, works[index] if works else None)
                 for _, index in placed]
        params = Params()
        for c in plans:
            params = params.add(c.params)
        stages.append(StagePlan(plans, p2p, _optimizer(params, workload, system, layout)))
    return TrainingPlan(stages, layout.microbatches, layout.pp, layout.vpp, par.schedule, par.overlap_grad_reduce,
                        par.effective_overlap_p2p, par.overlap_moe_comm,
                        _comm_sm_share(_comm_sms(workload, units), system), layout.pipeline_runs)


# SMs a deduplicating (DeepEP-style) dispatcher's kernels take unless told otherwise: Megatron's
# --moe-deepep-num-sms, "default 20" (Megatron-Bridge docs/training/moe-optimization.md).
DEDUPLICATED_DISPATCH_SMS = 20


def _comm_sms(workload: Workload, units: list[Unit]) -> int | None:
    """The workload's figure, else the dispatcher's default (known for the deduplicating one; an
    NCCL all-to-all's channel count depends on the NCCL build and is not modelled)."""
    par = workload.parallelism
    if par.moe_comm_sms is not None:
        return par.moe_comm_sms
    dispatchers = {block.spec.routing.dispatcher for unit in units for block in unit.blocks
                   if isinstance(block.spec, MoEFFNBlock)}
    return DEDUPLICATED_DISPATCH_SMS if "deduplicated" in dispatchers else None


def _comm_sm_share(comm_sms: int | None, system: System) -> float:
    """Share of the device's SMs an overlapped dispatcher holds (0 when either count is unknown)."""
    sm_count = system.device.sm_count
    if comm_sms is None or sm_count is None:
        return 0.0
    return min(comm_sms, sm_count - 1) / sm_count
