"""Where each parallel group lives: sizes, and how many of a group's ranks share a node.

Rank order follows Megatron-Core's default (tensor fastest, then expert/data, then pipeline):
a group whose members are `stride` ranks apart keeps `devices_per_node // stride` of them in one
node. Inconsistent parallelism is rejected here with a one-line InputError.
"""

from __future__ import annotations

from dataclasses import dataclass

from simcc.errors import InputError
from simcc.model.blocks import Params
from simcc.model.graph import units_of
from simcc.specs.hardware import System
from simcc.specs.workload import AttentionBlock, DenseFFNBlock, MoEFFNBlock, Workload


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

    def local_params(self, params: Params) -> tuple[float, float]:
        """(dense, expert) parameters one device holds before ZeRO sharding."""
        return params.dense / self.tp + params.replicated, params.expert / (self.ep * self.expert_tp)


def _group(size: int, stride: int, devices_per_node: int) -> CommGroup:
    if size <= 1:
        return CommGroup(1, 1)
    per_node = max(1, min(size, devices_per_node // stride)) if stride < devices_per_node else 1
    return CommGroup(size, per_node)


def _blocks_of(workload: Workload) -> list:
    return [b for unit in units_of(workload.model) for b in unit.blocks]


def build_layout(workload: Workload, system: System, source: str) -> Layout:
    par = workload.parallelism
    devices = system.devices
    tp, pp, vpp, ep = par.tp, par.pp, par.vpp, par.ep
    etp = par.effective_expert_tp

    def fail(field: str, message: str) -> InputError:
        return InputError(source, field, message)

    if devices % (tp * pp):
        raise fail("parallelism", f"tp x pp = {tp * pp} does not divide the {devices} devices of {system.name}")
    dp = devices // (tp * pp)
    if par.dp is not None and par.dp != dp:
        raise fail("parallelism.dp", f"tp x pp x dp = {tp * pp * par.dp} but {system.name} has {devices} devices")
    if (dp * tp) % (ep * etp):
        raise fail("parallelism.ep", f"ep x expert_tp = {ep * etp} must divide dp x tp = {dp * tp}")

    units = len(units_of(workload.model))
    if units < pp * vpp:
        raise fail("parallelism.pp", f"pp x vpp = {pp * vpp} exceeds the model's {units} pipeline units (layers)")

    for block in _blocks_of(workload):
        spec = block.spec
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
            if spec.expert_hidden % etp:
                raise fail("parallelism.expert_tp", f"expert_tp={etp} does not divide expert_hidden={spec.expert_hidden}")
    has_moe = any(isinstance(b.spec, MoEFFNBlock) for b in _blocks_of(workload))
    if ep > 1 and not has_moe:
        raise fail("parallelism.ep", f"ep={ep} but the model has no moe_ffn block")

    microbatches = 1
    if workload.mode == "train":
        assert workload.train is not None
        per_step = workload.train.global_batch
        if per_step % (par.micro_batch * dp):
            raise fail("train.global_batch", f"global_batch={per_step} is not a multiple of micro_batch x dp = "
                       f"{par.micro_batch} x {dp}")
        microbatches = per_step // (par.micro_batch * dp)
        if par.schedule == "interleaved" and microbatches % pp:
            raise fail("train.global_batch", f"interleaved schedule needs micro-batches per pipeline "
                       f"({microbatches}) to be a multiple of pp={pp}")

    dpn = system.devices_per_node
    expert_dp = dp * tp // (ep * etp)
    groups = {
        "tp": _group(tp, 1, dpn),
        "dp": _group(dp, tp, dpn),
        "ep": _group(ep, etp, dpn),
        "edp": _group(expert_dp, ep * etp, dpn),
        "pp": _group(pp, tp * dp, dpn),
    }
    return Layout(dp, tp, pp, vpp, ep, etp, expert_dp, microbatches, groups)
