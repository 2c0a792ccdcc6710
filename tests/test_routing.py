"""Expert load sampling: conservation, capacity formula, skew."""

from __future__ import annotations

import math

import pytest

from simcc.routing.load import capacity_per_expert, expected_experts_touched, rank_loads
from simcc.specs.workload import MoEFFNBlock


def moe(**kw) -> MoEFFNBlock:
    base = dict(experts=64, k=2, expert_hidden=128)
    base.update(kw)
    return MoEFFNBlock(**base)


def test_switch_capacity_formula():
    spec = moe(capacity_factor=1.25, k=1)
    assert capacity_per_expert(spec, 1000, 1) == math.ceil(1.25 * 1000 / 64)
    assert capacity_per_expert(spec, 1000, 4) == 4 * math.ceil(1.25 * 1000 / 64)


def test_tokens_are_conserved_under_capacity():
    spec = moe(capacity_factor=1.0, load={"distribution": "zipf", "alpha": 1.0})
    loads = rank_loads(spec, 4096, 8, seed=3)
    computed = sum(loads.mean_rank) * 8
    capacity = capacity_per_expert(spec, 4096, 8)
    # every routed assignment is either computed (inside the padded buffers) or dropped
    assert computed == pytest.approx(64 * capacity)
    assert computed - loads.padded == pytest.approx(loads.routed - loads.dropped)
    assert loads.routed == 4096 * 2 * 8


def test_drops_fall_as_capacity_factor_rises():
    drops = [rank_loads(moe(capacity_factor=cf, load={"distribution": "zipf"}), 4096, 4, seed=1).dropped
             for cf in (0.5, 1.0, 1.25, 2.0, 4.0)]
    assert all(b <= a for a, b in zip(drops, drops[1:]))
    assert drops[0] > drops[-1]


def test_dropless_drops_nothing_and_rounds_to_blocks():
    loads = rank_loads(moe(dropless=True, capacity_factor=None), 1000, 4, seed=0)
    assert loads.dropped == 0
    assert all(t % 128 == 0 for t in rank_loads(moe(dropless=True, capacity_factor=None), 1000, 64, seed=0).busiest_rank)


def test_zipf_skew_raises_max_over_mean():
    uniform = rank_loads(moe(dropless=True, capacity_factor=None), 4096, 8, seed=2)
    skewed = rank_loads(moe(dropless=True, capacity_factor=None, load={"distribution": "zipf", "alpha": 1.2}), 4096, 8, seed=2)
    assert skewed.max_over_mean > uniform.max_over_mean
    assert sum(skewed.busiest_rank) > sum(uniform.busiest_rank)


def test_target_cv_is_reached():
    loads = rank_loads(moe(experts=256, dropless=True, capacity_factor=None, load={"distribution": "cv", "cv": 0.5}),
                       65536, 1, seed=4)
    assert loads.cv == pytest.approx(0.5, abs=0.15)


def test_balanced_convention_is_exact():
    loads = rank_loads(moe(), 4096, 8, seed=0, balanced=True)
    assert loads.busiest_rank == loads.mean_rank == tuple([4096 * 2 * 8 / 64] * 8)


def test_experts_touched_closed_form():
    spec = moe(experts=8, k=2)
    assert expected_experts_touched(spec, 1, 0) == pytest.approx(2.0)
    assert expected_experts_touched(spec, 3, 0) == pytest.approx(8 * (1 - (1 - 2 / 8) ** 3))
