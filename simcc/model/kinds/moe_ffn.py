"""Mixture-of-experts FFN: router, permute, dispatch all-to-all, grouped expert GEMMs over the
busiest rank's loads, combine all-to-all, un-permute; optional shared experts."""

from __future__ import annotations

from dataclasses import replace

from simcc.model.kinds._registry import block_costing
from simcc.model.kinds._shared import (
    FFN_WEIGHT_TENSORS,
    NORM_PARAMS,
    NORM_TENSORS,
    Batch,
    BlockWork,
    MoEStats,
    Params,
    Shard,
    act_saved,
    ffn_params,
    gated_width,
    norm,
    residual,
    tp_entry,
    tp_exit,
)
from simcc.model.ops import DTYPE_BYTES, Comm, Op, elementwise, gemm, grouped_gemm
from simcc.routing.gating import router_products
from simcc.routing.load import rank_loads, token_spread
from simcc.specs.blocks import MoEFFNBlock
from simcc.specs.vocab import GATELESS_POLICIES


def params(spec: MoEFFNBlock, hidden: int) -> Params:
    one_expert = ffn_params(hidden, spec.expert_hidden, spec.gated)
    shared = ffn_params(hidden, spec.shared_expert_hidden or spec.expert_hidden, spec.gated).scaled(spec.shared_experts)
    per_expert = one_expert.dense  # expert weights only; biases/norm counted once below
    return Params(
        dense=shared.dense,
        replicated=_router_params(spec, hidden) + NORM_PARAMS * hidden,
        expert=per_expert * spec.experts,
        active_expert=per_expert * spec.k,
        dense_rows_cols=shared.dense_rows_cols,
        expert_rows_cols=one_expert.dense_rows_cols * spec.experts,
        tensors=FFN_WEIGHT_TENSORS * spec.shared_experts + _router_tensors(spec) + NORM_TENSORS,
        expert_tensors=FFN_WEIGHT_TENSORS * spec.experts,
        redundant_expert=per_expert * spec.routing.redundant_experts,
    )


def _router_params(spec: MoEFFNBlock, hidden: int) -> int:
    """Gate weights: d x E (noisy top-k: twice); hierarchical: d x G primary plus one d x E/G gate
    per group; hash and round-robin routing: none."""
    policy = spec.gating.policy
    if policy in GATELESS_POLICIES:
        return 0
    if policy == "hierarchical":
        return (hidden * (spec.gating.groups or 0) + hidden * spec.experts) * (2 if spec.gating.noisy else 1)
    return hidden * spec.experts * (2 if policy == "noisy_topk" else 1)


def _router_tensors(spec: MoEFFNBlock) -> int:
    """The gate matrices of `_router_params`, counted as tensors."""
    policy = spec.gating.policy
    if policy in GATELESS_POLICIES:
        return 0
    if policy == "hierarchical":
        return (1 + (spec.gating.groups or 0)) * (2 if spec.gating.noisy else 1)
    return 2 if policy == "noisy_topk" else 1


def _copies_per_assignment(spec: MoEFFNBlock, ep: int) -> float:
    """Token copies crossing the all-to-all per token-expert assignment. A hierarchical MoE whose
    secondary MoEs each live whole on one device sends a token once to every group it picks; the
    group's own gate and weighted sum run there (Shazeer et al. 2017, sec. 3.1): k_primary copies
    per token, not k."""
    gating, routing = spec.gating, spec.routing
    whole_groups = (gating.policy == "hierarchical" and gating.groups is not None and gating.groups % ep == 0
                    and routing.placement == "contiguous" and not routing.replicate_hot)
    return gating.k_primary / spec.k if whole_groups else 1.0


def _dispatch_and_combine(spec: MoEFFNBlock, shard: Shard, local_elements: float, dispatch: float, combine: float,
                          remote: float | None) -> tuple[Comm, Comm]:
    """The dispatcher's two collectives over the EP group. `local_elements`: the rank's own tokens x
    hidden; `dispatch`/`combine`: bytes of the routed copies it sends each way (all_to_all size);
    `remote`: the share of them leaving the node, when gating or the dispatcher decides it."""
    routing = spec.routing
    if routing.dispatcher == "allgather":
        # Every rank gathers the whole EP group's tokens, keeps its experts' rows, and the outputs
        # are reduce-scattered back: traffic independent of k, a win when k x the remote share > 1.
        gathered = local_elements * shard.ep * DTYPE_BYTES[routing.dispatch_dtype or shard.comm_dtype]
        returned = local_elements * shard.ep * DTYPE_BYTES[shard.comm_dtype]
        pair = (Comm("moe.dispatch", "all_gather", gathered, "ep"), Comm("moe.combine", "reduce_scatter", returned, "ep"))
    else:
        algorithm = routing.all_to_all
        if routing.dispatcher in ("deduplicated", "low_latency"):
            algorithm = routing.dispatcher
        pair = (Comm("moe.dispatch", "all_to_all", dispatch, "ep", algorithm, routing.overlap_degree, remote),
                Comm("moe.combine", "all_to_all", combine, "ep", algorithm, routing.overlap_degree, remote))
    if not routing.shared_expert_overlap:
        return pair
    # Megatron-Core's shared-expert overlap (moe_layer.py, SharedExpertMLP on its own stream): the
    # shared expert's first linear and activation run during the dispatch, its second linear during
    # the combine (their FP8 input casts with them).
    return (replace(pair[0], alongside=("moe.shared_up.cast", "moe.shared_up", "moe.shared_act")),
            replace(pair[1], alongside=("moe.shared_down.cast", "moe.shared_down")))


@block_costing(MoEFFNBlock, params, per_layer_seed=True)
def work(spec: MoEFFNBlock, hidden: int, batch: Batch, shard: Shard) -> BlockWork:
    T, dt = batch.tokens, shard.dtype
    ep, etp = shard.ep, shard.expert_tp
    b = DTYPE_BYTES[dt]
    result = BlockWork()
    fwd = result.forward
    fwd.append(norm("moe.norm", T, hidden, shard))
    # With sequence parallelism each TP rank routes and dispatches only its own sequence shard
    # (Megatron-Core's MoE layer: the router and token dispatcher take the [s/tp, b, h] input; an
    # expert-TP group all-gathers what its ranks received, so its experts see etp shards). Without
    # it, every TP rank holds the whole micro-batch and routes it all.
    sharded = shard.sequence_parallel and shard.tp > 1
    routed_tokens = T / shard.tp if sharded else T
    if not sharded:
        fwd += tp_entry("moe.tp_gather", T, hidden, shard)
    # Gate products per the policy (noisy top-k adds a d x E noise product; hierarchical gates
    # primary d x G then d x E/G per chosen group; hash routing looks the expert up).
    for name, multiplier, width in router_products(spec, ep):
        fwd.append(gemm(name, routed_tokens * multiplier, hidden, width, shard.router_dtype))
    if spec.gating.policy not in GATELESS_POLICIES:
        fwd.append(elementwise("moe.topk", routed_tokens * spec.experts, 1, 1, shard.router_dtype, flops_per_element=6,
                               family="gate"))
    # Permute tokens into expert order: gather k copies of each token, read once and written once.
    fwd.append(elementwise("moe.permute", routed_tokens * spec.k * hidden, 1, 1, dt, family="permute"))

    # An expert-TP group all-gathers what its ranks received, so its experts see etp shards'
    # tokens: the loads, and which experts have a token and so read their weights, are drawn over
    # those (one shard's draw scaled by etp would read too few experts and skew too much).
    gathered = etp if sharded else 1
    loads = rank_loads(spec, routed_tokens * gathered, ep, shard.seed, shard.sample_seed, balanced=not shard.executed,
                       draws=shard.load_draws, expert_params=ffn_params(hidden, spec.expert_hidden, spec.gated).dense)
    # Dropless: each rank sends its routed token copies. Capacity: the zero-padded experts x
    # capacity x hidden dispatch buffer moves whole, in the dispatch and again in the combine
    # (Tutel's GatingEncoder fills such a buffer: microsoft/tutel, tutel/impls/fast_dispatch.py;
    # Hwang et al. 2023, arXiv 2206.03382), so traffic grows with cf.
    if loads.capacity is None:
        sent_per_rank = (loads.routed - loads.dropped) / ep / gathered
    else:
        sent_per_rank = loads.capacity * spec.experts / ep / gathered
    sent_per_rank *= _copies_per_assignment(spec, ep)
    routing = spec.routing
    # A deduplicating dispatcher (DeepEP's normal kernels) writes a token once to each rank whose
    # experts need it, and that rank's expert outputs for it come back summed, once.
    spread = token_spread(spec, ep, shard.ep_nodes) if routing.dispatcher == "deduplicated" and ep > 1 else None
    if spread is not None and loads.capacity is None:
        sent_per_rank *= spread.ranks / spec.k
    dispatch_dtype = routing.dispatch_dtype or shard.comm_dtype
    dispatch = sent_per_rank * hidden * DTYPE_BYTES[dispatch_dtype] if ep > 1 else 0.0
    combine = sent_per_rank * hidden * DTYPE_BYTES[shard.comm_dtype] if ep > 1 else 0.0
    remote = None if routing.keep_in_node is None else 1.0 - routing.keep_in_node
    if spread is not None and shard.ep_nodes > 1:  # leaving the node: a share of the per-rank copies sent
        remote = spread.remote_nodes / spread.ranks
    if ep > 1 and DTYPE_BYTES[dispatch_dtype] < b:  # quantized before sending: read, write narrower + scales
        fwd.append(elementwise("moe.dispatch_quantize", routed_tokens * hidden, 1, DTYPE_BYTES[dispatch_dtype] / b, dt,
                               flops_per_element=4))
    busiest, mean = list(loads.busiest_rank), list(loads.mean_rank)
    # An all-to-all ends when its busiest receiver has its tokens: every rank sends its own copies,
    # but the rank whose experts drew the most receives that many in the dispatch and sends them
    # back in the combine, each over its own link, so a dropless exchange takes the busiest rank's
    # share of the mean's time (UltraEP, Wei et al. 2026, arXiv 2606.04101: device-level imbalance
    # turns into "token all-to-all bottlenecks"). Padded capacity buffers move whole either way.
    dispatch_item, combine_item = _dispatch_and_combine(spec, shard, routed_tokens * hidden, dispatch, combine, remote)
    if loads.capacity is None and dispatch_item.collective == "all_to_all":
        dispatch_item = replace(dispatch_item, busiest_share=loads.busiest_share)
        combine_item = replace(combine_item, busiest_share=loads.busiest_share)
    if ep > 1:
        fwd.append(dispatch_item)
    comm_bytes = DTYPE_BYTES[shard.comm_dtype]
    if sharded and etp > 1:
        fwd.append(Comm("moe.expert_tp_gather", "all_gather", sum(busiest) * hidden * comm_bytes, "etp"))
    # A dropless all-to-all receives ragged chunks ordered by source rank, then by expert; a rank
    # with several experts sorts them into expert order after it and back before the combine
    # (Megatron-Core's MoEAlltoAllTokenDispatcher: sort_chunks_by_idxs when num_local_experts > 1).
    # A capacity buffer needs no sort: its all-to-all splits the expert axis and concatenates the
    # source axis, so each expert's slots arrive together (GShard, Lepikhin et al. 2020, sec. 3.2).
    resorted = ep > 1 and routing.dispatcher == "alltoall" and loads.capacity is None and spec.experts // ep > 1
    if resorted:
        fwd.append(elementwise("moe.sort_chunks", sum(busiest) * hidden, 1, 1, dt, family="permute"))
    up_width = gated_width(spec.expert_hidden, spec.gated) / etp
    # the weights one step reads: its experts with tokens, at their stored size
    active = dict(active=loads.busiest_active, mean_active=loads.mean_active, operands=shard.expert_gemm,
                  step_tokens=routed_tokens * gathered)
    fwd.append(grouped_gemm("moe.expert_up", busiest, mean, hidden, int(up_width), dt, **active))
    reads = 2 if spec.gated else 1
    weighted_in_activation = routing.gate_weights_applied in ("activation", "activation_eager")
    # Weighted in the activation: it keeps each copy's gate weight as well, at the router's dtype.
    gate_weights_saved = sum(busiest) * DTYPE_BYTES[shard.router_dtype] / b if weighted_in_activation else 0.0
    act_elements = sum(busiest) * spec.expert_hidden / etp
    act = elementwise("moe.expert_act", act_elements, reads, 1, dt, flops_per_element=8,
                      saved_elements=act_saved(spec.activation, spec.gated, act_elements) + gate_weights_saved)
    mean_act = sum(mean) * spec.expert_hidden / etp
    fwd.append(Op(act.name, act.family, act.flops, act.bytes, dt, act.saved_bytes,
                  mean_flops=mean_act * 8, mean_bytes=mean_act * (reads + 1) * b))
    if routing.gate_weights_applied == "activation_eager":
        # act(x) * p: reads the activation, writes fp32 (and keeps the activation for p's gradient);
        # the cast back reads fp32 and writes the compute dtype the down projection reads
        wide = DTYPE_BYTES["fp32"] / b
        for name, passes, kept in (("moe.expert_weight", (1, wide), 1), ("moe.expert_weight_cast", (wide, 1), 0)):
            moved = sum(passes) * b
            fwd.append(Op(name, "elementwise", act_elements, act_elements * moved, dt, act_elements * kept * b,
                          mean_flops=mean_act, mean_bytes=mean_act * moved))
    fwd.append(grouped_gemm("moe.expert_down", busiest, mean, int(spec.expert_hidden / etp), hidden, dt, **active))
    if etp > 1:  # partial sums of the row-parallel down projection
        fwd.append(Comm("moe.expert_tp_reduce", "reduce_scatter" if sharded else "all_reduce",
                        sum(busiest) * hidden * comm_bytes, "etp"))
    if resorted:
        fwd.append(elementwise("moe.unsort_chunks", sum(busiest) * hidden, 1, 1, dt, family="permute"))
    if ep > 1:
        fwd.append(combine_item)
    # Un-permute and weight: read k expert outputs per token and its gate weights, write one; the
    # outputs are kept for the weights' gradient unless the activation applied them.
    fwd.append(elementwise("moe.unpermute", routed_tokens * spec.k * hidden, 1, 1.0 / spec.k, dt, family="combine",
                           saved_elements=0.0 if weighted_in_activation else routed_tokens * spec.k * hidden))
    if spec.shared_experts:  # a tensor-parallel MLP over the whole micro-batch (gathered under SP)
        if sharded:
            fwd += tp_entry("moe.shared_tp_gather", T, hidden, shard)
        shared_hidden = (spec.shared_expert_hidden or spec.expert_hidden) * spec.shared_experts
        fwd.append(gemm("moe.shared_up", T, hidden, gated_width(shared_hidden, spec.gated) / shard.tp, dt,
                        operands=shard.dense_gemm))
        fwd.append(elementwise("moe.shared_act", T * shared_hidden / shard.tp, reads, 1, dt, flops_per_element=8,
                               saved_elements=act_saved(spec.activation, spec.gated, T * shared_hidden / shard.tp)))
        fwd.append(gemm("moe.shared_down", T, shared_hidden / shard.tp, hidden, dt, operands=shard.dense_gemm))
    if not sharded or spec.shared_experts:
        fwd += tp_exit("moe.tp_reduce", T, hidden, shard)
    fwd.append(residual("moe.residual", T, hidden, shard))
    if routing.replicate_hot and ep > 1:
        # Shadowing (He et al. 2022, FasterMoE): hot experts' weights go to every rank each step,
        # and their gradients come back to the home rank.
        shadow = routing.replicate_hot * gated_width(spec.expert_hidden, spec.gated) * hidden * 1.5 / etp
        result.per_step.append(Comm("moe.shadow_broadcast", "all_gather", shadow * DTYPE_BYTES[shard.dtype], "ep"))
        result.per_step_grads.append(Comm("moe.shadow_grad_reduce", "reduce_scatter", shadow * DTYPE_BYTES[shard.dtype], "ep"))
    kept_per_token = (loads.routed - loads.dropped) / (routed_tokens * gathered * ep) if T else 0.0
    intra = None
    if routing.dispatcher == "deduplicated" and shard.ep_nodes > 1:
        local = max(1, ep // shard.ep_nodes)
        intra = (local - 1) / local  # every copy reaches its GPU over NVLink, forwarded or not
    result.moe = MoEStats(loads, dispatch, kept_per_token, dispatch_item.remote_share, spec.experts,
                          combine_bytes=combine, intra_share=intra)
    return result
