"""Input-dependent activation of threshold-gated block trees (Gallicchio & Nuti 2025).

Each input carries a unit rate into the root block. An active block splits its rate among its
children with Dirichlet(concentration) shares: a small concentration (an easy input) sends
nearly all of it down one path, a large one (a hard input) spreads it evenly. A child fires when
its incoming rate exceeds the threshold. Counting the blocks that fire, over sampled inputs,
gives the expected and tail compute per input: cost = sum_i Pr(r_i > theta) * FLOPs_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simcc.specs.blocks import ThresholdTreeBlock


@dataclass(frozen=True)
class FiringSample:
    blocks: int  # blocks in the tree
    active_per_level: tuple[float, ...]  # mean active blocks at each level, root first
    fraction: np.ndarray  # per sampled input: share of blocks that fired

    @property
    def mean_fraction(self) -> float:
        return float(self.fraction.mean())

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.fraction, q))


def tree_blocks(spec: ThresholdTreeBlock) -> int:
    return sum(spec.branching**level for level in range(spec.levels))


@lru_cache(maxsize=256)
def firing_sample(spec: ThresholdTreeBlock, seed: int) -> FiringSample:
    rng = np.random.default_rng(seed)
    b = spec.branching
    hard = rng.random(spec.samples) < spec.hard_fraction
    concentration = np.where(hard, spec.concentration_hard, spec.concentration_easy)
    rates = np.ones((spec.samples, 1))  # level 0: the root always fires
    per_level = [1.0]
    fired = np.ones(spec.samples)
    for _ in range(1, spec.levels):
        # Dirichlet(c) shares per parent, via normalised Gamma(c) draws.
        gammas = rng.gamma(np.repeat(concentration[:, None], rates.shape[1] * b, axis=1))
        shares = gammas.reshape(spec.samples, -1, b)
        shares /= shares.sum(axis=2, keepdims=True)
        children = (rates[:, :, None] * shares).reshape(spec.samples, -1)
        active = children > spec.threshold
        rates = np.where(active, children, 0.0)  # a silent block passes nothing on
        per_level.append(float(active.sum(axis=1).mean()))
        fired += active.sum(axis=1)
    return FiringSample(tree_blocks(spec), tuple(per_level), fired / tree_blocks(spec))


def request_compute_scales(share: float, profile: FiringSample, count: int, seed: int) -> np.ndarray:
    """Per-request compute relative to the mean, for a model whose compute depends on the input
    (`share` and `profile` as input_dependent_share gives them)."""
    draws = np.random.default_rng(seed).choice(profile.fraction, size=count) / profile.mean_fraction
    return (1.0 - share) + share * draws
