"""Width slices of an anytime supernet (TIPS, Li et al. 2023, arXiv 2305.08021), the importance
of each slice from the paper's Markov-chain model of training, and the sandwich a step trains.

A sub-network of width w keeps round(w * c) of every channel count and hidden width, except the
model's own input (the first block's input) and output (the last block's output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simcc.model.graph import Block, Unit, inference_units
from simcc.specs.blocks import ConvBlock, DenseFFNBlock, MLPBlock
from simcc.specs.workload import AnytimeSpec, Workload


def _scaled(count: int, width: float) -> int:
    return max(1, int(round(count * width)))


def _scale_block(block: Block, width: float, keep_input: bool, keep_output: bool) -> Block:
    spec = block.spec
    if isinstance(spec, ConvBlock):
        channels_in = spec.in_channels if keep_input else _scaled(spec.in_channels, width)
        channels_out = spec.out_channels if keep_output else _scaled(spec.out_channels, width)
        depthwise = spec.groups == spec.in_channels
        groups = channels_in if depthwise else int(np.gcd(np.gcd(spec.groups, channels_in), channels_out))
        spec = spec.model_copy(update={"in_channels": channels_in, "out_channels": channels_out, "groups": groups})
    elif isinstance(spec, MLPBlock):
        widths = list(spec.widths)
        scaled = [_scaled(w, width) for w in widths]
        if keep_input:
            scaled[0] = widths[0]
        if keep_output:
            scaled[-1] = widths[-1]
        spec = spec.model_copy(update={"widths": scaled})
    elif isinstance(spec, DenseFFNBlock):
        spec = spec.model_copy(update={"hidden": _scaled(spec.hidden, width)})
    return Block(block.kind, spec, block.index)


def scale_units(units: list[Unit], width: float) -> list[Unit]:
    if width == 1.0:
        return units
    flat = [b for u in units for b in u.blocks]
    first, last = flat[0].index, flat[-1].index
    return [Unit(tuple(_scale_block(b, width, b.index == first, b.index == last) for b in u.blocks)) for u in units]


def served_units(workload: Workload) -> list[Unit]:
    """The units a workload serves with: an anytime network at its fixed width, or whole when a
    latency budget picks a width per request (any request may need any slice of the supernet)."""
    units = inference_units(workload.model)  # training-only blocks (MTP) are not served
    spec = workload.anytime
    if spec is None or spec.serve_latency_budget_s is not None:
        return units
    return scale_units(units, spec.fixed_serve_width)


@dataclass(frozen=True)
class PathScores:
    """TIPS' importance of each sub-network (width slice), smallest first."""

    widths: tuple[float, ...]
    stationary: tuple[float, ...]  # the training DTMC's stationary mass on each sub-network; sums to 1
    sampling: tuple[float, ...]  # draw probabilities of the widths between the ends: stationary, renormalised


def hyper_adjacency(widths: tuple[float, ...], coupling: float) -> tuple[np.ndarray, np.ndarray]:
    """TIPS' hyper-adjacency matrix H(lambda) for nested width slices, and the sub-network each
    state belongs to.

    Paper (Li et al. 2023, Sec. 3, Fig. 2): feature maps are nodes, operations edges; each
    sub-network's adjacency matrix is a diagonal block, and coupling blocks (weight lambda) join the
    copies of a node that two sub-networks share. Assumed here, for width slices: one
    representative sliced layer, whose input and output channels are the nodes and whose weights
    are the edges; channels are lumped into the groups each width adds (group g holds the
    widths[g] - widths[g-1] share of the channels; weights between groups a and b number
    share_a x share_b, in units of the layer's channel count). Sub-network k holds groups 0..k.
    """
    shares = np.diff((0.0,) + tuple(widths))
    states = [(k, side, g) for k in range(len(widths)) for side in (0, 1) for g in range(k + 1)]
    index = {state: i for i, state in enumerate(states)}
    matrix = np.zeros((len(states), len(states)))
    for (k, side, g), i in index.items():
        for b in range(k + 1):  # the weights of sub-network k from (or to) this group
            matrix[i, index[(k, 1 - side, b)]] = shares[g] * shares[b]
        for other in range(g, len(widths)):  # this group's copies in the other sub-networks that hold it
            if other != k:
                matrix[i, index[(other, side, g)]] = coupling * shares[g]
    return matrix, np.array([k for k, _, _ in states])


def stationary(transition: np.ndarray) -> np.ndarray:
    """pi with pi P = pi and sum(pi) = 1, by a linear solve (the chain may be periodic, so no
    power iteration)."""
    size = len(transition)
    system = np.vstack([transition.T - np.eye(size), np.ones(size)])
    target = np.zeros(size + 1)
    target[-1] = 1.0
    return np.linalg.lstsq(system, target, rcond=None)[0]


def path_scores(spec: AnytimeSpec) -> PathScores:
    """Each sub-network's TIPS importance: the stationary mass of the random walk over H(lambda)
    (the DTMC the paper builds from it, P = D^-1 H) on that sub-network's block.

    Paper: TIPS models AnytimeNN training as this DTMC and scores nodes by their accumulated
    stationary probability (TAS) and paths by their nodes' scores (TPS); sub-networks holding
    high-scoring paths are sampled more often. Assumed: a width slice's score is its block's
    stationary mass (the sum of its nodes' stationary probabilities, in that sub-network's copy),
    and the sandwich's middle draws use those masses renormalised over the middle widths.
    """
    matrix, owner = hyper_adjacency(tuple(spec.widths), spec.coupling)
    pi = stationary(matrix / matrix.sum(axis=1, keepdims=True))
    mass = np.array([pi[owner == k].sum() for k in range(len(spec.widths))])
    mass /= mass.sum()
    middle = mass[1:-1]
    return PathScores(tuple(spec.widths), tuple(float(m) for m in mass),
                      tuple(float(m) for m in middle / middle.sum()) if len(middle) else ())


def _middle_weights(spec: AnytimeSpec) -> np.ndarray:
    """The user's importance when given (measured scores, an ablation), else TIPS' computed ones."""
    if spec.importance is None:
        return np.array(path_scores(spec).sampling)
    weights = np.array(spec.importance, dtype=float)
    return weights / weights.sum()


def sandwich(spec: AnytimeSpec, step: int | None, seed: int) -> list[float]:
    """Widths trained in one step: the largest, the smallest, then sampled by importance (a
    given step's draw), or the most important ones when no step is named."""
    chosen = [spec.widths[-1], spec.widths[0]]
    extra = spec.subnets_per_step - 2
    if extra <= 0:
        return chosen
    middle = list(spec.widths[1:-1])
    weights = _middle_weights(spec)
    if step is None:
        order = list(np.argsort(-weights, kind="stable"))
        return chosen + [middle[order[i % len(order)]] for i in range(extra)]
    rng = np.random.default_rng(seed * 7919 + 1 + step)
    return chosen + [float(w) for w in rng.choice(middle, size=extra, p=weights)]


def expected_sandwich(spec: AnytimeSpec) -> list[tuple[float, float]]:
    """(width, expected times trained per step), for reporting model FLOPs."""
    extra = spec.subnets_per_step - 2
    middle = [(float(w), extra * p) for w, p in zip(spec.widths[1:-1], _middle_weights(spec))] if extra > 0 else []
    return [(spec.widths[-1], 1.0), (spec.widths[0], 1.0)] + middle
