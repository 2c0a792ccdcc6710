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


def next_picks(previous: np.ndarray | None, log_popularity: np.ndarray, k: int, stays: np.ndarray,
               rng: np.random.Generator, sequences: int) -> np.ndarray:
    """(layers, sequences, k) experts of each sequence's next token in each of a group of layers
    alike in experts and k (`log_popularity`: layers x experts): with the layer's probability in
    `stays` one of the sequence's previous experts (`previous`, uniformly among its k) is kept and
    the others drawn by popularity without repeats, else all k are drawn afresh. Gumbel top-k
    draws k distinct experts in proportion to popularity, for every layer and sequence at once."""
    layers, experts = log_popularity.shape
    keys = log_popularity[:, None, :] + rng.gumbel(size=(layers, sequences, experts))
    if previous is not None:
        keep = rng.random((layers, sequences)) < stays[:, None]
        chosen = rng.integers(previous.shape[2], size=(layers, sequences, 1))
        kept = np.take_along_axis(previous, chosen, axis=2)[..., 0]
        layer, sequence = np.nonzero(keep)
        keys[layer, sequence, kept[layer, sequence]] = np.inf
    return np.argpartition(-keys, k - 1, axis=2)[..., :k]


class StepRouting:
    """Each MoE layer's needed experts, step by step, for one batch of sequences: a prefill draws
    its tokens' picks together (a multinomial over the layer's popularity, as before) and starts
    the sequences afresh. In a layer with `consecutive_overlap` a decode step draws each
    sequence's token: k distinct experts, after its previous token's. A layer without it draws
    the step's batch x k picks as a prefill does, with replacement (at batch 1 and 2 of 8 experts,
    1.875 distinct where top-k picks 2), from the same random stream in the same order as before."""

    def __init__(self, layers: list[MoEFFNBlock], popularities: list[np.ndarray], rng: np.random.Generator) -> None:
        self.layers, self.popularities, self.rng = layers, popularities, rng
        stays = [stay_probability(spec) for spec in layers]
        per_sequence = [spec.load.consecutive_overlap is not None for spec in layers]
        self.independent = [i for i, drawn in enumerate(per_sequence) if not drawn]
        # layers drawn token by token, grouped by (experts, k) so one draw serves the group
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, (spec, drawn) in enumerate(zip(layers, per_sequence)):
            if drawn:
                self.groups.setdefault((spec.experts, spec.k), []).append(i)
        self.group_stays = {key: np.array([stays[i] for i in members]) for key, members in self.groups.items()}
        self.group_logs = {key: np.log(np.stack([popularities[i] for i in members]))
                           for key, members in self.groups.items()}
        self.previous: dict[tuple[int, int], np.ndarray | None] = {key: None for key in self.groups}

    def prefill(self, tokens: int) -> list[np.ndarray]:
        self.previous = {key: None for key in self.groups}
        return [np.flatnonzero(self.rng.multinomial(tokens * spec.k, p))
                for spec, p in zip(self.layers, self.popularities)]

    def decode(self, sequences: int) -> list[np.ndarray]:
        needed: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(self.layers)
        for i in self.independent:
            needed[i] = np.flatnonzero(self.rng.multinomial(sequences * self.layers[i].k, self.popularities[i]))
        for (experts, k), members in self.groups.items():
            picks = next_picks(self.previous[(experts, k)], self.group_logs[(experts, k)], k,
                               self.group_stays[(experts, k)], self.rng, sequences)
            self.previous[(experts, k)] = picks
            present = np.zeros((len(members), experts), dtype=bool)
            present[np.arange(len(members))[:, None, None], picks] = True
            for row, i in enumerate(members):
                needed[i] = np.flatnonzero(present[row])
        return needed
