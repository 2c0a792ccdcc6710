"""Input-dependent activation of threshold-gated block trees (Gallicchio & Nuti 2025, arXiv
2502.14788).

Each input carries a unit rate into the root block. An active block splits its rate among its
children with Dirichlet(concentration) shares: a small concentration (an easy input) sends
nearly all of it down one path, a large one (a hard input) spreads it evenly. A child fires when
its incoming rate exceeds the threshold. Counting the blocks that fire, over sampled inputs,
gives the expected and tail compute per input: cost = sum_i Pr(r_i > theta) * FLOPs_i.

The paper's remaining mechanisms change what is computed, not which blocks may fire:
- rays: paths sampled per input, each descending from the root into a child it may fire, chosen
  by the routing shares; the blocks computed are those the rays visit (fewer rays, fewer blocks);
- progressive thresholds: the input is evaluated at falling thresholds, an answer after each;
- reuse: a block's output computed for an earlier ray or threshold is kept; without it every
  visit computes again.
A batch reads the weights of the blocks that fire; its compute counts every computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simcc.specs.blocks import ThresholdTreeBlock


@dataclass(frozen=True)
class FiringSample:
    blocks: int  # blocks in the tree
    active_per_level: tuple[float, ...]  # mean distinct blocks fired at each level, root first (weights read)
    fraction: np.ndarray  # per sampled input: block computations over blocks in the tree
    computed_per_level: tuple[float, ...] = ()  # mean block computations at each level (reuse: the fired ones)

    @property
    def mean_fraction(self) -> float:
        return float(self.fraction.mean())

    @property
    def computations_per_level(self) -> tuple[float, ...]:
        return self.computed_per_level or self.active_per_level

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.fraction, q))


def tree_blocks(spec: ThresholdTreeBlock) -> int:
    return sum(spec.branching**level for level in range(spec.levels))


@lru_cache(maxsize=256)
def firing_sample(spec: ThresholdTreeBlock, seed: int) -> FiringSample:
    """Fired blocks and computations per level over sampled inputs, for the spec's threshold
    schedule; one draw of routing shares (and ray choices) serves every threshold of it."""
    rng = np.random.default_rng(seed)
    b = spec.branching
    hard = rng.random(spec.samples) < spec.hard_fraction
    concentration = np.where(hard, spec.concentration_hard, spec.concentration_easy)
    shares = []  # per level below the root: [samples, parents, b] Dirichlet(c) shares, via normalised Gamma(c)
    for level in range(1, spec.levels):
        gammas = rng.gamma(np.repeat(concentration[:, None], b**level, axis=1)).reshape(spec.samples, -1, b)
        shares.append(gammas / gammas.sum(axis=2, keepdims=True))
    choices = [rng.random((spec.samples, spec.rays)) for _ in shares] if spec.rays else []
    union = [np.ones((spec.samples, 1), dtype=bool)] + [np.zeros((spec.samples, b**level), dtype=bool)
                                                         for level in range(1, spec.levels)]
    visits = np.zeros((spec.samples, spec.levels))
    for threshold in (*spec.progressive, spec.threshold):
        fired, visited = _stage(spec, shares, choices, threshold)
        for level, mask in enumerate(fired):
            union[level] |= mask
        visits += visited
    distinct = np.stack([mask.sum(axis=1) for mask in union], axis=1).astype(float)
    computed = distinct if spec.reuse else visits
    return FiringSample(tree_blocks(spec), tuple(distinct.mean(axis=0).tolist()), computed.sum(axis=1) / tree_blocks(spec),
                        tuple(computed.mean(axis=0).tolist()))


def _stage(spec: ThresholdTreeBlock, shares: list[np.ndarray], choices: list[np.ndarray],
           threshold: float) -> tuple[list[np.ndarray], np.ndarray]:
    """One threshold's evaluation: per level the blocks fired (or visited by a ray) per input, and
    the computations per input and level (a block once per ray that visits it)."""
    samples, b = spec.samples, spec.branching
    rays = spec.rays or 1
    rates = np.ones((samples, 1))  # level 0: the root always fires
    fired = [np.ones((samples, 1), dtype=bool)]
    visits = np.zeros((samples, spec.levels))
    visits[:, 0] = rays if spec.rays else 1
    position = np.zeros((samples, rays), dtype=np.int64)  # each ray's block at the level; -1: stopped
    for level, share in enumerate(shares, start=1):
        children = (rates[:, :, None] * share).reshape(samples, -1)
        active = children > threshold
        rates = np.where(active, children, 0.0)  # a silent block passes nothing on
        if not spec.rays:
            fired.append(active)
            visits[:, level] = active.sum(axis=1)
            continue
        # Each live ray enters one of its block's firing children, by their routing shares.
        parent = np.maximum(position, 0)
        rows = np.arange(samples)[:, None]
        weight = share[rows, parent] * active.reshape(samples, -1, b)[rows, parent]  # [samples, rays, b]
        weight[position < 0] = 0.0
        total = weight.sum(axis=2)
        pick = (np.cumsum(weight, axis=2) < (choices[level - 1] * total)[:, :, None]).sum(axis=2)
        position = np.where(total > 0, parent * b + np.minimum(pick, b - 1), -1)
        mask = np.zeros((samples, b**level), dtype=bool)
        live = position >= 0
        mask[np.nonzero(live)[0], position[live]] = True
        fired.append(mask)
        visits[:, level] = live.sum(axis=1)
    return fired, visits


def request_compute_scales(share: float, profile: FiringSample, count: int, seed: int) -> np.ndarray:
    """Per-request compute relative to the mean, for a model whose compute depends on the input
    (`share` and `profile` as input_dependent_share gives them)."""
    draws = np.random.default_rng(seed).choice(profile.fraction, size=count) / profile.mean_fraction
    return (1.0 - share) + share * draws
