"""MoEfication (Zhang et al. 2022), as SSD uses it: a dense FFN becomes an MoE by clustering the rows
of W_in, and back by undoing the permutation. Two things are derived here: the sparse model a
phase trains, and the work one switch costs per FFN layer."""

from __future__ import annotations

from simcc.errors import InputError
from simcc.model.ops import DTYPE_BYTES, Op
from simcc.specs.blocks import DenseFFNBlock, GatingSpec, LoadSpec, MoEFFNBlock, RoutingSpec
from simcc.specs.workload import BlockItem, ModelSpec

# k-means runs in fp32, as the profiler's torch implementation does.
CLUSTER_DTYPE = "fp32"


def moefied_model(model: ModelSpec, experts: int, k: int, load: LoadSpec, source: str, field: str) -> ModelSpec:
    """Every dense FFN split into `experts` clusters of f/E neurons; the router is the centroids
    (d x E) and keeps the top k. Dropless: each cluster is a slice of one FFN, never over capacity."""

    def convert(items: list[BlockItem]) -> list[BlockItem]:
        out = []
        for item in items:
            if item.blocks is not None:
                out.append(item.model_copy(update={"blocks": convert(item.blocks)}))
            elif isinstance(item.spec, DenseFFNBlock):
                ffn = item.spec
                if ffn.hidden % experts:
                    raise InputError(source, field,
                                     f"{experts} experts must divide the FFN width {ffn.hidden} (clusters of equal size)")
                out.append(BlockItem.of(MoEFFNBlock(
                    experts=experts, k=k, expert_hidden=ffn.hidden // experts, gated=ffn.gated,
                    activation=ffn.activation, gating=GatingSpec(policy="moefication"),
                    routing=RoutingSpec(dropless=True, capacity_factor=None, dropless_block=1), load=load)))
            else:
                out.append(item)
        return out

    converted = convert(model.blocks)
    if converted == model.blocks:
        raise InputError(source, field, "the model has no dense_ffn block for a sparse phase to MoEfy")
    return model.model_copy(update={"blocks": converted, "name": f"{model.name} (MoEfied {k}/{experts})"})


def dense_ffn_layers(model: ModelSpec) -> list[DenseFFNBlock]:
    """Each dense FFN layer, repeats expanded."""

    def walk(items: list[BlockItem]) -> list[DenseFFNBlock]:
        found: list[DenseFFNBlock] = []
        for item in items:
            if item.blocks is not None:
                found += walk(item.blocks) * (item.repeat or 1)
            elif isinstance(item.spec, DenseFFNBlock):
                found.append(item.spec)
        return found

    return walk(model.blocks)


def clustering_op(hidden: int, ffn: DenseFFNBlock, experts: int, iterations: int) -> Op:
    """Balanced k-means of the f rows of W_in (d wide) into E clusters. Per iteration: distances
    to the centroids (an f x d by d x E product, 2fdE FLOPs), the balanced assignment over the
    f x E scores, and the centroid update (one pass over W_in, 2fd). Costed against the `moefication`
    efficiency curve that `simcc calibrate` fits from the profiler's timing of the real algorithm."""
    rows = ffn.hidden
    b = DTYPE_BYTES[CLUSTER_DTYPE]
    flops = iterations * (2.0 * rows * hidden * experts + 2.0 * rows * hidden)
    moved = iterations * (2 * rows * hidden + experts * hidden + 3 * rows * experts) * b
    return Op("moefication.kmeans", "moefication", flops, moved, CLUSTER_DTYPE)


def permutation_op(name: str, state_bytes: float) -> Op:
    """Reordering FFN neurons (W_in rows, W_out columns) together with everything kept per
    parameter (weights, gradients, optimizer state): each byte read once and written once."""
    return Op(name, "permute", 0.0, 2.0 * state_bytes, "fp32")
