"""Expert load of a router trained to balance, from published load statistics.

A trained router is not balanced: some experts keep more tokens than others even when a balance
loss or a bias pulls them together, and a micro-batch's content (one document's topic) makes its
own hot experts, so the busiest expert-parallel rank of a step carries well above the mean.

Each expert's share of one layer's micro-batch is modelled as log-normal. By default its spread
sigma is set so that the expected busiest rank of the published run is the published max over mean,
measured per layer and micro-batch in Megatron-LM training with the router left to itself (Wei et
al. 2026, "UltraEP", arXiv 2606.04101, fig. 11: the Megatron-LM baselines without a balancer, the
per-rank max over mean of routed assignments averaged over layers and micro-batches, as the
authors' repository Dots-Infra/UltraEP publishes the figure and computes the ratio, load_viewer.py):

    auxiliary loss:   Qwen3-235B-A22B, 128 experts on 64 ranks (2 per rank): 2.86
    loss-free bias:   DeepSeek-V3, 256 experts on 64 ranks (4 per rank):     1.30

The same sigma then describes a layer of any expert count and any rank count: fewer, larger
ranks average more experts each, so they are closer to the mean (the same Qwen3 router on 8 ranks
of 16 experts comes out about 1.3). Each layer draws its own shares (its own hot experts), and
each step's multinomial draw of the batch over them (routing/load.py) adds the batch's sampling
noise, so a dropless run waits for its busiest rank and a capacity-bound run drops what its
busiest experts cannot take.

A user's own figure is the max-over-mean excess over 64 experts across a validation set (MaxVio,
Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", arXiv
2408.15664, Table 2: 0.52 with an auxiliary loss, 0.04 with the loss-free bias, for DeepSeekMoE
3B). Such a set-wide figure averages the micro-batches' topics away, so it describes a router
whose micro-batches are as balanced as the whole set, smaller than a step sees (Qiu et al. 2025,
arXiv 2501.11873, sec. 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simcc.specs.blocks import LoadSpec


@dataclass(frozen=True)
class RankImbalance:
    """A published busiest-rank load over the mean rank's, per layer and micro-batch, and the
    layout it was measured on."""
    max_over_mean: float
    experts: int
    ranks: int


# UltraEP (arXiv 2606.04101) fig. 11, the no-balancing baselines of its Megatron-LM training runs.
PUBLISHED_RANK_IMBALANCE = {"aux_loss": RankImbalance(2.86, experts=128, ranks=64),
                            "aux_loss_free": RankImbalance(1.30, experts=256, ranks=64)}
REFERENCE_EXPERTS = 64  # the experts a user's MaxVio is measured over (Wang et al. 2024)
# Layers of standard-normal draws the rank calibration averages over: the same draws at every
# sigma (common random numbers), so the ratio rises smoothly with sigma and bisection is exact.
CALIBRATION_LAYERS = 1000


def expected_max_over_mean(sigma: float, experts: int) -> float:
    """E[max of `experts` log-normal(0, sigma) draws] over their mean exp(sigma^2 / 2), by
    quadrature over the standard normal: the max of n draws has density n phi(z) Phi(z)^(n-1)."""
    z = np.linspace(-8.0, 8.0, 4001)
    phi = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2)))
    density = experts * phi * cdf ** (experts - 1)
    return float(np.trapezoid(np.exp(sigma * z) * density, z) / math.exp(sigma * sigma / 2))


@lru_cache(maxsize=64)
def spread_for(violation: float) -> float:
    """The log-normal sigma whose expected max over REFERENCE_EXPERTS is 1 + violation times the
    mean (bisection: the ratio rises with sigma); no excess is no spread, exactly."""
    if violation <= 0.0:
        return 0.0
    return _sigma_reaching(lambda sigma: expected_max_over_mean(sigma, REFERENCE_EXPERTS), 1.0 + violation, 60)


def _sigma_reaching(ratio: Callable[[float], float], target: float, halvings: int) -> float:
    """The log-normal sigma in [0, 4] at which `ratio` (rising with sigma) reaches `target`, by
    `halvings` bisection steps."""
    low, high = 0.0, 4.0
    for _ in range(halvings):
        middle = (low + high) / 2
        if ratio(middle) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def expected_busiest_rank(sigma: float, imbalance: RankImbalance) -> float:
    """Mean over layers of the busiest rank's summed log-normal shares over the mean rank's, with
    `imbalance.experts` experts spread evenly over `imbalance.ranks` ranks."""
    shares = np.exp(sigma * _normal_draws(imbalance.experts))
    per_rank = shares.reshape(CALIBRATION_LAYERS, imbalance.ranks, -1).sum(axis=2)
    return float((per_rank.max(axis=1) / per_rank.mean(axis=1)).mean())


@lru_cache(maxsize=4)
def _normal_draws(experts: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((CALIBRATION_LAYERS, experts))


@lru_cache(maxsize=8)
def spread_for_ranks(imbalance: RankImbalance) -> float:
    """The log-normal sigma whose expected busiest rank, on the published layout, is the
    published max over mean (bisection: the ratio rises with sigma), to 4e-6 of sigma."""
    return _sigma_reaching(lambda sigma: expected_busiest_rank(sigma, imbalance), imbalance.max_over_mean, 20)


def load_spread(load: LoadSpec) -> float:
    """The user's MaxVio's sigma if given, else the published run's for the balancing method."""
    if load.max_violation is not None:
        return spread_for(load.max_violation)
    return spread_for_ranks(PUBLISHED_RANK_IMBALANCE[load.balancing])


def trained_load_share(load: LoadSpec, experts: int, rng: np.random.Generator) -> np.ndarray:
    """One layer's expected share of the assignments per expert."""
    weights = rng.lognormal(0.0, load_spread(load), experts)
    return weights / weights.sum()
