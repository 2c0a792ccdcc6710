"""Gating policies, run for real on sampled router logits.

Logits are log(popularity) plus Gumbel noise per token and expert (scaled by the router
temperature). At temperature 1 a top-1 router then picks expert e with probability exactly its
popularity p_e, and top-k samples k distinct experts in proportion to p (the Gumbel-top-k
construction, Kool et al. 2019): so a Zipf or CV popularity describes the load the router
produces, which is what measured load skew is fitted to. Each policy routes `sample_tokens`
tokens; what it measures there (each expert's share of the assignments, experts per token,
whether counts are fixed by construction) drives the per-rank load draws of the full batch in
routing/load.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from simcc.errors import InputError
from simcc.isotonic import isotonic
from simcc.routing.trained_gate import GateTraining, train_gate
from simcc.routing.trained_load import trained_load_share
from simcc.specs.tables import read_numeric_csv
from simcc.specs.blocks import MoEFFNBlock
from simcc.specs.vocab import GATELESS_POLICIES, K_PER_TOKEN_POLICIES


# The policies and what each parameter does: specs/vocab.py GATING_POLICIES (`simcc list`).


@dataclass(frozen=True)
class RoutingSample:
    share: np.ndarray  # [E] each expert's share of the assignments
    experts_per_token: float  # assignments per token before capacity
    exact: bool  # per-expert counts are fixed by the policy (no sampling noise)
    no_expert_fraction: float  # tokens that no expert takes (expert choice)


def read_expert_column(path: str, column: str, experts: int, field: str) -> np.ndarray:
    """One numeric column, one row per expert, from a user's CSV."""
    values = read_numeric_csv(path, {column: 0}, named_by=field)[column]
    if len(values) != experts:
        raise InputError(path, column, f"expected {experts} rows (one per expert), got {len(values)}")
    return values.to_numpy(dtype=float)


def popularity(spec: MoEFFNBlock, rng: np.random.Generator) -> np.ndarray:
    """Each expert's expected share of the router's preference."""
    experts, load = spec.experts, spec.load
    if load.distribution == "uniform":
        weights = np.ones(experts)
    elif load.distribution == "zipf":
        weights = 1.0 / np.arange(1, experts + 1) ** load.alpha
        rng.shuffle(weights)  # hot experts land on random ranks
    elif load.distribution == "histogram":
        weights = read_expert_column(str(load.histogram), "tokens", experts, "load.histogram") + 1e-12
    elif load.distribution == "trained":  # a top-1 router's preference in proportion to the load
        weights = trained_load_share(load, experts, rng)
    else:
        assert load.distribution == "cv", "aux_loss popularity comes from the trained gate (trained_gate_share)"
        cv = load.cv
        # Log-normal popularity: CV = sqrt(exp(sigma^2) - 1)  =>  sigma = sqrt(ln(1 + CV^2)).
        weights = rng.lognormal(0.0, math.sqrt(math.log1p(cv**2)), experts)
    return weights / weights.sum()


def _logits(popular: np.ndarray, tokens: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    return np.log(popular) + temperature * rng.gumbel(size=(tokens, popular.size))


def _add_gate_noise(logits: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Shazeer et al. 2017, eq. 4: H(x) = x Wg + N(0,1) * softplus(x Wnoise). Both gate matrices
    start at zero (appendix A, so that expert loads start roughly equal), so every expert's noise
    scale is softplus(0) = ln 2: the noise spreads tokens and favours no expert, where a random
    noise projection would."""
    return logits + noise_std * math.log(2.0) * rng.standard_normal(logits.shape)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores in each row."""
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _counts(chosen: np.ndarray, experts: int) -> np.ndarray:
    return np.bincount(chosen.ravel(), minlength=experts).astype(float)


def trained_gate_share(spec: MoEFFNBlock, expert_params: float, seed: int) -> np.ndarray:
    """Each expert's share of the assignments once a noisy top-k gate of this layer's shape has
    been trained with the workload's importance and load loss weights (routing/trained_gate.py).
    The paper's gate has noise; a gate without it (topk) trains as noisy_topk at scale 1."""
    load = spec.load
    assert load.train_tokens is not None and expert_params > 0
    noise_std = spec.gating.noise_std if spec.gating.policy == "noisy_topk" else 1.0
    training = GateTraining(spec.experts, spec.k, load.w_importance, load.w_load, noise_std, expert_params,
                            load.train_tokens * spec.k / spec.experts, seed)
    return train_gate(training).share


def route(spec: MoEFFNBlock, ranks: int, seed: int, expert_params: float = 0.0) -> RoutingSample:
    """Route a sample of tokens with the layer's policy and measure the result.

    With uniform popularity the experts are exchangeable, so each expert's expected share is
    exactly 1/E: the sample's own noise would otherwise act as a fixed router bias every step.
    An aux-loss gate is trained (`expert_params`: one expert's parameters); a k-per-token policy
    then routes with exactly the trained gate's shares, and any other takes them as popularity."""
    if spec.gating.policy == "round_robin":  # every expert exactly T*k/E copies, by construction
        return RoutingSample(np.full(spec.experts, 1.0 / spec.experts), float(spec.k), True, 0.0)
    uniform = spec.load.distribution == "uniform" and spec.gating.policy != "hash"
    if uniform and spec.gating.policy in K_PER_TOKEN_POLICIES:
        # Nothing to measure: every token takes k experts and each expert gets 1/E of them. This
        # skips a tokens x experts logit sample, most of a cold estimate of a 256-expert model.
        return RoutingSample(np.full(spec.experts, 1.0 / spec.experts), float(spec.k), False, 0.0)
    if spec.load.distribution == "trained" and spec.gating.policy in K_PER_TOKEN_POLICIES:
        # the published statistics describe the load itself, not a preference to route by
        return RoutingSample(trained_load_share(spec.load, spec.experts, np.random.default_rng(seed)),
                             float(spec.k), False, 0.0)
    if spec.load.distribution == "aux_loss":
        trained = trained_gate_share(spec, expert_params, seed)
        if spec.gating.policy in K_PER_TOKEN_POLICIES:
            return RoutingSample(trained, float(spec.k), False, 0.0)
        popular = trained + 1e-12  # a top-1 preference in proportion to the trained load
        return _route_sample(spec, ranks, np.random.default_rng(seed), popular / popular.sum())
    rng = np.random.default_rng(seed)
    popular = popularity(spec, rng)  # read once: a histogram comes from the user's file
    profile = _route_sample(spec, ranks, rng, popular)
    if uniform:
        return RoutingSample(np.full(spec.experts, 1.0 / spec.experts), profile.experts_per_token,
                              profile.exact, profile.no_expert_fraction)
    if spec.gating.policy in POPULARITY_MONOTONE_POLICIES:
        return replace(profile, share=_smoothed(profile.share, popular))
    return profile


# Policies under which an expert's expected share only rises with its popularity (each token ranks
# experts by log popularity plus noise that treats all experts alike).
POPULARITY_MONOTONE_POLICIES = ("topk", "noisy_topk", "switch", "moefication", "gshard")


def _smoothed(share: np.ndarray, popular: np.ndarray) -> np.ndarray:
    """The sample's shares as the non-decreasing function of popularity closest to them. A sample
    of T tokens gives each share a noise of about sqrt(share / (T k)); left in, that noise would
    be one fixed router bias in every simulated step, while the policy itself cannot favour a less
    popular expert. Experts of equal popularity get equal shares."""
    levels, group = np.unique(popular, return_inverse=True)  # sorted popularity levels
    sizes = np.bincount(group, minlength=levels.size).astype(float)
    means = np.bincount(group, weights=share, minlength=levels.size) / sizes
    fitted = np.asarray(isotonic(means.tolist(), sizes.tolist()))[group]
    return fitted / fitted.sum()


def _route_sample(spec: MoEFFNBlock, ranks: int, rng: np.random.Generator, popular: np.ndarray) -> RoutingSample:
    """The policy run on `gating.sample_tokens` tokens whose router prefers experts by `popular`."""
    gating, experts, k = spec.gating, spec.experts, spec.k
    tokens = gating.sample_tokens
    policy = gating.policy
    if policy == "hash":
        # Token ids follow Zipf(token_zipf) over the vocabulary; a fixed multiplicative hash picks the expert.
        ranks_by_freq = np.arange(1, gating.vocab + 1, dtype=float) ** -gating.token_zipf
        ids = rng.choice(gating.vocab, size=tokens, p=ranks_by_freq / ranks_by_freq.sum())
        chosen = ((ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)) % np.uint64(experts)
        counts = _counts(chosen.astype(np.int64), experts)
        return RoutingSample(counts / counts.sum(), 1.0, False, 0.0)
    if policy == "hierarchical":
        return _hierarchical_sample(spec, ranks, rng, popular)
    if policy in ("topk", "noisy_topk", "switch", "moefication", "gshard"):
        # Each token routes alone: the sample runs in blocks of tokens, so its memory is bounded
        # whatever the expert count (one block, and the same draws, below SAMPLE_ELEMENTS).
        counts, second_kept = np.zeros(experts), 0.0
        block = max(1, SAMPLE_ELEMENTS // experts)
        for start in range(0, tokens, block):
            logits = _logits(popular, min(block, tokens - start), spec.load.router_temperature, rng)
            if policy == "noisy_topk":
                logits = _add_gate_noise(logits, gating.noise_std, rng)
            if policy == "gshard":
                block_counts, kept = _gshard_counts(logits, experts, rng)
                counts += block_counts
                second_kept += kept
            else:
                counts += _counts(_top(logits, k), experts)
        per_token = 1.0 + second_kept / tokens if policy == "gshard" else float(k)
        return RoutingSample(counts / counts.sum(), per_token, False, 0.0)
    logits = _logits(popular, tokens, spec.load.router_temperature, rng)
    if policy == "expert_choice":
        assert spec.routing.capacity_factor is not None
        capacity = max(1, int(spec.routing.capacity_factor * tokens * k / experts))
        scores = _softmax(logits)
        picks = np.argpartition(-scores, capacity - 1, axis=0)[:capacity, :]  # each column: an expert's tokens
        per_token = np.bincount(picks.ravel(), minlength=tokens)
        share = np.full(experts, 1.0 / experts)
        return RoutingSample(share, capacity * experts / tokens, True, float((per_token == 0).mean()))
    assert policy == "base"
    share = _balanced_assignment(logits, rng)
    return RoutingSample(share, 1.0, True, 0.0)


SAMPLE_ELEMENTS = 1 << 22  # logits one block of the routing sample holds (32 MB of float64)


def _gshard_counts(logits: np.ndarray, experts: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """GShard's top-2 (Lepikhin et al. 2020, Algorithm 1): the first expert always, the second
    with probability 2 x its gate. Returns the counts and how many second choices were kept."""
    top2 = _top(logits, 2)
    gates = _softmax(np.take_along_axis(logits, top2, axis=1))
    first = np.where(gates[:, 0] >= gates[:, 1], top2[:, 0], top2[:, 1])
    second = np.where(gates[:, 0] >= gates[:, 1], top2[:, 1], top2[:, 0])
    keep = rng.random(len(logits)) < np.minimum(1.0, 2.0 * gates.min(axis=1))
    return _counts(first, experts) + _counts(second[keep], experts), float(keep.sum())


def _hierarchical_sample(spec: MoEFFNBlock, ranks: int, rng: np.random.Generator, popular: np.ndarray) -> RoutingSample:
    """Shazeer et al. 2017, sec. B: a primary gate over groups, then a secondary gate inside each
    chosen group. Only the chosen groups' secondary logits are drawn (each token's logits are
    independent draws, so the others would never be read): memory grows with the group size,
    not the expert count, and blocks of tokens bound it."""
    gating, experts, k = spec.gating, spec.experts, spec.k
    groups = gating.groups or ranks
    per_group = experts // groups
    within = popular.reshape(groups, per_group)
    group_popularity = within.sum(axis=1)
    inner_k = k // gating.k_primary
    temperature = spec.load.router_temperature
    counts = np.zeros(experts)
    block = max(1, SAMPLE_ELEMENTS // max(groups, per_group))
    for start in range(0, gating.sample_tokens, block):
        tokens = min(block, gating.sample_tokens - start)
        primary_logits = _logits(group_popularity, tokens, temperature, rng)
        if gating.noisy:
            primary_logits = _add_gate_noise(primary_logits, gating.noise_std, rng)
        primary = _top(primary_logits, gating.k_primary)
        for slot in range(gating.k_primary):
            group = primary[:, slot]
            inner = np.log(within[group]) + temperature * rng.gumbel(size=(tokens, per_group))
            if gating.noisy:
                inner = _add_gate_noise(inner, gating.noise_std, rng)
            counts += _counts(group[:, None] * per_group + _top(inner, inner_k), experts)
    return RoutingSample(counts / counts.sum(), float(k), False, 0.0)


def _balanced_assignment(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Greedy balanced assignment (a stand-in for BASE's auction): take (token, expert) pairs by
    score, each token once, each expert up to T/E tokens. Every expert ends with exactly T/E."""
    tokens, experts = logits.shape
    tokens -= tokens % experts
    capacity = tokens // experts
    order = np.argsort(-logits[:tokens].ravel(), kind="stable")
    taken = np.zeros(tokens, dtype=bool)
    load = np.zeros(experts, dtype=int)
    for flat in order:
        token, expert = divmod(int(flat), experts)
        if not taken[token] and load[expert] < capacity:
            taken[token] = True
            load[expert] += 1
            if load.sum() == tokens:
                break
    return load / load.sum()


def router_products(spec: MoEFFNBlock, ranks: int) -> list[tuple[str, int, int]]:
    """The gate's matrix products per token: (name, tokens multiplier, output width)."""
    policy = spec.gating.policy
    if policy in GATELESS_POLICIES:
        return []  # a table lookup or a fixed rule, no product
    if policy == "noisy_topk":
        return [("moe.router", 1, spec.experts), ("moe.router_noise", 1, spec.experts)]
    if policy == "hierarchical":
        groups = spec.gating.groups or ranks
        gates = [("moe.router_primary", 1, groups), ("moe.router_secondary", spec.gating.k_primary, spec.experts // groups)]
        if spec.gating.noisy:  # each gate gets its noise projection
            gates += [(name + "_noise", times, width) for name, times, width in gates]
        return gates
    return [("moe.router", 1, spec.experts)]
