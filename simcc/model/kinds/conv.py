"""2-D convolutions as implicit GEMMs, followed by batch norm and activation."""

from __future__ import annotations

import math

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard
from simcc.model.ops import DTYPE_BYTES, Op, elementwise
from simcc.specs.blocks import ConvBlock


def output_size(spec: ConvBlock) -> int:
    # "same" padding: output = ceil(input / stride)
    return math.ceil(spec.input_size / spec.stride)


def params(spec: ConvBlock, hidden: int) -> Params:
    """The channels are the layer's own: the model's hidden size does not enter."""
    weights = spec.out_channels * (spec.in_channels // spec.groups) * spec.kernel**2
    return Params(dense=weights, replicated=2 * spec.out_channels,
                  dense_rows_cols=spec.out_channels + (spec.in_channels // spec.groups) * spec.kernel**2,
                  tensors=3)  # the kernel, and the normalization's scale and shift


@block_costing(ConvBlock, params)
def work(spec: ConvBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    """Implicit GEMM: M = images x output pixels, K = C_in/groups x kernel^2, N = C_out."""
    dt = shard.dtype
    b = DTYPE_BYTES[dt]
    images = batch.tokens  # one "token" is one image for conv models
    out = output_size(spec)
    m = images * out * out
    k = (spec.in_channels // spec.groups) * spec.kernel**2
    flops = 2.0 * m * k * spec.out_channels
    in_bytes = images * spec.input_size**2 * spec.in_channels * b
    out_bytes = m * spec.out_channels * b
    weight_bytes = params(spec, hidden).dense * b
    result = BlockWork()
    result.forward.append(Op("conv", "conv", flops, in_bytes + out_bytes + weight_bytes, dt, saved_bytes=in_bytes))
    # Batch norm + activation: read and write the output map.
    result.forward.append(elementwise("conv.bn_act", m * spec.out_channels, 1, 1, dt, flops_per_element=6,
                                      saved_elements=m * spec.out_channels))
    return result
