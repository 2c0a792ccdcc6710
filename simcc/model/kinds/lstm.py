"""LSTM layers, cuDNN-style: one input GEMM over all time steps, then per-step recurrent GEMMs."""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard
from simcc.model.ops import DTYPE_BYTES, Op, elementwise, gemm
from simcc.specs.blocks import LSTMBlock


def params(spec: LSTMBlock, hidden: int) -> Params:
    inputs, recurrent = spec.input_size or hidden, spec.projection or spec.hidden
    # gates: 4h x (inputs + recurrent); LSTMP adds the h x r projection (Sak et al. 2014)
    weights = 4 * spec.hidden * (inputs + recurrent) + (spec.hidden * recurrent if spec.projection else 0)
    rows_cols = (inputs + recurrent) + 4 * spec.hidden + ((spec.hidden + recurrent) if spec.projection else 0)
    # input and recurrent weights, the projection, one bias vector
    return Params(dense=weights, replicated=4 * spec.hidden, dense_rows_cols=rows_cols,
                  tensors=3 + (1 if spec.projection else 0))


@block_costing(LSTMBlock, params)
def work(spec: LSTMBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    """cuDNN-style LSTM: one GEMM over all time steps for the input projection, then small per-step
    GEMMs (batch rows only) that cannot be batched across time: the recurrent product and, for an
    LSTMP, the output projection that the next step consumes."""
    inputs, width = spec.input_size or hidden, spec.projection or spec.hidden
    dt, T, t = shard.dtype, batch.tokens, shard.tp
    gates = 4 * spec.hidden / t
    b = DTYPE_BYTES[dt]
    steps = batch.q_len
    result = BlockWork()
    result.forward.append(gemm("lstm.input", T, inputs, gates, dt, operands=shard.dense_gemm))

    def per_step(name: str, k: float, n: float, saved_width: float) -> Op:
        step = gemm(name, batch.sequences, k, n, dt, operands=shard.dense_gemm)
        return Op(name, "lstm", step.flops * steps, step.bytes * steps, dt, saved_bytes=T * saved_width * b,
                  kernel_flops=step.flops, launches=steps, kernels=step.kernels)

    result.forward.append(per_step("lstm.recurrent", width, gates, width))
    result.forward.append(elementwise("lstm.cell", T * gates, 2, 1, dt, flops_per_element=10, saved_elements=T * gates))
    if spec.projection:
        result.forward.append(per_step("lstm.projection", spec.hidden / t, spec.projection, spec.hidden / t))
    return result
