"""Expert load of a router trained to balance, from published load statistics.

A trained router is not balanced: some experts keep more tokens than others even when a balance
loss or a bias pulls them together. Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts", arXiv 2408.15664, Table 2) measure it as MaxVio = max_i Load_i /
mean Load - 1 over the validation set, for DeepSeekMoE models with 64 routed experts, top-6:

    auxiliary loss (alpha 0.001):  0.72 (1B model), 0.52 (3B model)
    auxiliary-loss-free bias:      0.04 (1B and 3B)

Each expert's share of the load is modelled as log-normal, its spread sigma set so that the
expected busiest of the 64 reference experts is 1 + MaxVio times the mean (the larger, 3B model's
figure by default). The same sigma then describes a layer of any expert count: a layer with more
experts has a busier maximum, as the max of more draws. Each layer draws its own shares (its own
hot experts), and each step's multinomial draw of the batch over them (routing/load.py) adds the
batch's sampling noise, so a dropless run waits for its busiest rank and a capacity-bound run
drops what its busiest experts cannot take. Not modelled: loads shifting within a run (a batch's
topic), which makes small batches less balanced than the validation set (Qiu et al. 2025, arXiv
2501.11873, sec. 3).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from simcc.specs.blocks import LoadSpec

# MaxVio over the validation set, Wang et al. 2024 Table 2, 3B model (64 experts, top-6).
PUBLISHED_MAX_VIOLATION = {"aux_loss": 0.52, "aux_loss_free": 0.04}
REFERENCE_EXPERTS = 64  # the experts the published MaxVio was measured over


def max_violation(load: LoadSpec) -> float:
    """The user's MaxVio if given, else the published figure for the balancing method."""
    return load.max_violation if load.max_violation is not None else PUBLISHED_MAX_VIOLATION[load.balancing]


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
    low, high = 0.0, 4.0
    for _ in range(60):
        middle = (low + high) / 2
        if expected_max_over_mean(middle, REFERENCE_EXPERTS) < 1.0 + violation:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def trained_load_share(load: LoadSpec, experts: int, rng: np.random.Generator) -> np.ndarray:
    """One layer's expected share of the assignments per expert."""
    weights = rng.lognormal(0.0, spread_for(max_violation(load)), experts)
    return weights / weights.sum()
