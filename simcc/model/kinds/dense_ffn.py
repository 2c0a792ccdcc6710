"""Dense feed-forward layer: column-parallel up projection, activation, row-parallel down projection."""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import (
    Batch,
    BlockWork,
    Params,
    Shard,
    act_saved,
    column_gemm,
    ffn_params,
    gated_width,
    norm,
    residual,
    tp_entry,
    tp_exit,
)
from simcc.model.ops import elementwise, gemm
from simcc.specs.blocks import DenseFFNBlock


def params(spec: DenseFFNBlock, hidden: int) -> Params:
    return ffn_params(hidden, spec.hidden, spec.gated)


@block_costing(DenseFFNBlock, params)
def work(spec: DenseFFNBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    t, T, dt = shard.tp, batch.tokens, shard.dtype
    result = BlockWork()
    fwd = result.forward
    fwd.append(norm("ffn.norm", T, hidden, shard))
    fwd += tp_entry("ffn.tp_gather", T, hidden, shard, linear=True)
    fwd.append(column_gemm("ffn.up", T, hidden, gated_width(spec.hidden, spec.gated) / t, shard))
    reads = 2 if spec.gated else 1
    fwd.append(elementwise("ffn.act", T * spec.hidden / t, reads, 1, dt, flops_per_element=8,
                           saved_elements=act_saved(spec.activation, spec.gated, T * spec.hidden / t)))
    fwd.append(gemm("ffn.down", T, spec.hidden / t, hidden, dt, operands=shard.dense_gemm))
    fwd += tp_exit("ffn.tp_reduce", T, hidden, shard, linear=True)
    fwd.append(residual("ffn.residual", T, hidden, shard))
    return result
