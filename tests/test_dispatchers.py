"""Token dispatchers: bytes each one moves, node de-duplication, FP8 dispatch, and their time on a
two-level topology, against hand-derived values."""

from __future__ import annotations

import math

import pytest

from simcc.costs.collectives import collective_time
from simcc.layout import CommGroup
from simcc.model.blocks import Batch, Shard
from simcc.model.kinds import moe_ffn
from simcc.routing.load import distinct_ranks, distinct_remote_nodes, token_spread
from simcc.specs.blocks import MoEFFNBlock
from simcc.specs.loader import load_hardware

T, HIDDEN = 4096, 1024


def _items(ep: int, ep_nodes: int = 1, experts: int = 64, k: int = 8, **routing) -> dict:
    spec = MoEFFNBlock(experts=experts, k=k, expert_hidden=512,
                       routing={"dropless": True, "capacity_factor": None, "dropless_block": 1, **routing})
    work = moe_ffn.work(spec, HIDDEN, Batch(1, T, T), Shard(ep=ep, ep_nodes=ep_nodes, executed=False))
    return {item.name: item for item in work.forward}


def test_distinct_remote_nodes_by_hand():
    # 8 experts on 2 nodes, top-2: P(a node holds neither) = C(4,2)/C(8,2) = 6/28
    used = 2 * (1 - 6 / 28)
    assert distinct_remote_nodes(8, 2, 2) == pytest.approx(used / 2)
    assert distinct_remote_nodes(8, 2, 1) == 0.0
    # node-limited to one node: always one node, remote with probability 7/8 on 8 nodes
    assert distinct_remote_nodes(256, 8, 8, max_nodes=1) == pytest.approx(7 / 8)
    # DeepSeek-V3's shape: 256 experts on 8 nodes, top-8, at most 4 nodes: fewer than 4 sends
    limited, free = distinct_remote_nodes(256, 8, 8, 4), distinct_remote_nodes(256, 8, 8)
    assert limited < 4 * 7 / 8 < free < 8 * 7 / 8


def test_device_limited_routing_by_hand():
    """DeepSeek-V2's device-limited routing (max_ranks_per_token): Megatron's MoE-layer benchmark
    proxy, 32 experts on EP8 (4 a rank) in 8 groups of one rank each, top-4 groups then top-8:
    the 8 lie in a pool of 16 experts on 4 ranks, and a rank of them holds none with probability
    C(12,8)/C(16,8). Across 2 nodes of 8 ranks (256 experts, 16 a rank), a node is missed when j of
    the 4 chosen ranks are its own (C(8,j) C(8,4-j) / C(16,4)) and the 8 experts, drawn from the 64
    of the chosen ranks, avoid those j ranks' 16 j (C(64-16j, 8) / C(64, 8))."""
    from math import comb

    assert distinct_ranks(32, 8, 8, max_ranks=4) == pytest.approx(4 * (1 - 495 / 12870))
    assert distinct_ranks(32, 8, 8, max_ranks=8) == pytest.approx(distinct_ranks(32, 8, 8))  # no limit
    missed = sum(comb(8, j) * comb(8, 4 - j) / comb(16, 4) * comb(64 - 16 * j, 8) / comb(64, 8) for j in range(5))
    assert distinct_remote_nodes(256, 8, 2, ranks=16, max_ranks=4) == pytest.approx(2 * (1 - missed) / 2)
    # a limit never spreads a token wider than no limit, and reaches it when it covers every rank
    limited = [distinct_remote_nodes(128, 8, 2, ranks=16, max_ranks=m) for m in range(1, 17)]
    assert limited == sorted(limited) and limited[0] == pytest.approx(0.5)
    assert limited[-1] == pytest.approx(distinct_remote_nodes(128, 8, 2))
    # the dedup dispatch of the limited router moves fewer copies than a free top-8
    limited = _items(8, experts=32, dispatcher="deduplicated", max_ranks_per_token=4)["moe.dispatch"]
    free = _items(8, experts=32, dispatcher="deduplicated")["moe.dispatch"]
    assert limited.bytes / free.bytes == pytest.approx(distinct_ranks(32, 8, 8, max_ranks=4) / distinct_ranks(32, 8, 8))
    with pytest.raises(ValueError, match="not both"):
        MoEFFNBlock(experts=32, k=8, expert_hidden=512, routing={"max_nodes_per_token": 2, "max_ranks_per_token": 4})


def _round_robin(experts: int, k: int) -> MoEFFNBlock:
    return MoEFFNBlock(experts=experts, k=k, expert_hidden=512, gating={"policy": "round_robin"},
                       routing={"dropless": True, "capacity_factor": None, "dropless_block": 1})


def test_a_round_robin_gate_sends_each_token_to_its_neighbouring_experts_ranks():
    # 16 experts on 4 ranks (4 each) on 2 nodes, k = 6: token i takes experts 6i .. 6i+5 (mod 16),
    # 8 distinct windows (starts 0, 6, 12, 2, 8, 14, 4, 10). Each spans 2 ranks; they span
    # 1, 2, 2, 1, 1, 2, 2, 1 nodes: 1.5 on average, the token's own node being either alike.
    spread = token_spread(_round_robin(16, 6), 4, 2)
    assert spread.ranks == pytest.approx(2.0)
    assert spread.remote_nodes == pytest.approx(1.5 / 2)
    # AutoModel's DeepSeek-V3 benchmark: 256 experts over EP64 on 8 nodes, k = 8: every window is
    # 8-aligned, so it fills two whole ranks of one node, where a learned top-8 reaches ~7.7 ranks.
    deepseek = token_spread(_round_robin(256, 8), 64, 8)
    assert (deepseek.ranks, deepseek.remote_nodes) == (2.0, pytest.approx(7 / 8))
    learned = token_spread(MoEFFNBlock(experts=256, k=8, expert_hidden=512,
                                       routing={"dropless": True, "capacity_factor": None}), 64, 8)
    assert learned.ranks == pytest.approx(distinct_ranks(256, 8, 64, 8))
    assert learned.remote_nodes == pytest.approx(distinct_remote_nodes(256, 8, 8))


def test_a_round_robin_gate_has_no_weights_and_balances_exactly():
    spec = _round_robin(128, 8)
    work = moe_ffn.work(spec, HIDDEN, Batch(1, T, T), Shard(ep=8, executed=True))
    names = {item.name for item in work.forward}
    assert not {"moe.router", "moe.topk"} & names  # no gate product, no top-k
    learned = MoEFFNBlock(experts=128, k=8, expert_hidden=512, routing={"dropless": True, "capacity_factor": None})
    assert moe_ffn.params(learned, HIDDEN).replicated - moe_ffn.params(spec, HIDDEN).replicated == HIDDEN * 128  # the gate
    loads = work.moe.loads
    assert set(loads.busiest_rank) == {T * 8 * 8 / 128}  # every local expert exactly T k ep / E, drawn or not
    with pytest.raises(ValueError, match="load.distribution must be uniform"):
        MoEFFNBlock(experts=8, k=2, expert_hidden=64, gating={"policy": "round_robin"}, load={"distribution": "zipf"},
                    routing={"dropless": True, "capacity_factor": None})


def test_alltoall_sends_k_copies_and_allgather_sends_every_token():
    a2a = _items(8, dispatcher="alltoall")
    assert a2a["moe.dispatch"].bytes == pytest.approx(T * 8 * HIDDEN * 2)  # T tokens x k copies x bf16
    gather = _items(8, dispatcher="allgather")
    assert gather["moe.dispatch"].collective == "all_gather"
    assert gather["moe.dispatch"].bytes == pytest.approx(T * 8 * HIDDEN * 2)  # all 8 ranks' T tokens, once each
    assert gather["moe.combine"].collective == "reduce_scatter"


def test_a_dropless_alltoall_sorts_received_chunks_when_a_rank_has_several_experts():
    # 64 experts on 8 ranks, top-8, balanced (reporting convention): the 8 ranks route 8 x T x 8
    # copies, so each receives T x 8 for its 8 experts; the sort reads and writes them once
    several = _items(8)
    received = T * 8
    for name in ("moe.sort_chunks", "moe.unsort_chunks"):
        assert several[name].family == "permute"
        assert several[name].bytes == pytest.approx(received * HIDDEN * 2 * 2)  # read + write, bf16
    assert "moe.sort_chunks" not in _items(8, experts=8, k=2)  # one expert per rank: already in order
    assert "moe.sort_chunks" not in _items(64, ep_nodes=8, experts=256, dispatcher="deduplicated")
    names = list(several)
    assert names.index("moe.dispatch") < names.index("moe.sort_chunks") < names.index("moe.expert_up")
    assert names.index("moe.expert_down") < names.index("moe.unsort_chunks") < names.index("moe.combine")


def test_deduplicated_dispatch_sends_one_copy_per_remote_node():
    dedup = _items(64, ep_nodes=8, experts=256, dispatcher="deduplicated", max_nodes_per_token=4)
    assert dedup["moe.dispatch"].algorithm == "deduplicated"
    # Node-limited to 4 of 8 nodes: the 8 experts lie among 4 x 32 = 128, 4 per GPU, so a token
    # reaches 4 x 8 x (1 - C(124,8)/C(128,8)) GPUs; the bytes are one copy per GPU reached, and
    # the share leaving the node is that of the distinct remote nodes among them.
    gpus = 32 * (1 - math.prod((124 - i) / (128 - i) for i in range(8)))
    assert distinct_ranks(256, 8, 64, 8, 4) == pytest.approx(gpus)
    assert dedup["moe.dispatch"].remote_share == pytest.approx(distinct_remote_nodes(256, 8, 8, 4) / gpus)
    per_pair = _items(64, ep_nodes=8, experts=256)["moe.dispatch"].bytes
    assert dedup["moe.dispatch"].bytes == pytest.approx(per_pair * gpus / 8)


def test_distinct_ranks_by_hand():
    # 8 experts on 4 ranks (2 each), top-2: P(a rank holds neither) = C(6,2)/C(8,2) = 15/28.
    assert distinct_ranks(8, 2, 4) == pytest.approx(4 * (1 - 15 / 28))
    assert distinct_ranks(8, 1, 4) == pytest.approx(1.0)  # top-1 reaches one rank
    assert distinct_ranks(8, 2, 8) == pytest.approx(2.0)  # one expert per rank: k ranks
    assert distinct_ranks(8, 2, 1) == 1.0


def test_fp8_dispatch_halves_one_direction_and_pays_its_quantization():
    bf16, fp8 = _items(8), _items(8, dispatch_dtype="fp8")
    assert fp8["moe.dispatch"].bytes == pytest.approx(bf16["moe.dispatch"].bytes / 2)
    assert fp8["moe.combine"].bytes == pytest.approx(bf16["moe.combine"].bytes)
    assert "moe.dispatch_quantize" in fp8 and "moe.dispatch_quantize" not in bf16
    assert fp8["moe.dispatch_quantize"].bytes == pytest.approx(T * HIDDEN * (2 + 1))  # read bf16, write fp8


def test_deduplicated_time_is_the_slower_of_network_and_nvlink_stages():
    dgx4 = load_hardware("dgx_h100_x4")
    size, share = 64e6, 0.4
    nic = 400 / 8 * 1e9 * 0.8
    across = 1 * 5e-6 + share * size / nic  # 3 peer nodes: one round
    forward = 1 * 2e-6 + 7 / 8 * size / (450e9 * 0.71)
    seconds = collective_time("all_to_all", size, CommGroup(32, 8), dgx4, "deduplicated", share)
    assert seconds == pytest.approx(max(across, forward))
    flat = collective_time("all_to_all", size, CommGroup(32, 8), dgx4, "flat")
    assert seconds < flat  # 0.4 of the bytes on the NIC instead of 24/32


def test_low_latency_pays_one_network_latency_for_any_number_of_peers():
    big = load_hardware("dgx_h100_x128")
    latency = big.network.latency_us * 1e-6
    for n in (16, 256):
        assert collective_time("all_to_all", 1.0, CommGroup(n, 8), big, "low_latency") == pytest.approx(latency, rel=1e-3)


def test_low_latency_writes_peers_in_the_node_over_nvlink_and_the_rest_through_the_nic():
    # DeepEP PR #173: low-latency kernels write same-node peers over NVLink. EP16 over 2 nodes of
    # 8: 8/16 of the copies cross the NIC, 7/16 stay in the node, the two side by side.
    dgx = load_hardware("dgx_h100_x128")
    size = 7.3e6
    nic = dgx.inter_node_gb_s_per_device() * 1e9
    nvlink = dgx.intra_link.bandwidth_gb_s * 1e9 * (dgx.intra_link.all_to_all_efficiency or dgx.intra_link.efficiency)
    across = dgx.network.latency_us * 1e-6 + 8 / 16 * size / nic
    inside = dgx.intra_link.latency_us * 1e-6 + 7 / 16 * size / nvlink
    ep16 = collective_time("all_to_all", size, CommGroup(16, 8), dgx, "low_latency")
    assert ep16 == pytest.approx(max(across, inside), rel=1e-9)
    # More nodes: the NIC share grows towards all of it (248/256 at EP256), so time grows with it.
    ep256 = collective_time("all_to_all", size, CommGroup(256, 8), dgx, "low_latency")
    assert ep256 == pytest.approx(dgx.network.latency_us * 1e-6 + 248 / 256 * size / nic, rel=1e-9)
    assert ep16 < ep256


def test_layer_rows_report_what_a_deduplicating_dispatcher_moves_on_each_link():
    from simcc.estimate import estimate
    from simcc.specs.loader import load_workload

    spec, source = load_workload("qwen3_30b_a3b_train_16xh100", ["train.global_batch=32"])
    row = estimate(spec, load_hardware("dgx_h100_x4", ["nodes=2"]), source).moe_layers[0]
    moved = 4 * 4096 * 8 * 2048 * 2 / 1e6 * 2  # tokens x k x hidden x bf16, dispatch + combine, fwd + bwd, 2 micro-batches
    share = distinct_remote_nodes(128, 8, 2) / 8  # 8 GPUs a node, 2 nodes
    assert row.a2a_inter_mb == pytest.approx(moved * share, rel=1e-6)
    # NVLink carries one copy per GPU reached (8 experts a GPU), 7/8 of them to another GPU.
    gpus = 16 * (1 - math.prod((120 - i) / (128 - i) for i in range(8)))
    assert row.a2a_intra_mb == pytest.approx(moved * gpus / 8 * 7 / 8, rel=1e-6)


def test_a_deduplicating_dispatcher_holds_deepeps_default_sms_while_it_overlaps():
    """Unless the workload says, an overlapped DeepEP-style dispatcher takes Megatron's default 20
    SMs (of an H100's 132); an NCCL all-to-all's count is not modelled; a workload's own count wins."""
    from simcc.layout import build_layout
    from simcc.plan.training import build_training_plan
    from simcc.specs.loader import load_hardware, load_workload

    def share(sets):
        workload, src = load_workload("qwen3_30b_a3b_train_16xh100", ["parallelism.overlap_moe_comm=true", *sets])
        system = load_hardware("dgx_h100_x4", ["nodes=2"])
        return build_training_plan(workload, system, build_layout(workload, system, src)).comm_sm_share

    assert share([]) == pytest.approx(20 / 132)
    assert share(["parallelism.moe_comm_sms=32"]) == pytest.approx(32 / 132)
    assert share(["model.blocks.1.blocks.1.moe_ffn.routing.dispatcher=alltoall"]) == 0.0


def test_shared_expert_overlap_hides_the_dispatch_up_to_the_shared_experts_time():
    from simcc.model.ops import Comm, elementwise
    from simcc.plan.training import Cost, alongside_costs

    items = (Comm("moe.dispatch", "all_to_all", 1.0, "ep", alongside=("moe.shared_up", "moe.shared_act")),
             elementwise("moe.shared_up", 1, 1, 1, "bf16"), elementwise("moe.shared_act", 1, 1, 1, "bf16"),
             Comm("moe.combine", "all_to_all", 1.0, "ep", alongside=("moe.shared_down",)),
             elementwise("moe.shared_down", 1, 1, 1, "bf16"))
    costs = [Cost("moe.dispatch", "comm", 5e-4), Cost("moe.shared_up", "compute", 2e-4),
             Cost("moe.shared_act", "compute", 1e-4), Cost("moe.combine", "comm", 1e-4),
             Cost("moe.shared_down", "compute", 3e-4)]
    out = alongside_costs(items, costs)
    assert out[0].seconds == pytest.approx(5e-4 - 3e-4) and out[0].hidden == pytest.approx(3e-4)  # 0.5 ms vs 0.3 ms
    assert out[3].seconds == 0.0 and out[3].hidden == pytest.approx(1e-4)  # fully hidden by the 0.3 ms down-projection
    assert [c.seconds for c in out[1:3]] == [2e-4, 1e-4]  # the compute itself is unchanged


def test_shared_expert_overlap_shortens_the_step_and_keeps_the_link_time():
    from simcc.estimate import SimulationOptions, estimate
    from simcc.specs.loader import load_workload

    system = load_hardware("dgx_h100_x128")
    results = {}
    for overlap in (False, True):
        spec, source = load_workload("deepseek_v3_shape_train",
                                     [f"model.blocks.2.blocks.1.moe_ffn.routing.shared_expert_overlap={overlap}"])
        results[overlap] = estimate(spec, system, source, SimulationOptions())
    assert results[True].step.step_s < results[False].step.step_s
    assert results[True].comm.ep_link_s == pytest.approx(results[False].comm.ep_link_s, rel=1e-9)
    assert results[True].comm.ep_exposed_s < results[False].comm.ep_exposed_s
    with pytest.raises(ValueError, match="shared_experts"):
        MoEFFNBlock(experts=8, k=2, expert_hidden=64, routing={"shared_expert_overlap": True})


def test_moe_layer_rows_hold_the_step_s_expert_parallel_link_time():
    """One pipeline stage and no recomputation: the layers' all-to-all time adds up to the step's
    EP link time, and what a layer hides behind its shared expert shows per layer."""
    from simcc.estimate import SimulationOptions, estimate
    from simcc.specs.loader import load_workload

    system = load_hardware("dgx_h100_x4", ["nodes=2"])
    spec, source = load_workload("qwen3_30b_a3b_train_16xh100")
    result = estimate(spec, system, source, SimulationOptions())
    assert sum(row.a2a_s for row in result.moe_layers) == pytest.approx(result.comm.ep_link_s, rel=1e-9)
    assert all(row.a2a_hidden_s == 0.0 for row in result.moe_layers)
    spec, source = load_workload("qwen3_30b_a3b_train_16xh100", [
        "model.blocks.1.blocks.1.moe_ffn.shared_experts=1",
        "model.blocks.1.blocks.1.moe_ffn.routing.shared_expert_overlap=true"])
    hidden = estimate(spec, system, source, SimulationOptions()).moe_layers
    assert all(0.0 < row.a2a_hidden_s < row.a2a_s for row in hidden)
