"""Multi-token prediction (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv 2412.19437,
sec. 2.2, eqs. 21-23, Fig. 3), as Megatron-Core builds it (megatron/core/transformer/
multi_token_prediction.py, MultiTokenPredictionLayer).

Module k of D: the tokens k places ahead are looked up in the shared embedding (Megatron rolls
the input ids and calls the model's embedding); the previous depth's hidden states (the main
model's at k = 1) and those embeddings are each RMSNormed (hnorm, enorm), concatenated and
projected 2d -> d by M_k (eh_proj: a column-parallel linear whose output is gathered over TP, and
scattered back to the sequence shard under sequence parallelism); one transformer layer runs on the
result, through its kinds' own costing (so MLA, MoE routing, TP and FP8 behave as in the model's
layers); then the module's final norm and the shared output head give logits and the
cross-entropy of the token k + 1 ahead. The embedding and head are shared (eqs. 21 and 23): no
parameters here, but their compute and activations are counted.

Megatron places the MTP layers on the last pipeline stage unless a custom layout says otherwise
(multi_token_prediction.py, `mtp_on_this_rank`); here the block is a pipeline unit of its own, so
placed just before the lm_head it lands in the last chunk, with the head. Megatron's model FLOPs
count the MTP layers (megatron/training/training.py, `num_floating_point_operations`: the
transformer layers, eh_proj and one more logits GEMM per MTP layer), as the model FLOPs here do.
"""

from __future__ import annotations

from simcc.model.kinds._registry import block_costing, costing_of
from simcc.model.kinds._shared import (
    NORM_PARAMS,
    NORM_TENSORS,
    Batch,
    BlockWork,
    Params,
    Shard,
    column_gemm,
    drawn_per_layer,
    embedding_lookup,
    layer_seeded,
    norm,
    output_head,
    tp_entry,
)
from simcc.model.ops import DTYPE_BYTES, Comm, elementwise
from simcc.specs.blocks import MTPBlock

# A module's own norms: enorm (embeddings), hnorm (previous hidden states), and its final norm
# before the shared head.
MODULE_NORMS = 3


def params(spec: MTPBlock, hidden: int) -> Params:
    """Per module: the 2d x d projection M_k (TP-sharded, column-parallel), three norms, and the
    inner layer's own parameters; the embedding and output head are the model's."""
    own = Params(dense=2 * hidden * hidden, replicated=MODULE_NORMS * NORM_PARAMS * hidden,
                 dense_rows_cols=2 * hidden + hidden, tensors=1 + MODULE_NORMS * NORM_TENSORS)
    module = own
    for inner in spec.layer_specs:
        module = module.add(costing_of(inner).params(inner, hidden))
    return module.scaled(spec.depth)


# Whether the inner layer draws expert loads depends on its kinds; seeding a block that draws
# nothing changes nothing, so the module always takes its own seed.
@block_costing(MTPBlock, params, per_layer_seed=True)
def work(spec: MTPBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    T, dt = batch.tokens, shard.dtype
    share = T / shard.tp if shard.sequence_parallel else T  # the rows a norm sees on one TP rank
    inner_specs = spec.layer_specs
    result = BlockWork()
    fwd = result.forward
    for depth in range(spec.depth):
        fwd += embedding_lookup("mtp.embed", T, hidden, shard)  # the tokens shifted depth + 1 places
        fwd.append(norm("mtp.enorm", T, hidden, shard))
        fwd.append(norm("mtp.hnorm", T, hidden, shard))
        fwd.append(elementwise("mtp.concat", share * 2 * hidden, 1, 1, dt))  # torch.cat of [enorm; hnorm]
        fwd += tp_entry("mtp.tp_gather", T, 2 * hidden, shard)
        fwd.append(column_gemm("mtp.proj", T, 2 * hidden, hidden / shard.tp, shard))
        if shard.tp > 1:  # eh_proj's output is split over TP by columns: gathered before the layer
            fwd.append(Comm("mtp.proj_gather", "all_gather", T * hidden * DTYPE_BYTES[shard.comm_dtype], "tp"))
        for position, inner in enumerate(inner_specs):
            inner_shard = shard
            if costing_of(inner).per_layer_seed and drawn_per_layer(shard):  # each inner layer its own draw
                inner_shard = layer_seeded(shard, depth * len(inner_specs) + position)
            inner_work = costing_of(inner).work(inner, hidden, batch, inner_shard)
            fwd += inner_work.forward
            result.selective_recompute += inner_work.selective_recompute
            result.per_step += inner_work.per_step
            result.per_step_grads += inner_work.per_step_grads
            result.transient_bytes = max(result.transient_bytes, inner_work.transient_bytes)
            # A block reports one MoE layer's statistics: the first module's. Its imbalance waits
            # cover the whole block, every module's experts included.
            result.moe = result.moe or inner_work.moe
        fwd += output_head("mtp.head", T, hidden, spec.vocab, shard)
    return result
