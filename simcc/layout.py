"""Where each parallel group lives: sizes, and how many of a group's ranks share a node.

Rank order follows Megatron-Core's default, tp-cp-ep-dp-pp (megatron/core/parallel_state.py,
RankGenerator: tensor fastest, then context, expert/data, pipeline): a group whose members are
`stride` ranks apart keeps `devices_per_node // stride` of them in one node. Inconsistent
parallelism is rejected here with a one-line InputError.
"""

from __future__ import annotations

from dataclasses import dataclass

from simcc.errors import InputError
from simcc.specs.base import MAX_PIPELINE_TASKS
from simcc.model.blocks import Params
from simcc.model.graph import Unit, stage_units, units_of
from simcc.specs.hardware import System
from simcc.specs.blocks import AttentionBlock, BlockSpec, DenseFFNBlock, LSTMBlock, MLABlock, MoEFFNBlock, MTPBlock
from simcc.specs.workload import Workload


# The parallel dimension each communication group belongs to (reports split communication by it).
DIMENSION_OF_GROUP = {"tp": "tp", "etp": "tp", "cp": "cp", "ep": "ep", "dp": "dp", "edp": "dp", "pp": "pp"}
DIMENSIONS = ("tp", "cp", "ep", "dp", "pp")


def dimension_of(group: str) -> str:
    """The parallel dimension a communication group's traffic is reported under."""
    return DIMENSION_OF_GROUP.get(group, "tp")


@dataclass(frozen=True)
class CommGroup:
    """`size` ranks, `per_node` of them in each node (the rest on other nodes)."""

    size: int
    per_node: int

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.per_node))


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    vpp: int
    ep: int
    expert_tp: int
    expert_dp: int
    microbatches: int  # per pipeline per step (train); 1 for serving
    groups: dict[str, CommGroup]
    cp: int = 1  # context parallelism: ranks that split each sequence
    pipeline_runs: int = 1  # pipeline schedule runs per step, each of microbatches / pipeline_runs (train.local_batch)

    @property
    def microbatches_per_run(self) -> int:
        return self.microbatches // self.pipeline_runs

    @property
    def dp_cp(self) -> int:
        """Ranks holding the same dense parameters: data parallelism with context parallelism, the
        group Megatron reduces dense gradients over and shards the distributed optimizer across
        (parallel_state.get_data_parallel_group(with_context_parallel=True)); `dp` alone is
        the replicas that see different sequences."""
        return self.dp * self.cp

    def local_params(self, params: Params) -> tuple[float, float]:
        """(dense, expert) parameters one device holds before ZeRO sharding; expert copies a load
        balancer keeps count with the experts."""
        return (params.dense / self.tp + params.replicated,
                (params.expert + params.redundant_expert) / (self.ep * self.expert_tp))


def comm_group(size: int, stride: int, devices_per_node: int) -> CommGroup:
    if size <= 1:
        return CommGroup(1, 1)
    per_node = max(1, min(size, devices_per_node // stride)) if stride < devices_per_node else 1
    return CommGroup(size, per_node)


def build_layout(workload: Workload, system: System, source: str) -> Layout:
    """The parallel layout of `workload` on `system`, after checking that its degrees are
    consistent with the devices and the model (one-line InputError naming the field)."""
    par = workload.parallelism
    dp = _check_device_split(workload, system, source)
    units = units_of(workload.model)
    _check_model_split(workload, units, source)
    microbatches, runs = _microbatches(workload, dp, source)
    etp = par.effective_expert_tp
    dpn = system.devices_per_node
    cp = par.cp
    # MoE parallel folding (Megatron-Core, megatron/core/parallel_state.py, expert RankGenerator):
    # the experts' domain ETP x EP x EDP is the attention's TP x CP x DP, its ranks in tp-ep-dp order.
    expert_dp = dp * cp * par.tp // (par.ep * etp)
    groups = {
        "tp": comm_group(par.tp, 1, dpn),
        "cp": comm_group(cp, par.tp, dpn),  # the KV ring: ranks tp apart
        # Dense gradients reduce over data parallelism with context parallelism: the cp x dp ranks
        # of one tensor and pipeline rank, tp apart.
        "dp": comm_group(dp * cp, par.tp, dpn),
        "ep": comm_group(par.ep, etp, dpn),
        "etp": comm_group(etp, 1, dpn),  # expert tensor parallelism: consecutive ranks, like TP
        "edp": comm_group(expert_dp, par.ep * etp, dpn),
        "pp": comm_group(par.pp, par.tp * cp * dp, dpn),
    }
    return Layout(dp, par.tp, par.pp, par.vpp, par.ep, etp, expert_dp, microbatches, groups, cp, runs)


def _check_device_split(workload: Workload, system: System, source: str) -> int:
    """tp x cp x pp must divide the devices; the rest is data parallelism; ep x expert_tp divides
    the experts' domain, dp x cp x tp."""
    par = workload.parallelism
    tp, cp, pp, ep, etp, devices = par.tp, par.cp, par.pp, par.ep, par.effective_expert_tp, system.devices
    _check_context_split(workload, source)
    if devices % (tp * cp * pp):
        named = f"tp x cp x pp = {tp * cp * pp}" if cp > 1 else f"tp x pp = {tp * pp}"
        raise InputError(source, "parallelism", f"{named} does not divide the {devices} devices of {system.name}")
    dp = devices // (tp * cp * pp)
    if par.dp is not None and par.dp != dp:
        named = "tp x cp x pp x dp" if cp > 1 else "tp x pp x dp"
        raise InputError(source, "parallelism.dp", f"{named} = {tp * cp * pp * par.dp} but {system.name} has {devices} devices")
    if (dp * cp * tp) % (ep * etp):
        named = "dp x cp x tp" if cp > 1 else "dp x tp"
        raise InputError(source, "parallelism.ep", f"ep x expert_tp = {ep * etp} must divide {named} = {dp * cp * tp}")
    return dp


def _check_context_split(workload: Workload, source: str) -> None:
    """Context parallelism trains (it splits a training sequence), into 2 x cp equal chunks:
    Transformer Engine's load-balanced split needs the sequence length divisible by 2 x cp
    (attn_forward_func_with_cp's docstring, transformer_engine/pytorch/attention/
    dot_product_attention/context_parallel.py)."""
    cp = workload.parallelism.cp
    if cp == 1:
        return
    if workload.mode != "train" or workload.train is None:
        raise InputError(source, "parallelism.cp", f"cp={cp}: context parallelism is modelled for training (mode: train) only")
    seq = workload.train.seq_len
    if seq % (2 * cp):
        raise InputError(source, "parallelism.cp", f"cp={cp} splits each sequence into 2 x cp = {2 * cp} equal chunks; "
                         f"train.seq_len={seq} is not a multiple of {2 * cp}")


def _check_model_split(workload: Workload, unit_list: list[Unit], source: str) -> None:
    """Every degree must cut the model's heads and widths evenly, and the pipeline its layers."""
    # Each distinct spec once: a repeat's layers share theirs (a search checks thousands of layouts).
    specs = list({id(block.spec): block.spec for unit in unit_list for block in unit.blocks}.values())
    specs += [inner for spec in specs if isinstance(spec, MTPBlock) for inner in spec.layer_specs]  # the MTP's layer too
    units = len(unit_list)
    par = workload.parallelism
    tp, pp, vpp, ep, etp = par.tp, par.pp, par.vpp, par.ep, par.effective_expert_tp

    def fail(field: str, message: str) -> InputError:
        return InputError(source, field, message)

    layout = par.pipeline_layout
    if layout is not None:
        if len(layout) != pp * vpp:
            raise fail("parallelism.pipeline_layout", f"expected pp x vpp = {pp * vpp} entries (layers per model chunk), "
                       f"got {len(layout)}")
        if sum(layout) != units:
            raise fail("parallelism.pipeline_layout", f"the entries add up to {sum(layout)} layers; the model has {units}")
        empty = [i for i, chunk in enumerate(stage_units(unit_list, pp * vpp, layout)) if not chunk]
        if empty:
            raise fail("parallelism.pipeline_layout", f"chunk {empty[0]} would hold nothing: only the first chunk "
                       "(with the embedding) and the last (with the LM head) may have 0 layers")
    elif units < pp * vpp:
        raise fail("parallelism.pp", f"pp x vpp = {pp * vpp} exceeds the model's {units} pipeline units (layers)")
    if par.offload_activation_layers >= units:
        raise fail("parallelism.offload_activation_layers", f"expected fewer layers than the model's {units} "
                   f"(Megatron-Core offloads fewer than num_layers), got {par.offload_activation_layers}")
    for spec in specs:
        refusal = context_parallel_refusal(spec, par.cp)
        if refusal is not None:
            raise fail("parallelism.cp", refusal)
        if isinstance(spec, MLABlock) and spec.heads % tp:
            raise fail("parallelism.tp", f"tp={tp} does not divide mla heads={spec.heads}")
        if isinstance(spec, AttentionBlock):
            kv = spec.kv_heads or spec.heads
            if spec.heads % tp:
                raise fail("parallelism.tp", f"tp={tp} does not divide attention heads={spec.heads}")
            if kv % tp and tp % kv:
                raise fail("parallelism.tp", f"tp={tp} and kv_heads={kv}: one must divide the other")
        if isinstance(spec, DenseFFNBlock) and spec.hidden % tp:
            raise fail("parallelism.tp", f"tp={tp} does not divide dense_ffn hidden={spec.hidden}")
        if isinstance(spec, MoEFFNBlock):
            if spec.experts % ep:
                raise fail("parallelism.ep", f"ep={ep} does not divide experts={spec.experts}")
            if spec.routing.redundant_experts % ep:
                raise fail("routing.redundant_experts", f"expected a multiple of ep={ep} (each rank holds as many "
                           f"copies), got {spec.routing.redundant_experts}")
            if spec.expert_hidden % etp:
                raise fail("parallelism.expert_tp", f"expert_tp={etp} does not divide expert_hidden={spec.expert_hidden}")
    if ep > 1 and not any(isinstance(spec, MoEFFNBlock) for spec in specs):
        raise fail("parallelism.ep", f"ep={ep} but the model has no moe_ffn block")


def context_parallel_refusal(spec: BlockSpec, cp: int) -> str | None:
    """Why a block cannot be split by sequence over cp > 1 ranks, or None. Transformer Engine's
    p2p KV ring asserts "Context parallelism does not support sliding window attention with
    cp_comm_type='p2p'" and supports learned sink logits (softmax_type other than vanilla) only
    with cp_comm_type a2a (attn_forward_func_with_cp, transformer_engine/pytorch/attention/
    dot_product_attention/context_parallel.py); it runs fused (flash or cuDNN) attention kernels
    per ring step, not an unfused softmax; an LSTM's recurrence walks the whole sequence."""
    if cp == 1:
        return None
    if isinstance(spec, AttentionBlock):
        if spec.window is not None:
            return (f"cp={cp} with a sliding-window attention layer (window={spec.window}): the KV ring "
                    "(Transformer Engine's cp_comm_type p2p) does not support sliding windows")
        if spec.learned_sinks:
            return f"cp={cp} with learned_sinks: the KV ring (Transformer Engine's cp_comm_type p2p) supports only the vanilla softmax"
        if spec.impl != "flash":
            return f"cp={cp} with attention impl {spec.impl}: context parallelism runs fused (flash) attention on every ring step"
    if isinstance(spec, LSTMBlock):
        return f"cp={cp} with an lstm block: its recurrence runs over the whole sequence"
    return None


def _microbatches(workload: Workload, dp: int, source: str) -> tuple[int, int]:
    """Micro-batches per pipeline per step and the pipeline schedule runs they are split into
    (training); serving runs one batch at a time."""
    if workload.mode != "train":
        return 1, 1
    assert workload.train is not None
    par, per_step, local = workload.parallelism, workload.train.global_batch, workload.train.local_batch
    if per_step % (par.micro_batch * dp):
        raise InputError(source, "train.global_batch", f"global_batch={per_step} is not a multiple of micro_batch x dp = "
                         f"{par.micro_batch} x {dp}")
    microbatches = per_step // (par.micro_batch * dp)
    runs, field = 1, "train.global_batch"
    if local is not None:
        replica = per_step // dp
        if local % par.micro_batch or replica % local:
            raise InputError(source, "train.local_batch", f"local_batch={local} must be a multiple of micro_batch="
                             f"{par.micro_batch} and divide the {replica} sequences each of dp={dp} replicas runs per step")
        runs, field = replica // local, "train.local_batch"
    tasks = microbatches * par.pp * par.vpp
    if tasks > MAX_PIPELINE_TASKS:
        raise InputError(source, "train.global_batch", f"{microbatches:,} micro-batches per pipeline x pp x vpp = {tasks:,} "
                         f"simulated tasks per step, more than {MAX_PIPELINE_TASKS:,}; raise parallelism.micro_batch")
    per_run = microbatches // runs
    if par.schedule == "interleaved" and per_run % par.pp:
        raise InputError(source, field, f"interleaved schedule needs micro-batches per pipeline run "
                         f"({per_run}) to be a multiple of pp={par.pp}")
    problem = par.microbatch_problem(per_run)
    if problem is not None:
        raise InputError(source, field, problem)
    return microbatches, runs
