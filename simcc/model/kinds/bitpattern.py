"""Bit-pattern gating (Cho & Bengio 2014): gater signs pick weight matrices; tokens sharing a bit
prefix form one small batch of a grouped product per tree level."""

from __future__ import annotations

import numpy as np

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard
from simcc.model.ops import elementwise, gemm, grouped_gemm
from simcc.specs.blocks import BitPatternBlock


def matrices(spec: BitPatternBlock) -> int:
    """Stored weight matrices: every node of a depth-`bits` binary tree, or only its leaves."""
    return 2 ** (spec.bits + 1) - 1 if spec.tree else 2**spec.bits


def params(spec: BitPatternBlock, hidden: int) -> Params:
    """The matrices count like experts: all stored, only the path's (bits + 1, or one) used per token."""
    d_in, d_out = spec.input or hidden, spec.output or hidden
    used = spec.bits + 1 if spec.tree else 1
    return Params(replicated=spec.bits * d_in + d_out, expert=matrices(spec) * d_in * d_out,
                  active_expert=used * d_in * d_out, expert_rows_cols=matrices(spec) * (d_in + d_out),
                  tensors=2, expert_tensors=matrices(spec))  # the gater's weight and bias; each matrix


@block_costing(BitPatternBlock, params, per_layer_seed=True)
def work(spec: BitPatternBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    """Gater product, then one grouped product per tree level: at level l the tokens sharing a
    prefix form one of 2^l small batches (only the leaf level without the tree)."""
    d_in, d_out = spec.input or hidden, spec.output or hidden
    T, dt = batch.tokens, shard.dtype
    result = BlockWork()
    result.forward.append(gemm("bits.gater", T, d_in, spec.bits, dt, operands=shard.dense_gemm))
    levels = range(spec.bits + 1) if spec.tree else [spec.bits]
    rng = np.random.default_rng(shard.seed)
    for level in levels:
        groups = 2**level
        if shard.executed:  # sign bits of random projections: tokens spread evenly over the prefixes
            tokens = rng.multinomial(T, np.full(groups, 1.0 / groups)).astype(float).tolist()
        else:
            tokens = [T / groups] * groups
        result.forward.append(grouped_gemm(f"bits.level{level}", tokens, tokens, d_in, d_out, dt,
                                           operands=shard.dense_gemm))
    if spec.tree:  # sum the per-level products
        result.forward.append(elementwise("bits.sum", T * d_out, len(levels), 1, dt))
    result.forward.append(elementwise("bits.act", T * d_out, 1, 1, dt, saved_elements=T * d_out))
    return result
