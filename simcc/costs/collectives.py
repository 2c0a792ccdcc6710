"""Time of a collective over a group of devices: the one place collective time is modelled.

Sizes follow nccl-tests (`size` is the per-rank buffer); bus bandwidth conventions from
nccl-tests' PERFORMANCE.md: all-reduce busbw = algbw * 2(n-1)/n; all-gather, reduce-scatter and
all-to-all busbw = algbw * (n-1)/n; point-to-point busbw = algbw.
"""

from __future__ import annotations

from dataclasses import dataclass

from simcc.specs.hardware import System

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


@dataclass(frozen=True)
class CommGroup:
    """`size` ranks, `per_node` of them in each node (the rest on other nodes)."""

    size: int
    per_node: int

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.per_node))


@dataclass(frozen=True)
class LinkLevel:
    bandwidth: float  # bytes/s one rank can push, after protocol efficiency
    latency: float  # seconds per protocol step


def intra_level(system: System) -> LinkLevel:
    link = system.intra_link
    if link is None:
        return LinkLevel(float("inf"), 0.0)
    return LinkLevel(link.bandwidth_gb_s * 1e9 * link.efficiency, link.latency_us * 1e-6)


def inter_level(system: System) -> LinkLevel:
    net = system.network
    if net is None:
        return LinkLevel(float("inf"), 0.0)
    return LinkLevel(system.inter_node_gb_s_per_device() * 1e9, net.latency_us * 1e-6)


def _ring(steps_factor: float, n: int, size: float, level: LinkLevel) -> float:
    """Ring algorithm over n ranks: steps_factor*(n-1) steps, each moving size/n per rank."""
    if n <= 1:
        return 0.0
    return steps_factor * (n - 1) * level.latency + steps_factor * (n - 1) / n * size / level.bandwidth


def collective_time(collective: str, size: float, group: CommGroup, system: System) -> float:
    n = group.size
    if n <= 1 or size <= 0:
        return 0.0
    intra, inter = intra_level(system), inter_level(system)
    local = min(group.per_node, n)
    nodes = group.nodes
    if collective == "p2p":
        level = intra if nodes == 1 else inter
        return level.latency + size / level.bandwidth
    if collective == "all_to_all":
        # Each rank sends size*(n-1)/n; the share bound for other nodes leaves through this rank's
        # NIC share, the rest over the intra-node fabric, both at once. A2A pairs are posted
        # together, so latency is paid per peer only on the slower level.
        intra_t = (local - 1) / n * size / intra.bandwidth if local > 1 else 0.0
        inter_t = (n - local) / n * size / inter.bandwidth if nodes > 1 else 0.0
        latency = (n - 1) * (inter.latency if nodes > 1 else intra.latency)
        return latency + max(intra_t, inter_t)
    factor = 2.0 if collective == "all_reduce" else 1.0
    if nodes == 1:
        return _ring(factor, n, size, intra)
    # Hierarchical (NCCL-style): reduce-scatter/gather inside the node, the inter-node ring on
    # 1/local of the data per rank; the two stages pipeline over chunks, so the slower one bounds.
    intra_t = _ring(factor, local, size, intra)
    inter_t = _ring(factor, nodes, size / local, inter)
    return max(intra_t, inter_t)


def bus_bandwidth(collective: str, size: float, seconds: float, n: int) -> float:
    """nccl-tests bus bandwidth (bytes/s) of a measured or predicted collective."""
    if seconds <= 0 or n <= 1:
        return 0.0
    algbw = size / seconds
    factor = {"all_reduce": 2 * (n - 1) / n, "p2p": 1.0}.get(collective, (n - 1) / n)
    return algbw * factor
