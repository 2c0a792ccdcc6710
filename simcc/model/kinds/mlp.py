"""Fully connected stacks: one GEMM and one activation per pair of widths."""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard, act_saved
from simcc.model.ops import elementwise, gemm
from simcc.specs.blocks import MLPBlock


def params(spec: MLPBlock, hidden: int) -> Params:
    """The widths are the stack's own: the model's hidden size does not enter."""
    pairs = list(zip(spec.widths, spec.widths[1:]))
    return Params(dense=sum(a * b for a, b in pairs), replicated=sum(b for _, b in pairs),
                  dense_rows_cols=sum(a + b for a, b in pairs), tensors=2 * len(pairs))  # weight and bias each


@block_costing(MLPBlock, params)
def work(spec: MLPBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    result = BlockWork()
    T, dt = batch.tokens, shard.dtype
    for i, (a, b) in enumerate(zip(spec.widths, spec.widths[1:])):
        result.forward.append(gemm(f"mlp.fc{i}", T, a, b / shard.tp, dt, operands=shard.dense_gemm))
        result.forward.append(elementwise(f"mlp.act{i}", T * b / shard.tp, 1, 1, dt,
                                          saved_elements=act_saved(spec.activation, False, T * b / shard.tp)))
    return result
