"""Width slices of an anytime supernet (TIPS, Li et al. 2023) and the sandwich a step trains.

A sub-network of width w keeps round(w * c) of every channel count and hidden width, except the
model's own input (the first block's input) and output (the last block's output).
"""

from __future__ import annotations

import numpy as np

from simcc.model.graph import Block, Unit, units_of
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
    """The units a workload serves with: an anytime network at the width its budget allows."""
    units = units_of(workload.model)
    return scale_units(units, workload.anytime.serve_width) if workload.anytime is not None else units


def _middle_weights(spec: AnytimeSpec) -> np.ndarray:
    middle = len(spec.widths) - 2
    weights = np.array(spec.importance if spec.importance is not None else [1.0] * middle, dtype=float)
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
