"""Token embedding lookup, with sparse (touched-rows-only) gradient synchronisation as an option."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import Batch, BlockWork, Params, Shard, tp_exit
from simcc.model.ops import DTYPE_BYTES, Comm, elementwise
from simcc.specs.blocks import EmbeddingBlock


def params(spec: EmbeddingBlock, hidden: int) -> Params:
    table = spec.vocab * hidden
    return Params(dense=table, sparse_grad=table if spec.sparse_gradients else 0.0, tensors=1)


@lru_cache(maxsize=1024)
def distinct_rows(vocab: int, draws: float, zipf: float) -> float:
    """Expected distinct tokens among `draws` drawn by Zipf(zipf) frequency from a vocabulary:
    sum over tokens of 1 - (1 - p)^draws (Zipf's law for word frequencies, exponent ~1)."""
    ranks = np.arange(1, vocab + 1, dtype=float)
    p = ranks ** -zipf
    p /= p.sum()
    return float(np.sum(-np.expm1(draws * np.log1p(-p))))


@block_costing(EmbeddingBlock, params, attached=True, reads_data_parallel=True)
def work(spec: EmbeddingBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    result = BlockWork()
    T = batch.tokens
    result.forward.append(elementwise("embed.lookup", T * hidden, 1, 1, shard.dtype, family="embedding"))
    if shard.tp > 1:  # vocabulary-parallel lookup: partial rows are all-reduced
        result.forward += tp_exit("embed.tp_reduce", T, hidden, shard)
    if spec.sparse_gradients:
        # The gradient is the touched rows only (ids + values; TF IndexedSlices), not a table-sized
        # buffer; with data parallelism every replica's rows are gathered by all.
        rows = distinct_rows(spec.vocab, T * shard.microbatches, spec.token_zipf)
        row_bytes = hidden / shard.tp * DTYPE_BYTES[shard.grad_dtype] + 8  # int64 row id
        result.transient_bytes = shard.dp * rows * row_bytes
        if shard.dp > 1:
            result.per_step_grads.append(Comm("embed.sparse_grad_all_gather", "all_gather", result.transient_bytes, "dp"))
    return result
