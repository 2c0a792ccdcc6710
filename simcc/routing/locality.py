"""Consecutive tokens of one sequence reuse experts. Jiang et al. 2024 (Mixtral of Experts, arXiv
2401.04088, sec. 5, table 5) count how often a token and the next share an expert: at layers 15
and 31 well above what independent picks give. An expert cache lives on this: LRU keeps what the
last tokens used because the next one tends to want it again, and with independent picks every
policy hits k/E of the time. Serving's cache replay draws each step's experts here
(plan/serving.py)."""

from __future__ import annotations

import numpy as np

from simcc.specs.blocks import MoEFFNBlock, independent_overlap


def stay_probability(spec: MoEFFNBlock) -> float:
    """Chance a token keeps one of its predecessor's experts, so that consecutive tokens share at
    least one with the layer's `load.consecutive_overlap`: overlap = stay + (1 - stay) q, with q
    what independent uniform picks share (skewed popularity shares a little more)."""
    overlap = spec.load.consecutive_overlap
    independent = independent_overlap(spec.experts, spec.k)
    if overlap is None or independent >= 1.0:
        return 0.0
    return max(0.0, (overlap - independent) / (1.0 - independent))


def next_picks(previous: np.ndarray | None, popularity: np.ndarray, k: int, stay: float,
               rng: np.random.Generator, sequences: int) -> np.ndarray:
    """(sequences, k) experts of each sequence's next token: with probability `stay` one of its
    previous token's experts (uniformly) is kept and the others drawn by popularity without
    repeats, else all k drawn afresh. Gumbel top-k draws k distinct experts in proportion to
    popularity, for every sequence at once."""
    keys = np.log(popularity)[None, :] + rng.gumbel(size=(sequences, popularity.size))
    if previous is not None and stay > 0.0:
        keep = rng.random(sequences) < stay
        kept = previous[np.arange(sequences), rng.integers(previous.shape[1], size=sequences)]
        keys[keep, kept[keep]] = np.inf
    return np.argpartition(-keys, k - 1, axis=1)[:, :k]


class StepRouting:
    """Each MoE layer's needed experts, step by step, for one batch of sequences: a prefill draws
    its tokens' picks together (a multinomial over the layer's popularity, as before) and starts
    the sequences afresh; a decode step draws one token per sequence, after its previous one when
    the layer's tokens reuse experts. Layers without `consecutive_overlap` draw as a prefill does,
    from the same random stream in the same order."""

    def __init__(self, layers: list[MoEFFNBlock], popularities: list[np.ndarray], rng: np.random.Generator) -> None:
        self.layers, self.popularities, self.rng = layers, popularities, rng
        self.stays = [stay_probability(spec) for spec in layers]
        self.previous: list[np.ndarray | None] = [None for _ in layers]

    def prefill(self, tokens: int) -> list[np.ndarray]:
        self.previous = [None for _ in self.layers]
        return [np.flatnonzero(self.rng.multinomial(tokens * spec.k, p)) for spec, p in zip(self.layers, self.popularities)]

    def decode(self, sequences: int) -> list[np.ndarray]:
        needed = []
        for index, (spec, p, stay) in enumerate(zip(self.layers, self.popularities, self.stays)):
            if stay <= 0.0:
                needed.append(np.flatnonzero(self.rng.multinomial(sequences * spec.k, p)))
                continue
            picks = next_picks(self.previous[index], p, spec.k, stay, self.rng, sequences)
            self.previous[index] = picks
            needed.append(np.unique(picks))
        return needed
