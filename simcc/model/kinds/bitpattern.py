"""Bit-pattern gating (Cho & Bengio 2014, arXiv 1406.7362): gater signs pick weight matrices;
tokens sharing a bit prefix form one small batch of a grouped product per tree level.

Skewed leaves (`leaves:`) cost through what a grouped GEMM does with uneven groups. Its kernel
(CUTLASS's grouped GEMM, as MegaBlocks and cuBLAS run experts) deals the output tiles of every
group to the SMs from one queue, so a popular leaf's rows spread over the SMs like any others:
the busiest leaf sets the time only for a kernel with one worker per group, which simcc does not
model. Skew moves the time instead through (a) the weights read: a step reads the matrices of
the prefixes its B tokens reach, sum over prefixes of 1 - (1 - p)^B in expectation, fewer the
more skewed, which is what sets a small batch's time; and (b) the shapes: fewer, fuller groups
pad fewer tiles and sit higher on the efficiency curve (ops.grouped_gemm, costs/compute.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard, activation_op, gated_width, is_gated
from simcc.model.ops import elementwise, gemm, grouped_gemm
from simcc.routing.gating import popularity
from simcc.specs.blocks import BitPatternBlock, LoadSpec


def matrices(spec: BitPatternBlock) -> int:
    """Stored weight matrices: every node of a depth-`bits` binary tree, or only its leaves."""
    return 2 ** (spec.bits + 1) - 1 if spec.tree else 2**spec.bits


def product_width(spec: BitPatternBlock, hidden: int) -> int:
    """Columns of each chosen matrix: a gated activation takes two halves of the (summed) product,
    so every matrix, and the bias on their sum, doubles, as an FFN's gated up projection does."""
    return gated_width(spec.output or hidden, is_gated(spec.activation))


def params(spec: BitPatternBlock, hidden: int) -> Params:
    """The matrices count like experts: all stored, only the path's (bits + 1, or one) used per token."""
    d_in, width = spec.input or hidden, product_width(spec, hidden)
    used = spec.bits + 1 if spec.tree else 1
    return Params(replicated=spec.bits * d_in + width, expert=matrices(spec) * d_in * width,
                  active_expert=used * d_in * width, expert_rows_cols=matrices(spec) * (d_in + width),
                  tensors=2, expert_tensors=matrices(spec))  # the gater's weight and the bias; each matrix


@dataclass(frozen=True)
class _Leaves:
    """The leaves as `popularity` reads an MoE layer: how many, and their load spec."""

    experts: int
    load: LoadSpec


def prefix_shares(spec: BitPatternBlock, seed: int) -> list[np.ndarray]:
    """Each level's prefixes' shares of the tokens, level 0 (the root) to `bits` (the leaves). The
    first gater bit is the most significant of a leaf's index, so a prefix's share is the sum of
    its two children's; powers of two keep the uniform shares exact."""
    shares = [popularity(_Leaves(2**spec.bits, spec.leaves), np.random.default_rng(seed))]  # type: ignore[arg-type]
    for _ in range(spec.bits):
        shares.append(shares[-1].reshape(-1, 2).sum(axis=1))
    return shares[::-1]


@block_costing(BitPatternBlock, params, per_layer_seed=True)
def work(spec: BitPatternBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    """Gater product, then one grouped product per tree level: at level l the tokens sharing a
    prefix form one of 2^l small batches (only the leaf level without the tree)."""
    d_in, d_out, width = spec.input or hidden, spec.output or hidden, product_width(spec, hidden)
    T, dt = batch.tokens, shard.dtype
    result = BlockWork()
    result.forward.append(gemm("bits.gater", T, d_in, spec.bits, dt, operands=shard.dense_gemm))
    levels = range(spec.bits + 1) if spec.tree else [spec.bits]
    # Which leaves are hot is the trained gater's, fixed over steps; model FLOPs count an even split.
    shares = prefix_shares(spec, shard.sample_seed) if shard.executed else None
    rng = np.random.default_rng(shard.seed)
    for level in levels:
        groups = 2**level
        if shares is not None:  # one step's tokens over the prefixes; it reads the weights of those it reached
            tokens = rng.multinomial(T, shares[level]).astype(float).tolist()
        else:
            tokens = [T / groups] * groups
        result.forward.append(grouped_gemm(f"bits.level{level}", tokens, tokens, d_in, width, dt,
                                           operands=shard.dense_gemm))
    if spec.tree:  # sum the per-level products
        result.forward.append(elementwise("bits.sum", T * width, len(levels), 1, dt))
    result.forward.append(activation_op("bits.act", T * d_out, spec.activation, dt))
    return result
