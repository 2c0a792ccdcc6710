"""Threshold-fired block trees (Gallicchio & Nuti 2025, arXiv 2502.14788): the blocks that fire, per level, run as
grouped products; how many fire comes from the measured firing profile (model/threshold.py)."""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard, activation_op, gated_width, is_gated
from simcc.model.ops import elementwise, grouped_gemm
from simcc.model.threshold import firing_sample
from simcc.specs.blocks import ThresholdTreeBlock


def layers(spec: ThresholdTreeBlock) -> list[tuple[int, int]]:
    """Each block's MLP layers as (inputs, product columns): a gated activation after a layer
    takes two halves of its product, so the product (weight and bias) is twice as wide."""
    gated = is_gated(spec.activation)
    return [(a, gated_width(b, gated)) for a, b in zip(spec.widths, spec.widths[1:])]


def params(spec: ThresholdTreeBlock, hidden: int) -> Params:
    """Every block's MLP is stored; an input uses the blocks that fire (counted like experts).
    The widths are the block's own: the model's hidden size does not enter."""
    pairs = layers(spec)
    per_block = sum(a * b for a, b in pairs)
    profile = firing_sample(spec, 0)
    blocks = profile.blocks
    return Params(replicated=sum(b for _, b in pairs) * blocks, expert=per_block * blocks,
                  active_expert=per_block * sum(profile.active_per_level),
                  expert_rows_cols=sum(a + b for a, b in pairs) * blocks,
                  expert_tensors=2 * len(pairs) * blocks)  # each block's weights and biases


@block_costing(ThresholdTreeBlock, params, per_layer_seed=True)
def work(spec: ThresholdTreeBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    """Per level, the token-block pairs that fire run as one grouped product per MLP layer."""
    profile = firing_sample(spec, shard.sample_seed)
    T, dt = batch.tokens, shard.dtype
    result = BlockWork()
    for level, (active, computed) in enumerate(zip(profile.active_per_level, profile.computations_per_level)):
        blocks = spec.branching**level
        tokens = [T * computed / blocks] * blocks  # every computation: once per ray or threshold without reuse
        # A block of the level fires for an input with probability active / blocks; a batch reads
        # the weights of the union of its inputs' fired blocks, not of every block.
        fired = blocks * (1.0 - (1.0 - min(active / blocks, 1.0)) ** T)
        for i, ((a, width), b) in enumerate(zip(layers(spec), spec.widths[1:])):
            result.forward.append(grouped_gemm(f"tree.level{level}.fc{i}", tokens, tokens, a, width, dt, active=fired,
                                               mean_active=fired, operands=shard.dense_gemm))
            result.forward.append(activation_op(f"tree.level{level}.act{i}", T * computed * b, spec.activation, dt))
    # the router of each computed block: softmax over its children
    result.forward.append(elementwise("tree.route", T * sum(profile.computations_per_level) * spec.branching, 1, 1,
                                      dt, flops_per_element=6, family="gate"))
    return result
