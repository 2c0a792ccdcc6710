"""Output layer: final norm, vocabulary-parallel logits, softmax cross-entropy."""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import NORM_PARAMS, NORM_TENSORS, Batch, BlockWork, Params, Shard, norm, tp_entry
from simcc.model.ops import elementwise, gemm
from simcc.specs.blocks import LMHeadBlock


def params(spec: LMHeadBlock, hidden: int) -> Params:
    return Params(dense=0 if spec.tied else spec.vocab * hidden, replicated=NORM_PARAMS * hidden,
                  tensors=(0 if spec.tied else 1) + NORM_TENSORS)


@block_costing(LMHeadBlock, params, attached=True)
def work(spec: LMHeadBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    T, dt = batch.tokens, shard.dtype
    result = BlockWork()
    result.forward.append(norm("head.norm", T, hidden, shard))
    result.forward += tp_entry("head.tp_gather", T, hidden, shard)
    result.forward.append(gemm("head.logits", T, hidden, spec.vocab / shard.tp, dt, operands=shard.dense_gemm))
    # Softmax cross-entropy in fp32 over the local vocabulary shard.
    result.forward.append(elementwise("head.loss", T * spec.vocab / shard.tp, 1, 1, "fp32", flops_per_element=5,
                                      saved_elements=0))
    return result
