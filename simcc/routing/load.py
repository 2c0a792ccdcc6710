"""Tokens per expert and per expert-parallel rank: drawn from the gating policy's measured
profile, then capped by capacity, padded or rounded to the kernel block, placed on ranks, and
spread over replicas of hot experts.

The expert-parallel layer waits for its busiest rank, so the cost model needs the whole load
vector, not its mean. Assignments for the full batch are a multinomial draw over the policy's
expert shares (policies that fix counts by construction, BASE and expert choice, are exact).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from simcc.errors import InputError
from simcc.routing.gating import RoutingSample, route
from simcc.specs.blocks import MoEFFNBlock, RoutingSpec
from simcc.specs.vocab import CapacityFormula


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


# Capacity of one expert in one routing group: (cf, k, tokens per expert T/E, routing) -> slots.
# Keyed by the CapacityFormula names, whose `simcc list` text is in specs/vocab.py.
CAPACITY_RULES: dict[CapacityFormula, Callable[[float, int, float, RoutingSpec], int]] = {
    # Fedus et al. 2021 (Switch Transformers, arXiv 2101.03961), sec. 2.2: (T / E) * cf, per
    # expert slot a token can take (k of them).
    "switch": lambda cf, k, per_expert, routing: math.ceil(cf * k * per_expert),
    # Lepikhin et al. 2020 (GShard, arXiv 2006.16668), sec. 2.2 and Algorithm 1: top-2, so 2T/E per group.
    "gshard": lambda cf, k, per_expert, routing: math.ceil(cf * 2 * per_expert),
    # DeepSpeed-MoE (Rajbhandari et al. 2022, arXiv 2201.05596): deepspeed/moe/sharded_moe.py
    # _capacity, ceil(T / E * cf) and at least min_capacity; top-2 gating doubles it.
    "deepspeed": lambda cf, k, per_expert, routing: max(math.ceil(cf * per_expert) * k, routing.min_capacity),
    # Tutel (Hwang et al. 2023, arXiv 2206.03382): tutel/impls/fast_dispatch.py extract_critical,
    # top_k * int(cf * ceil(T / E)), padded up to a multiple of the alignment.
    "tutel": lambda cf, k, per_expert, routing: _round_up(k * int(cf * math.ceil(per_expert)), routing.capacity_alignment),
}
LOAD_DRAWS = 64  # draws averaged to estimate the expected busiest rank (once per layer kind and batch)
DRAW_ELEMENTS = 1 << 21  # at most this many draws x experts, but
DRAWS_FLOOR = 16  # never fewer draws than this for an expectation
NO_CAPACITY_POLICIES = ("base", "expert_choice")  # balanced by construction: nothing to drop


@dataclass(frozen=True)
class RankLoads:
    """Computed tokens per expert slot of a rank (after capacity, padding and block rounding);
    a rank's slots are its own experts, then its share of each replicated hot expert."""

    busiest_rank: tuple[float, ...]  # the busiest rank's slots (expected over draws)
    mean_rank: tuple[float, ...]  # an average rank's slots
    routed: float  # token-expert assignments made in the group
    dropped: float  # assignments dropped by capacity
    padded: float  # compute slots wasted on padding or block rounding
    cv: float  # coefficient of variation of per-expert load
    max_over_mean: float  # busiest expert's load over the mean expert load
    max_expert_tokens: float  # busiest expert's assignments
    no_expert_fraction: float = 0.0  # tokens that no expert processed by policy (expert choice)
    capacity: float | None = None  # per expert, over the group; None when nothing is padded
    # Expected slots of the busiest / an average rank that get at least one token in one step: the
    # expert weights that step reads. The slot vectors above are expectations over draws, in which
    # every expert any draw touched looks busy; a decode step reads only the experts it picked.
    busiest_active: float | None = None
    mean_active: float | None = None
    # The counts were drawn at random, so another step's draw differs; False when the policy or
    # the convention fixes them (exact shares, `balanced`): every step then has these loads.
    drawn: bool = True

    @property
    def busiest_share(self) -> float:
        """The busiest rank's slots over an average rank's: what a dropless step waits for."""
        mean = sum(self.mean_rank)
        return sum(self.busiest_rank) / mean if mean > 0 else 1.0


@lru_cache(maxsize=4096)
def routing_sample(spec: MoEFFNBlock, ranks: int, seed: int, expert_params: float = 0.0) -> RoutingSample:
    """One profile per layer: the policy's behaviour does not change from step to step."""
    return route(spec, ranks, seed, expert_params)


def capacity_per_expert(spec: MoEFFNBlock, tokens_per_rank: float, ranks: int) -> float:
    """Capacity of one expert, summed over the `ranks` routing groups that send to it."""
    routing = spec.routing
    assert routing.capacity_factor is not None
    rule = CAPACITY_RULES[routing.capacity_formula]
    return ranks * rule(routing.capacity_factor, spec.k, tokens_per_rank / spec.experts, routing)


def expert_ranks(spec: MoEFFNBlock, ranks: int) -> np.ndarray:
    """The rank holding each expert: contiguous blocks, round-robin, or a user's file."""
    experts, routing = spec.experts, spec.routing
    local = experts // ranks
    if routing.placement == "contiguous":
        return np.arange(experts) // local
    if routing.placement == "round_robin":
        return np.arange(experts) % ranks
    # A user's file: a `rank` per expert, one row per expert in order, or in any order with an
    # `expert` column; ranks are whole numbers below `ranks`, each holding the same number of experts.
    from simcc.specs.tables import Column, read_table

    path = str(routing.placement_file)
    table = read_table(path, [Column("rank", "integer", 0, ranks - 1),
                              Column("expert", "integer", 0, experts - 1, required=False)],
                       named_by="routing.placement_file", hint=f"a rank from 0 to {ranks - 1} for each of {experts} experts")
    frame = table.frame
    if "expert" in frame.columns:
        seen = frame["expert"].duplicated().to_numpy()
        table.refuse(seen, "expert", "each expert once; this one appears on an earlier line")
        absent = sorted(set(range(experts)) - set(frame["expert"].tolist()))
        if absent:
            raise InputError(path, "expert", f"expert {absent[0]} has no row; expected one row for each of the {experts} experts")
        frame = frame.sort_values("expert")
    elif len(frame) != experts:
        raise InputError(path, "rank", f"expected {experts} rows (one per expert, expert 0 first), got {len(frame)}")
    placed = frame["rank"].to_numpy(dtype=int)
    per_rank = np.bincount(placed, minlength=ranks)
    if (per_rank != local).any():
        uneven = int(np.flatnonzero(per_rank != local)[0])
        raise InputError(path, "rank", f"expected ranks 0..{ranks - 1}, each holding {local} experts; "
                         f"rank {uneven} holds {int(per_rank[uneven])}")
    return placed


def _per_rank_slots(computed: np.ndarray, placement: np.ndarray, hot: np.ndarray, ranks: int) -> np.ndarray:
    """[draws, ranks, slots] computed tokens from [draws, experts]: each rank's own non-hot experts
    first, then an equal share of each hot one."""
    experts = computed.shape[1]
    local = experts // ranks
    is_hot = np.zeros(experts, dtype=bool)
    is_hot[hot] = True
    own = np.full((ranks, local), experts)  # index `experts` reads the zero column appended below
    for rank in range(ranks):
        mine = np.flatnonzero((placement == rank) & ~is_hot)
        own[rank, : mine.size] = mine
    padded = np.concatenate([computed, np.zeros((computed.shape[0], 1))], axis=1)
    shared = np.broadcast_to(computed[:, None, hot] / ranks, (computed.shape[0], ranks, hot.size))
    return np.concatenate([padded[:, own], shared], axis=2)


def balanced_copies(share: np.ndarray, ranks: int, redundant: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the expert-parallel load balancer puts each expert and its copies (DeepSeek-V3 report
    sec. 3.4: redundant copies of high-load experts, rearranged across GPUs by observed load; the
    method of deepseek-ai/EPLB, reimplemented): each redundant copy goes to the expert with the
    highest load per copy, then the copies, heaviest first, each to the least-loaded rank that has
    a free slot, every rank holding (experts + redundant) / ranks. Returns the expert in each
    [rank, slot] and the share of that expert's tokens the slot takes (tokens split evenly over an
    expert's copies)."""
    experts = share.size
    copies = np.ones(experts, dtype=int)
    heap = [(-float(share[e]), e) for e in range(experts)]  # load per copy, negated for a max-heap
    heapq.heapify(heap)
    for _ in range(redundant):
        _, expert = heapq.heappop(heap)
        copies[expert] += 1
        heapq.heappush(heap, (-float(share[expert]) / copies[expert], expert))
    slots = (experts + redundant) // ranks
    replica_expert = np.repeat(np.arange(experts), copies)
    replica_load = share[replica_expert] / copies[replica_expert]
    index = np.empty((ranks, slots), dtype=int)
    filled = [0] * ranks
    open_ranks = [(0.0, rank) for rank in range(ranks)]  # (load so far, rank) of ranks with a free slot
    for replica in np.argsort(-replica_load, kind="stable"):
        load, rank = heapq.heappop(open_ranks)
        index[rank, filled[rank]] = replica_expert[replica]
        filled[rank] += 1
        if filled[rank] < slots:
            heapq.heappush(open_ranks, (load + float(replica_load[replica]), rank))
    return index, 1.0 / copies[index]


@lru_cache(maxsize=16384)  # pure in its arguments: a sweep meets the same layer loads many times
def rank_loads(spec: MoEFFNBlock, tokens_per_rank: float, ranks: int, seed: int, sample_seed: int,
               balanced: bool = False, draws: int = LOAD_DRAWS, expert_params: float = 0.0) -> RankLoads:
    """Per-rank expert loads for one MoE layer over `ranks` expert-parallel ranks.

    `balanced` gives the exact mean (T*k/E per expert, no rounding): the reporting convention.
    `draws` > 1 averages the busiest rank over several draws (an expectation); 1 is one step's draw.
    `expert_params` (one expert's parameters) sets how much an expert gains from more data when an
    aux-loss gate is trained (routing/trained_gate.py)."""
    experts = spec.experts
    local = experts // ranks
    if balanced:
        routed = tokens_per_rank * spec.k * ranks
        per_expert = tuple([routed / experts] * local)
        active = local * expert_use_probability(np.full(experts, 1.0 / experts), spec.k, routed / spec.k)[0]
        return RankLoads(per_expert, per_expert, routed, 0.0, 0.0, 0.0, 1.0, routed / experts,
                         busiest_active=float(active), mean_active=float(active), drawn=False)

    profile = routing_sample(spec, ranks, sample_seed, expert_params if spec.load.distribution == "aux_loss" else 0.0)
    # An expectation needs fewer draws the more experts a rank averages over: cap the draws x
    # experts work (a 131,072-expert layer takes 16 draws, a 256-expert one 64).
    if draws > 1:
        draws = min(draws, max(DRAWS_FLOOR, DRAW_ELEMENTS // experts))
    routed = tokens_per_rank * ranks * profile.experts_per_token
    placement = expert_ranks(spec, ranks)
    hot = np.argsort(-profile.share, kind="stable")[: spec.routing.replicate_hot]
    dropless = spec.routing.dropless or spec.gating.policy in NO_CAPACITY_POLICIES
    capacity = None if dropless else capacity_per_expert(spec, tokens_per_rank, ranks)
    block = spec.routing.dropless_block if spec.gating.policy not in NO_CAPACITY_POLICIES else 1

    rng = np.random.default_rng(seed)
    if profile.exact:
        counts = np.tile(routed * profile.share, (draws, 1))
    else:
        counts = rng.multinomial(int(round(routed)), profile.share, size=draws).astype(float)
    copies = None
    if spec.routing.redundant_experts:  # dropless (the spec says so): each copy's tokens round to the block
        copies = balanced_copies(profile.share, ranks, spec.routing.redundant_experts)
    if capacity is None:
        kept = counts
        computed = np.ceil(counts / block) * block
    else:
        kept = np.minimum(counts, capacity)
        computed = np.full_like(counts, float(capacity))  # buffers are padded to capacity
    if copies is None:
        per_rank = _per_rank_slots(computed, placement, hot, ranks)  # [draws, ranks, slots]
    else:
        index, fraction = copies
        per_rank = counts[:, index] * fraction  # a count splits over its copies, whole tokens summing to it
        if block > 1:
            per_rank = np.ceil(per_rank / block) * block
        computed = np.zeros_like(counts)
        np.add.at(computed, (slice(None), index.ravel()), per_rank.reshape(draws, -1))
    hottest = per_rank.sum(axis=2).argmax(axis=1)
    busiest = per_rank[np.arange(draws), hottest].sum(axis=0)
    mean_rank = per_rank.mean(axis=1).sum(axis=0)
    dropped = float((counts - kept).sum())
    padded = float((computed - kept).sum())
    average = counts.mean(axis=1)
    safe = np.where(average > 0, average, 1.0)
    cv = float(np.where(average > 0, counts.std(axis=1) / safe, 0.0).sum())
    max_over_mean = float(np.where(average > 0, counts.max(axis=1) / safe, 1.0).sum())
    max_tokens = float(counts.max(axis=1).sum())
    n = float(draws)
    busiest_active, mean_active = _active_slots(spec, profile, routed, capacity, placement, hot, ranks, copies)
    return RankLoads(tuple(float(x) for x in busiest / n), tuple(float(x) for x in mean_rank / n), float(routed),
                     dropped / n, padded / n, cv / n, max_over_mean / n, max_tokens / n, profile.no_expert_fraction,
                     capacity, busiest_active, mean_active, drawn=not profile.exact)


def expert_use_probability(share: np.ndarray, k: float, tokens: float) -> np.ndarray:
    """Chance that each expert gets at least one of `tokens` tokens in one step, when a token
    takes k distinct experts and expert e holds `share[e]` of all assignments: a token includes
    e with probability min(1, k * share[e]), independently of the other tokens, so e goes unused
    with probability (1 - k * share[e]) ** tokens. Uniform routing gives the expected distinct
    experts E * (1 - (1 - k / E) ** tokens) a decode step at batch `tokens` reads."""
    include = np.minimum(1.0, k * share)
    return 1.0 - np.power(1.0 - include, max(tokens, 0.0))


def _active_slots(spec: MoEFFNBlock, profile: RoutingSample, routed: float, capacity: float | None,
                  placement: np.ndarray, hot: np.ndarray, ranks: int,
                  copies: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float]:
    """Expected slots with work on the busiest and on an average rank in one step. Buffers padded
    to capacity run every expert; policies that fix counts (BASE, expert choice) use an expert
    when its count reaches a token; otherwise each expert is used with `expert_use_probability`.
    A replicated hot expert's share on a rank counts as that expert's use; a balancer's copy of an
    expert is used when one of the copy's share of its tokens arrives."""
    experts = spec.experts
    local = experts // ranks
    slots = local + hot.size
    if capacity is not None:
        return float(slots), float(slots)
    tokens = routed / max(profile.experts_per_token, 1e-12)
    if copies is not None:
        index, fraction = copies
        share = profile.share[index] * fraction
        slot_used = (np.minimum(1.0, routed * share) if profile.exact
                     else expert_use_probability(share, profile.experts_per_token, tokens))
        per_rank = slot_used.sum(axis=1)
        return float(per_rank.max()), float(per_rank.mean())
    if profile.exact:
        used = np.minimum(1.0, routed * profile.share)
    else:
        used = expert_use_probability(profile.share, profile.experts_per_token, tokens)
    is_hot = np.zeros(experts, dtype=bool)
    is_hot[hot] = True
    own = np.bincount(placement[~is_hot], weights=used[~is_hot], minlength=ranks)
    per_rank = own + used[hot].sum()
    return float(per_rank.max()), float(per_rank.mean())


def _none_of(pool: float, part: float, k: int) -> float:
    """P(none of k distinct items drawn uniformly from `pool` lies in a given `part` of it)."""
    others = pool - part
    return math.prod((others - i) / (pool - i) for i in range(k)) if others >= k else 0.0


def distinct_remote_nodes(experts: int, k: int, nodes: int, max_nodes: int | None = None,
                          ranks: int = 1, max_ranks: int | None = None) -> float:
    """Expected number of other nodes a token's k experts live on, experts spread evenly over
    `nodes` nodes and chosen uniformly (a balanced router); with node-limited routing the k lie
    within `max_nodes` nodes (DeepSeek-V3 sec. 2.1.2); with device-limited routing within
    `max_ranks` of the `ranks` EP ranks, chosen uniformly, whose nodes it reaches. A deduplicating
    dispatcher sends the token once to each of them. Each node of the ones it uses is the token's
    own with probability 1/nodes."""
    if nodes <= 1:
        return 0.0
    if max_ranks is not None and max_ranks < ranks:
        # a node holds none if j of the M chosen ranks are its own (hypergeometric) and the k
        # experts, drawn from the M ranks' pool, miss those j
        per_node, per_rank = ranks // nodes, experts / ranks
        choices = math.comb(ranks, max_ranks)
        missed = sum(math.comb(per_node, j) * math.comb(ranks - per_node, max_ranks - j) / choices
                     * _none_of(max_ranks * per_rank, j * per_rank, k) for j in range(min(per_node, max_ranks) + 1))
        return nodes * (1.0 - missed) * (nodes - 1) / nodes
    per_node = experts / nodes
    span = nodes if max_nodes is None else min(nodes, max_nodes)
    used = span * (1.0 - _none_of(per_node * span, per_node, k))
    return used * (nodes - 1) / nodes


def distinct_ranks(experts: int, k: int, ranks: int, nodes: int = 1, max_nodes: int | None = None,
                   max_ranks: int | None = None) -> float:
    """Expected number of EP ranks (its own included) a token's k experts live on, experts spread
    evenly over `ranks` ranks on `nodes` nodes and chosen uniformly; with node-limited routing the
    k lie within `max_nodes` nodes, with device-limited routing within `max_ranks` ranks. A
    dispatcher that sends a token once per destination rank moves this many copies, not k
    (DeepEP's intranode and NVLink-forwarding kernels write each token once to every rank whose
    experts need it: recv_x holds it once)."""
    if ranks <= 1:
        return 1.0
    per_rank = experts / ranks
    if max_ranks is not None and max_ranks < ranks:
        return max_ranks * (1.0 - _none_of(per_rank * max_ranks, per_rank, k))
    span = nodes if max_nodes is None else min(nodes, max_nodes)
    pool = experts / nodes * span  # the experts a token may pick from
    return span * ranks / nodes * (1.0 - _none_of(pool, per_rank, k))


@dataclass(frozen=True)
class TokenSpread:
    ranks: float  # EP ranks holding any of a token's experts, its own rank included
    remote_nodes: float  # nodes other than its own among those ranks' nodes


def token_spread(spec: MoEFFNBlock, ranks: int, nodes: int) -> TokenSpread:
    """Where one token's k experts live, averaged over tokens: what a dispatcher that sends a
    token once per rank (and once per node across the network) moves. A round-robin gate gives
    token i the neighbouring experts i*k .. i*k+k-1 (mod E), so each token's spread follows
    from the placement, the same for every step; any other gate is taken as uniform over the
    experts its node or device limit allows (`distinct_ranks`, `distinct_remote_nodes`)."""
    routing = spec.routing
    if spec.gating.policy != "round_robin":
        limits = dict(max_nodes=routing.max_nodes_per_token, max_ranks=routing.max_ranks_per_token)
        return TokenSpread(distinct_ranks(spec.experts, spec.k, ranks, nodes, **limits),
                           distinct_remote_nodes(spec.experts, spec.k, nodes, ranks=ranks, **limits))
    experts, k = spec.experts, spec.k
    owner = expert_ranks(spec, ranks)
    per_node = max(1, ranks // max(nodes, 1))
    starts = np.arange(experts // math.gcd(experts, k)) * k  # token i's first expert; then it repeats
    windows = owner[(starts[:, None] + np.arange(k)) % experts]  # [window, k]: each expert's rank

    def distinct_per_row(values: np.ndarray) -> float:
        ordered = np.sort(values, axis=1)
        return float(np.mean(1 + (np.diff(ordered, axis=1) != 0).sum(axis=1)))

    reached_ranks = distinct_per_row(windows)
    reached_nodes = distinct_per_row(windows // per_node)
    # A token's window does not depend on where the token is: its own node is any of them alike.
    return TokenSpread(reached_ranks, reached_nodes * (nodes - 1) / nodes if nodes > 1 else 0.0)

