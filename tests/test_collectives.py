"""Collective time models against hand-derived formulas, and monotonicity."""

from __future__ import annotations

import dataclasses

import pytest

from simcc.costs.collectives import bus_bandwidth, collective_time
from simcc.layout import CommGroup
from simcc.specs.loader import load_hardware

GB = 1e9


@pytest.fixture
def dgx4():
    return load_hardware("dgx_h100_x4")


def test_ring_all_reduce_in_one_node(dgx4):
    n, size = 8, 1 * GB
    bw, alpha = 450e9 * 0.8, 2e-6
    expected = 2 * (n - 1) * alpha + 2 * (n - 1) / n * size / bw
    assert collective_time("all_reduce", size, CommGroup(8, 8), dgx4) == pytest.approx(expected)


def test_all_gather_is_half_an_all_reduce_in_bandwidth_terms(dgx4):
    size = 4 * GB
    ar = collective_time("all_reduce", size, CommGroup(8, 8), dgx4)
    ag = collective_time("all_gather", size, CommGroup(8, 8), dgx4)
    assert ag == pytest.approx(ar / 2)


def test_all_to_all_across_nodes_is_bound_by_the_nic_share(dgx4):
    n, local, size = 32, 8, 1 * GB
    nic = 400 / 8 * 1e9 * 0.8  # one 400 Gbit/s NIC per GPU, protocol efficiency
    inter = (n - local) / n * size / nic
    intra = (local - 1) / n * size / (450e9 * 0.8)
    # 24 remote peers in 3 rounds of 8 concurrent exchanges; 7 local peers in one round
    expected = max(3 * 5e-6 + inter, 1 * 2e-6 + intra)
    assert collective_time("all_to_all", size, CommGroup(32, 8), dgx4) == pytest.approx(expected)
    # busbw = algbw * (n-1)/n (nccl-tests): ~50 GB/s for DGX H100 (published measurement: 48)
    busbw = bus_bandwidth("all_to_all", size, expected, n) / 1e9
    assert 40 < busbw < 60


def test_hierarchical_all_reduce_takes_the_slower_stage(dgx4):
    size = 1 * GB
    intra = 2 * 7 * 2e-6 + 2 * 7 / 8 * size / (450e9 * 0.8)
    inter = 2 * 3 * 5e-6 + 2 * 3 / 4 * (size / 8) / (50e9 * 0.8)
    assert collective_time("all_reduce", size, CommGroup(32, 8), dgx4) == pytest.approx(max(intra, inter))


def test_point_to_point_and_trivial_groups(dgx4):
    assert collective_time("p2p", 1e6, CommGroup(2, 2), dgx4) == pytest.approx(2e-6 + 1e6 / (450e9 * 0.8))
    assert collective_time("p2p", 1e6, CommGroup(2, 1), dgx4) == pytest.approx(5e-6 + 1e6 / (50e9 * 0.8))
    assert collective_time("all_reduce", 1e9, CommGroup(1, 1), dgx4) == 0.0


@pytest.mark.parametrize("collective", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"])
@pytest.mark.parametrize("group", [CommGroup(8, 8), CommGroup(32, 8), CommGroup(2, 1)])
def test_more_bandwidth_is_never_slower(dgx4, collective, group):
    times = []
    for scale in (0.5, 1.0, 2.0, 4.0):
        link = dgx4.intra_link
        faster = dataclasses.replace(
            dgx4,
            intra_link=link.model_copy(update={"bandwidth_gb_s": link.bandwidth_gb_s * scale}),
            network=dgx4.network.model_copy(update={"nic_gbit_s": dgx4.network.nic_gbit_s * scale}),
        )
        times.append(collective_time(collective, 256e6, group, faster))
    assert all(b <= a for a, b in zip(times, times[1:]))
    assert times[-1] < times[0]


def test_bus_bandwidth_conventions():
    assert bus_bandwidth("all_reduce", 8e9, 1.0, 8) == pytest.approx(8e9 * 2 * 7 / 8)
    assert bus_bandwidth("all_gather", 8e9, 1.0, 8) == pytest.approx(8e9 * 7 / 8)
    assert bus_bandwidth("p2p", 8e9, 1.0, 2) == pytest.approx(8e9)


def test_tree_all_reduce_formula_and_auto_choice(dgx4):
    big = load_hardware("dgx_h100_x128")
    size = 64e3
    per_rank = size / 8
    tree_inter = 2 * (7 * 5e-6 + per_rank / (50e9 * 0.8))  # ceil(log2 128) = 7 latency steps per phase
    ring_inter = 2 * 127 * 5e-6 + 2 * 127 / 128 * per_rank / (50e9 * 0.8)
    intra = 2 * 7 * 2e-6 + 2 * 7 / 8 * size / (450e9 * 0.8)
    group = CommGroup(1024, 8)
    assert collective_time("all_reduce", size, group, big, "tree") == pytest.approx(max(intra, tree_inter))
    assert collective_time("all_reduce", size, group, big, "ring") == pytest.approx(max(intra, ring_inter))
    # small message over many nodes: the tree's log latency wins, and auto takes it
    assert collective_time("all_reduce", size, group, big) == pytest.approx(max(intra, tree_inter))
    # inside one node NCCL's tree is a chain: 7 hops a phase for 8 ranks, so the ring is never slower
    small, node = 32e3, CommGroup(8, 8)
    chain = 2 * (7 * 2e-6 + small / (450e9 * 0.8))
    assert collective_time("all_reduce", small, node, dgx4, "tree") == pytest.approx(chain)
    assert collective_time("all_reduce", small, node, dgx4) == pytest.approx(
        collective_time("all_reduce", small, node, dgx4, "ring"))
    # a large message in one node: the ring's bandwidth term wins
    assert collective_time("all_reduce", 1e9, CommGroup(8, 8), dgx4) == pytest.approx(
        collective_time("all_reduce", 1e9, CommGroup(8, 8), dgx4, "ring"))


def test_hierarchical_all_to_all_formula(dgx4):
    size, n, local = 64e6, 32, 8
    regroup = 1 * 2e-6 + 7 / 8 * size / (450e9 * 0.71)  # an intra-node all-to-all, at the link's all-to-all fraction
    across = 1 * 5e-6 + 3 / 4 * size / (50e9 * 0.8)  # 3 peer nodes: one round
    assert collective_time("all_to_all", size, CommGroup(n, local), dgx4, "hierarchical") == pytest.approx(regroup + across)


def test_all_to_all_in_a_node_runs_at_the_links_all_to_all_fraction(dgx4):
    size = 2.0**30
    seconds = collective_time("all_to_all", size, CommGroup(8, 8), dgx4)
    assert seconds == pytest.approx(1 * 2e-6 + 7 / 8 * size / (450e9 * 0.71))
    assert bus_bandwidth("all_to_all", size, seconds, 8) / 1e9 == pytest.approx(450 * 0.71, rel=0.01)
    # the ring reductions keep the link's own fraction
    ring = collective_time("all_reduce", size, CommGroup(8, 8), dgx4)
    assert bus_bandwidth("all_reduce", size, ring, 8) / 1e9 == pytest.approx(450 * 0.8, rel=0.01)
    # a link without the field uses its efficiency for every collective
    plain = dataclasses.replace(dgx4, intra_link=dgx4.intra_link.model_copy(update={"all_to_all_efficiency": None}))
    assert collective_time("all_to_all", size, CommGroup(8, 8), plain) == pytest.approx(1 * 2e-6 + 7 / 8 * size / (450e9 * 0.8))


def test_hierarchical_all_to_all_wins_on_small_messages_over_many_nodes():
    big = load_hardware("dgx_h100_x128")
    group = CommGroup(1024, 8)
    small = 1e6
    assert collective_time("all_to_all", small, group, big, "hierarchical") < collective_time("all_to_all", small, group, big, "flat")
    # with one node there is nothing to regroup: both are the same intra-node exchange
    one = load_hardware("dgx_h100_x1")
    assert collective_time("all_to_all", small, CommGroup(8, 8), one, "hierarchical") == pytest.approx(
        collective_time("all_to_all", small, CommGroup(8, 8), one, "flat"))


def test_all_to_all_latency_is_paid_per_round_of_concurrent_peers():
    """NCCL posts an all-to-all's sends together, 8 peers per batch: at EP 256 over 32 nodes a
    one-byte exchange waits ceil(248 / 8) = 31 network latencies, not 255."""
    from simcc.costs.collectives import peer_rounds

    assert [peer_rounds(p) for p in (0, 1, 7, 8, 9, 255)] == [0, 1, 1, 1, 2, 32]
    big = load_hardware("dgx_h100_x128")
    latency = big.network.latency_us * 1e-6
    tiny = collective_time("all_to_all", 1.0, CommGroup(256, 8), big, "flat")
    assert tiny == pytest.approx(31 * latency, rel=1e-3)
    # doubling the peers across nodes doubles the latency rounds
    assert collective_time("all_to_all", 1.0, CommGroup(512, 8), big, "flat") == pytest.approx(63 * latency, rel=1e-3)
