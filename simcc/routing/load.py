"""Tokens per expert and per expert-parallel rank: sampled, seeded, then capped or padded.

The expert-parallel layer waits for its busiest rank, so the cost model needs the whole load
vector, not its mean. Popularity is uniform, Zipf(alpha) or log-normal with a target CV; token
assignments are then drawn from a multinomial (top-k picks treated as independent draws, which
slightly overstates collisions when k is close to E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simcc.specs.workload import MoEFFNBlock

LOAD_DRAWS = 16  # draws averaged to estimate the expected busiest rank


@dataclass(frozen=True)
class RankLoads:
    """Computed tokens per local expert (after capacity, padding and block rounding)."""

    busiest_rank: tuple[float, ...]  # per local expert of the busiest rank (expected over draws)
    mean_rank: tuple[float, ...]  # per local expert of an average rank
    routed: float  # token-expert assignments made in the group (T * k * ranks)
    dropped: float  # assignments dropped by capacity
    padded: float  # compute slots wasted on padding or block rounding
    cv: float  # coefficient of variation of per-expert load
    max_over_mean: float  # busiest expert load over the mean expert load


def popularity(spec: MoEFFNBlock, rng: np.random.Generator) -> np.ndarray:
    experts = spec.experts
    load = spec.load
    if load.distribution == "uniform":
        weights = np.ones(experts)
    elif load.distribution == "zipf":
        weights = 1.0 / np.arange(1, experts + 1) ** load.alpha
        rng.shuffle(weights)  # hot experts land on random ranks
    else:
        # Log-normal popularity: CV = sqrt(exp(sigma^2) - 1)  =>  sigma = sqrt(ln(1 + CV^2)).
        sigma = math.sqrt(math.log1p(load.cv**2))
        weights = rng.lognormal(0.0, sigma, experts)
    return weights / weights.sum()


def capacity_per_expert(spec: MoEFFNBlock, tokens_per_rank: float, ranks: int) -> float:
    """Switch capacity C = ceil(cf * k * T / E) per source rank's routing group (Fedus et al. 2021),
    summed over the ranks that send to an expert."""
    assert spec.capacity_factor is not None
    return ranks * math.ceil(spec.capacity_factor * spec.k * tokens_per_rank / spec.experts)


def rank_loads(spec: MoEFFNBlock, tokens_per_rank: float, ranks: int, seed: int, balanced: bool = False,
               draws: int = LOAD_DRAWS) -> RankLoads:
    """Per-rank expert loads for one MoE layer over `ranks` expert-parallel ranks.

    `balanced` gives the exact mean (T*k/E per expert, no rounding): the reporting convention.
    `draws` > 1 averages the busiest rank over several draws (an expectation); 1 is one step's draw."""
    experts = spec.experts
    local = experts // ranks
    routed = tokens_per_rank * spec.k * ranks
    mean_load = routed / experts
    if balanced:
        per_expert = tuple([mean_load] * local)
        return RankLoads(per_expert, per_expert, routed, 0.0, 0.0, 0.0, 1.0)

    rng = np.random.default_rng(seed)
    probs = popularity(spec, rng)
    capacity = None if spec.dropless else capacity_per_expert(spec, tokens_per_rank, ranks)
    busiest = np.zeros(local)
    mean_rank = np.zeros(local)
    dropped = padded = cv = max_over_mean = 0.0
    for _ in range(draws):
        counts = rng.multinomial(int(round(routed)), probs).astype(float)
        if capacity is None:
            computed = np.ceil(counts / spec.dropless_block) * spec.dropless_block
            computed[counts == 0] = 0.0
            kept = counts
        else:
            kept = np.minimum(counts, capacity)
            computed = np.full(experts, float(capacity))  # buffers are padded to capacity
        per_rank = computed.reshape(ranks, local)
        hottest = int(np.argmax(per_rank.sum(axis=1)))
        busiest += per_rank[hottest]
        mean_rank += per_rank.mean(axis=0)
        dropped += float((counts - kept).sum())
        padded += float((computed - kept).sum())
        cv += float(counts.std() / counts.mean()) if counts.mean() > 0 else 0.0
        max_over_mean += float(counts.max() / counts.mean()) if counts.mean() > 0 else 1.0
    n = float(draws)
    return RankLoads(tuple(float(x) for x in busiest / n), tuple(float(x) for x in mean_rank / n), float(routed),
                     dropped / n, padded / n, cv / n, max_over_mean / n)


def expected_experts_touched(spec: MoEFFNBlock, tokens: int, seed: int) -> float:
    """Distinct experts that `tokens` tokens reach in one layer: sum over experts of
    1 - (1 - k*p_e)^tokens (each token picks k distinct experts; p_e its popularity)."""
    probs = popularity(spec, np.random.default_rng(seed))
    pick = np.clip(spec.k * probs, 0.0, 1.0)
    return float(np.sum(1.0 - (1.0 - pick) ** tokens))
