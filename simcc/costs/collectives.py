"""Time of a collective over a group of devices: the one place collective time is modelled.

Sizes follow nccl-tests (`size` is the per-rank buffer); bus bandwidth conventions from
nccl-tests' PERFORMANCE.md: all-reduce busbw = algbw * 2(n-1)/n; all-gather, reduce-scatter and
all-to-all busbw = algbw * (n-1)/n; point-to-point busbw = algbw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from simcc.errors import InputError
from simcc.layout import CommGroup
from simcc.specs.hardware import System
from simcc.specs.vocab import Collective

ALGORITHMS = ("auto", "ring", "tree", "flat", "hierarchical", "deduplicated", "low_latency")


@dataclass(frozen=True)
class LinkLevel:
    bandwidth: float  # bytes/s one rank can push, after protocol efficiency
    latency: float  # seconds per protocol step


def intra_level(system: System, collective: Collective | None = None) -> LinkLevel:
    link = system.intra_link
    if link is None:
        return LinkLevel(float("inf"), 0.0)
    efficiency = link.efficiency
    if collective == "all_to_all" and link.all_to_all_efficiency is not None:
        efficiency = link.all_to_all_efficiency
    return LinkLevel(link.bandwidth_gb_s * 1e9 * efficiency, link.latency_us * 1e-6)


def inter_level(system: System) -> LinkLevel:
    net = system.network
    if net is None:
        return LinkLevel(float("inf"), 0.0)
    return LinkLevel(system.inter_node_gb_s_per_device() * 1e9, net.latency_us * 1e-6)


def host_copy_time(size: float, system: System) -> float:
    """One device copying `size` bytes to or from its host's memory over its host link (PCIe: one
    direction each way), at the link's protocol efficiency."""
    link = system.host_link
    if link is None:
        raise InputError(system.source_file, "host_link", "a copy to host memory needs a node with a host_link "
                         "(a device alone has none)")
    return link.latency_us * 1e-6 + size / (link.bandwidth_gb_s * 1e9 * link.efficiency)


def _ring(steps_factor: float, n: int, size: float, level: LinkLevel) -> float:
    """Ring over n ranks: steps_factor*(n-1) steps, each moving size/n per rank."""
    if n <= 1:
        return 0.0
    return steps_factor * (n - 1) * level.latency + steps_factor * (n - 1) / n * size / level.bandwidth


def _tree(steps_factor: float, hops: int, size: float, level: LinkLevel) -> float:
    """Pipelined tree: `hops` latency steps per phase, every rank moving the whole buffer once per
    phase (reduce, then broadcast for all-reduce)."""
    if hops <= 0:
        return 0.0
    return steps_factor * (hops * level.latency + size / level.bandwidth)


def _tree_hops(n: int, in_node: bool) -> int:
    # NCCL's trees are binary across nodes and a chain inside one (NVIDIA/nccl src/graph/tuning.cc:
    # tree latency = 2 * ((ranks per node - 1) * intra hop + log2(nodes) * inter hop)).
    return n - 1 if in_node else math.ceil(math.log2(n))


def _reduction(factor: float, n: int, size: float, level: LinkLevel, algorithm: str, in_node: bool) -> float:
    ring = _ring(factor, n, size, level)
    if algorithm == "ring" or factor < 2:  # trees serve all-reduce only
        return ring
    tree = _tree(factor, _tree_hops(n, in_node), size, level)
    return tree if algorithm == "tree" else min(ring, tree)  # auto: NCCL's tuner picks the faster


# Peers an all-to-all exchanges with at once: NCCL runs the grouped sends and receives of an
# all-to-all as point-to-point work batched up to NCCL_MAX_DEV_WORK_P2P_PER_BATCH = 8 peers per
# batch (NVIDIA/nccl src/enqueue.cc, src/include/device.h), so a rank waits one link latency per
# round of 8 peers, not one per peer.
PEERS_PER_ROUND = 8


def peer_rounds(peers: int) -> int:
    """Rounds of concurrent point-to-point exchanges needed to reach `peers` peers."""
    return math.ceil(peers / PEERS_PER_ROUND) if peers > 0 else 0


def _all_to_all(size: float, n: int, local: int, nodes: int, intra: LinkLevel, inter: LinkLevel,
                algorithm: str, remote_share: float | None) -> float:
    # Topology-aware gating (FasterMoE) keeps a chosen share in the node; else it follows the ranks.
    remote = (n - local) / n if remote_share is None or nodes == 1 else min(remote_share, (n - 1) / n)
    local_share = max(0.0, (n - 1) / n - remote)
    intra_t = local_share * size / intra.bandwidth if local > 1 else 0.0
    if algorithm == "low_latency":
        # GPU-initiated sends of each token copy, all peers posted at once, so one latency whatever
        # the peers. Copies for GPUs of the same node are written over NVLink, the rest leave
        # through the NIC, side by side (DeepEP's low-latency kernels "leverage NVLink as much as
        # possible" since deepseek-ai/DeepEP PR #173, 2025-06; before it they were pure RDMA).
        inside = intra.latency + intra_t if local > 1 else 0.0
        across = inter.latency + remote * size / inter.bandwidth if nodes > 1 else 0.0
        return max(inside, across)
    if nodes == 1:
        return peer_rounds(n - 1) * intra.latency + intra_t
    if algorithm == "deduplicated":
        # One RDMA send per destination node to the GPU of the same local index there (`remote`:
        # the share of this rank's token copies that are distinct remote nodes), then NVLink
        # forwarding to the GPUs that hold the experts; the two stages pipeline (DeepSeek-V3 sec.
        # 3.2.2: the IB and NVLink transfers overlap).
        across = peer_rounds(nodes - 1) * inter.latency + remote * size / inter.bandwidth
        forward = peer_rounds(local - 1) * intra.latency + (local - 1) / local * size / intra.bandwidth
        return max(across, forward)
    if algorithm == "hierarchical":
        # Two-level (Tutel 2DH, Hwang et al. 2023): an intra-node all-to-all regroups the data by
        # destination node, then ranks with the same local index exchange (N-1) larger messages.
        regroup = peer_rounds(local - 1) * intra.latency + (local - 1) / local * size / intra.bandwidth
        across = peer_rounds(nodes - 1) * inter.latency + remote * size / inter.bandwidth
        return regroup + across
    # Flat: each rank posts all n-1 sends at once; the share bound for other nodes leaves through
    # this rank's NIC share while the rest crosses the intra-node fabric, side by side.
    inside = peer_rounds(local - 1) * intra.latency + intra_t
    across = peer_rounds(n - local) * inter.latency + remote * size / inter.bandwidth
    return max(inside, across)


def collective_time(collective: Collective, size: float, group: CommGroup, system: System, algorithm: str = "auto",
                    remote_share: float | None = None) -> float:
    """Seconds for one collective. `algorithm`: ring | tree | auto for reductions; flat |
    hierarchical for all-to-all. `remote_share`: all-to-all bytes leaving the node, when gating
    decides it rather than the rank layout."""
    n = group.size
    if n <= 1 or size <= 0:
        return 0.0
    fitted = _measured(collective, size, group, system)
    if fitted is not None:
        return fitted
    intra, inter = intra_level(system, collective), inter_level(system)
    local = min(group.per_node, n)
    nodes = group.nodes
    if collective == "p2p":
        level = intra if nodes == 1 else inter
        return level.latency + size / level.bandwidth
    if collective == "all_to_all":
        return _all_to_all(size, n, local, nodes, intra, inter, algorithm, remote_share)
    factor = 2.0 if collective == "all_reduce" else 1.0
    if nodes == 1:
        return _reduction(factor, n, size, intra, algorithm, in_node=True)
    # Hierarchical (NCCL-style): reduce-scatter/gather inside the node, the inter-node stage on
    # 1/local of the data per rank; the stages pipeline over chunks, so the slower one bounds.
    intra_t = _ring(factor, local, size, intra)
    inter_t = _reduction(factor, nodes, size / local, inter, algorithm, in_node=False)
    return max(intra_t, inter_t)


def ring_steps(collective_seconds: Callable[[float], float], chunk_bytes: float, cp: int,
               backward: bool) -> list[float]:
    """Seconds of each transfer of a context-parallel KV ring (Transformer Engine's
    AttnFuncWithCPAndKVP2P, cp_comm_type "p2p", transformer_engine/pytorch/attention/
    dot_product_attention/context_parallel.py), each a send to the next cp rank while receiving
    from the previous (`collective_seconds` of one such point-to-point transfer of so many bytes).
    Forward: cp steps, the first cp-1 each passing one K/V chunk on. Backward: cp steps, the
    first passing the K/V chunk, the middle cp-2 the K/V chunk with the dK/dV accumulated so far,
    the last only the dK/dV, back to the rank that owns it: 2(cp-1) chunks in all."""
    if cp <= 1:
        return []
    if not backward:
        return [collective_seconds(chunk_bytes)] * (cp - 1)
    one, two = collective_seconds(chunk_bytes), collective_seconds(2 * chunk_bytes)
    return [one] + [two] * (cp - 2) + [one]


def ring_exposed(transfers: list[float], step_compute: float) -> float:
    """Seconds of a ring's transfers the compute does not hide: each step's transfer runs while
    that step's attention kernel computes, and the next step needs both (Liu et al. 2023, Ring
    Attention, sec. 3: "overlapping the communication of key-value blocks with the computation of
    blockwise attention"), so a step takes max(compute, transfer)."""
    return sum(max(0.0, seconds - step_compute) for seconds in transfers)


def _measured(collective: Collective, size: float, group: CommGroup, system: System) -> float | None:
    """A calibrated fit of this collective on this many ranks inside one node, if the profile has
    one: the line of the size range that holds `size` (the largest range beyond the last)."""
    link = system.intra_link
    if link is None or not link.fits or group.nodes != 1:
        return None
    ranks = 2 if collective == "p2p" else group.size
    seconds = _fitted(link.fits, collective, ranks, size)
    if seconds is None and collective in RING_HALVES:
        # A ring all-reduce is a reduce-scatter followed by an all-gather of the same buffer, each
        # n-1 of its 2(n-1) steps (Patarasuk & Yuan 2009; NCCL's ring all-reduce kernel runs the two
        # phases back to back, src/device/all_reduce.h): each half takes half of a measured all-reduce.
        whole = _fitted(link.fits, "all_reduce", ranks, size)
        seconds = whole / 2 if whole is not None else None
    return seconds


RING_HALVES = ("reduce_scatter", "all_gather")


def _fitted(fits: list, collective: Collective, ranks: int, size: float) -> float | None:
    """The fitted line of the size range that holds `size` (the largest range beyond the last),
    never below a smaller range's time at its top: each range is fitted apart, and a larger
    message does not finish sooner than a smaller one."""
    lines = sorted((f for f in fits if f.collective == collective and f.ranks == ranks), key=lambda f: f.max_bytes)
    if not lines:
        return None
    floor = 0.0
    for line in lines[:-1]:
        if size <= line.max_bytes:
            return max(floor, _on_line(line, size))
        floor = max(floor, _on_line(line, line.max_bytes))
    return max(floor, _on_line(lines[-1], size))


def _on_line(line, size: float) -> float:
    return line.latency_us * 1e-6 + size / (line.bandwidth_gb_s * 1e9)


def latency_floor(collective: Collective, group: CommGroup, system: System, algorithm: str = "auto") -> float:
    """The part of a collective's time no chunking can split: the model's time for one byte."""
    return collective_time(collective, 1.0, group, system, algorithm)


def bus_bandwidth(collective: Collective, size: float, seconds: float, n: int) -> float:
    """nccl-tests bus bandwidth (bytes/s) of a measured or predicted collective."""
    if seconds <= 0 or n <= 1:
        return 0.0
    algbw = size / seconds
    factor = {"all_reduce": 2 * (n - 1) / n, "p2p": 1.0}.get(collective, (n - 1) / n)
    return algbw * factor
