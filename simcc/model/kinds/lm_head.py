"""Output layer: final norm, vocabulary-parallel logits, softmax cross-entropy."""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import NORM_PARAMS, NORM_TENSORS, Batch, BlockWork, Params, Shard, output_head
from simcc.specs.blocks import LMHeadBlock


def params(spec: LMHeadBlock, hidden: int) -> Params:
    return Params(dense=0 if spec.tied else spec.vocab * hidden, replicated=NORM_PARAMS * hidden,
                  tensors=(0 if spec.tied else 1) + NORM_TENSORS)


@block_costing(LMHeadBlock, params, attached=True)
def work(spec: LMHeadBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    return BlockWork(forward=output_head("head", batch.logit_tokens, hidden, spec.vocab, shard))
