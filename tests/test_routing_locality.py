"""Consecutive tokens reuse experts (load.consecutive_overlap; Jiang et al. 2024, Mixtral of Experts,
table 5): the share of consecutive picks that overlap comes out as asked, the stay probability by
hand, the cache policies that live on recency gain from it, and the refusals."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from simcc.layout import build_layout
from simcc.plan.serving import serving_costs
from simcc.routing.locality import StepRouting, next_picks, stay_probability
from simcc.specs.blocks import MoEFFNBlock, independent_overlap
from simcc.specs.loader import load_hardware, load_workload

EDGE = "mixtral_8x7b_serve_edge"  # 32 x (8 experts, top-2); the shipped workload sets 0.54
LOAD = "model.blocks.1.blocks.1.moe_ffn.load.consecutive_overlap"


def _block(overlap: float | None, experts: int = 8, k: int = 2) -> MoEFFNBlock:
    return MoEFFNBlock(experts=experts, k=k, expert_hidden=64, routing={"dropless": True, "capacity_factor": None},
                       load={"consecutive_overlap": overlap})


def test_independent_overlap_and_stay_probability_by_hand():
    # 2 of 8: 1 - C(6,2)/C(8,2) = 1 - 15/28 (the paper's "approximately 46%")
    assert independent_overlap(8, 2) == pytest.approx(1 - 15 / 28)
    assert independent_overlap(128, 8) == pytest.approx(1 - math.comb(120, 8) / math.comb(128, 8))
    assert independent_overlap(4, 3) == 1.0  # two picks of 3 of 4 always meet
    # overlap = stay + (1 - stay) q  =>  stay = (0.54 - 13/28) / (15/28)
    assert stay_probability(_block(0.54)) == pytest.approx((0.54 - 13 / 28) / (15 / 28))
    assert stay_probability(_block(None)) == 0.0


@pytest.mark.parametrize("overlap", [None, 0.62, 0.9])
def test_consecutive_picks_overlap_as_asked(overlap):
    spec = _block(overlap)
    rng = np.random.default_rng(1)
    logs = np.log(np.full((1, 8), 1 / 8))
    stays = np.array([stay_probability(spec)])
    # 20,000 sequences, one layer: each sequence's two tokens
    first = next_picks(None, logs, 2, stays, rng, 20_000)
    second = next_picks(first, logs, 2, stays, rng, 20_000)
    assert all(len(set(row)) == 2 for row in second[0])  # k distinct experts
    shared = np.mean([bool(set(a) & set(b)) for a, b in zip(first[0], second[0])])
    target = independent_overlap(8, 2) if overlap is None else overlap
    assert shared == pytest.approx(target, abs=0.015)


def test_prefill_draws_as_before_and_restarts_the_sequences():
    spec = _block(0.9)
    popularity = np.full(8, 1 / 8)
    routing = StepRouting([spec], [popularity], np.random.default_rng(3))
    routing.decode(4)
    assert routing.previous[(8, 2)] is not None and routing.previous[(8, 2)].shape == (1, 4, 2)
    routing.prefill(3)
    assert routing.previous == {(8, 2): None}  # a new request's first token follows no decode
    expected = np.flatnonzero(np.random.default_rng(3).multinomial(3 * 2, popularity))
    fresh = StepRouting([spec], [popularity], np.random.default_rng(3))
    assert np.array_equal(fresh.prefill(3)[0], expected)  # a multinomial over the tokens' picks


def _hit_rate(*sets: str) -> float:
    workload, source = load_workload(EDGE, list(sets))
    system = load_hardware("jetson_agx_orin")
    costs = serving_costs(workload, system, build_layout(workload, system, source))
    assert costs.cache is not None
    return costs.cache.hit_rate


def test_lru_gains_from_reuse_lfu_less():
    """Independent picks give every policy about the same hits; reuse lifts LRU, which keeps what
    the last tokens used, more than LFU, which keeps what was used most over the run."""
    per_layer = ["serve.expert_cache.per_layer=4"]
    independent = f"{LOAD}={independent_overlap(8, 2)}"  # each token 2 distinct experts, no reuse
    lru_none = _hit_rate(*per_layer, independent)
    lfu_none = _hit_rate(*per_layer, "serve.expert_cache.policy=lfu", independent)
    lru_high = _hit_rate(*per_layer, f"{LOAD}=0.9")
    lfu_high = _hit_rate(*per_layer, "serve.expert_cache.policy=lfu", f"{LOAD}=0.9")
    assert abs(lru_none - lfu_none) < 0.03
    assert lru_high > lru_none + 0.1
    assert lru_high - lru_none > lfu_high - lfu_none
    # the global cache (no expert_cache section) gains too
    assert _hit_rate(f"{LOAD}=0.9") > _hit_rate(independent) + 0.05
    # and so does the shipped figure, a little: a step's expected misses per layer, by hand,
    # stay x 4/7 + (1 - stay) x 1 = 0.92 against 1.0 with no reuse
    assert _hit_rate(*per_layer, f"{LOAD}=0.54") > lru_none


@pytest.mark.parametrize("value,expected", [
    ("0.3", "is below 0.464"),
    ("1.5", "less than or equal to 1"),
])
def test_bad_overlap_is_refused_in_one_line(value, expected):
    result = subprocess.run([sys.executable, "-m", "simcc", "estimate", EDGE, "--hardware", "jetson_agx_orin",
                             "--set", f"{LOAD}={value}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("overlap", [independent_overlap(8, 2), 0.9])
def test_a_decode_step_s_loads_by_hand(overlap):
    """Per-layer LRU of 4 of 8 experts at batch 1: the kept expert was used last step, so it is
    cached; the other pick is one of the 7 left, 3 of them cached. Expected misses per layer:
    stay x 4/7 + (1 - stay) x (2 x 4/8); each loads one expert over the storage link."""
    workload, source = load_workload(EDGE, ["serve.expert_cache.per_layer=4", f"{LOAD}={overlap}"])
    system = load_hardware("jetson_agx_orin")
    costs = serving_costs(workload, system, build_layout(workload, system, source))
    assert costs.cache is not None
    stay = (overlap - independent_overlap(8, 2)) / (1 - independent_overlap(8, 2))
    misses = stay * 4 / 7 + (1 - stay) * 1.0
    expected = 32 * misses * costs.expert_bytes / costs.storage_bandwidth
    assert costs.cache.decode_load_seconds[0] == pytest.approx(expected, rel=0.05)
