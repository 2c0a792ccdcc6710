"""Which costing module serves which block spec class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard
from simcc.specs.blocks import BlockSpec

SpecT = TypeVar("SpecT", bound=BlockSpec)

ParamsOf = Callable[[SpecT, int], Params]  # (spec, model hidden size) -> parameters of the full layer
WorkOf = Callable[[SpecT, int, Batch, Shard], BlockWork]  # (spec, hidden, batch, shard) -> one device's work
# (spec, hidden, KV-cache dtype, tp) -> bytes one token leaves in the KV cache on one device
KVCacheOf = Callable[[SpecT, int, str, int], float]
# spec -> the most tokens one sequence keeps in this layer's KV cache (a sliding window and its
# sinks); None: every token of the context
KVWindowOf = Callable[[SpecT], "int | None"]


@dataclass(frozen=True)
class Costing(Generic[SpecT]):
    """How the model layer treats one block kind."""

    spec_type: type[SpecT]
    params: ParamsOf[SpecT]
    work: WorkOf[SpecT]
    # The work draws something at random (expert loads, bit patterns, firing): each layer gets its
    # own seed, from its position in the model, so that layers do not repeat one draw.
    per_layer_seed: bool = False
    # A thin block that rides with its neighbouring pipeline unit instead of forming one
    # (embedding and LM head, as in Megatron's pipeline split).
    attached: bool = False
    kv_cache: KVCacheOf[SpecT] | None = None  # attention kinds: what serving keeps per token
    # The work reads the data-parallel degree and the micro-batches per step (sparse embedding
    # gradients gathered over replicas); other kinds' work is the same for any of those.
    reads_data_parallel: bool = False
    # attention kinds that cap what they cache: serving's KV memory and decode reads stop there
    kv_window: KVWindowOf[SpecT] | None = None


COSTINGS: dict[type[BlockSpec], Costing[Any]] = {}


def block_costing(spec_type: type[SpecT], params: ParamsOf[SpecT], *, per_layer_seed: bool = False,
                  attached: bool = False, kv_cache: KVCacheOf[SpecT] | None = None,
                  reads_data_parallel: bool = False,
                  kv_window: KVWindowOf[SpecT] | None = None) -> Callable[[WorkOf[SpecT]], WorkOf[SpecT]]:
    """Register a kind's costing: decorates its `work` function and names its `params` function."""

    def register(work: WorkOf[SpecT]) -> WorkOf[SpecT]:
        if spec_type in COSTINGS:
            raise ValueError(f"{spec_type.__name__} already has a costing module")
        COSTINGS[spec_type] = Costing(spec_type, params, work, per_layer_seed, attached, kv_cache, reads_data_parallel,
                                      kv_window)
        return work

    return register


def costing_of(spec: BlockSpec) -> Costing[Any]:
    try:
        return COSTINGS[type(spec)]
    except KeyError:
        raise LookupError(f"block kind {spec.kind!r} has no costing module in simcc/model/kinds/") from None
