"""Input-dependent computation: threshold-activated block trees (ray tracing)."""

from __future__ import annotations

import numpy as np
import pytest

from simcc.estimate import SimulationOptions, estimate
from simcc.routing.activation import activation_profile, request_compute_scales, tree_blocks
from simcc.specs.loader import load_hardware, load_workload
from simcc.specs.workload import ThresholdTreeBlock


def tree(**kw) -> ThresholdTreeBlock:
    base: dict = dict(widths=[64, 256, 64], branching=2, levels=5, threshold=0.1)
    base.update(kw)
    return ThresholdTreeBlock(**base)


def test_tree_size_and_root_always_fires():
    spec = tree(branching=3, levels=4)
    assert tree_blocks(spec) == 1 + 3 + 9 + 27
    profile = activation_profile(spec, 0)
    assert profile.active_per_level[0] == 1.0
    assert (profile.fraction >= 1 / 40).all() and (profile.fraction <= 1).all()


def test_harder_inputs_fire_more_blocks():
    easy = activation_profile(tree(hard_fraction=0.0), 0).mean_fraction
    mixed = activation_profile(tree(hard_fraction=0.3), 0).mean_fraction
    hard = activation_profile(tree(hard_fraction=1.0), 0).mean_fraction
    assert easy < mixed < hard


def test_a_higher_threshold_fires_fewer_blocks():
    fractions = [activation_profile(tree(threshold=t), 0).mean_fraction for t in (0.02, 0.1, 0.3, 1.0)]
    assert all(b < a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == pytest.approx(1 / tree_blocks(tree()))  # only the root


def test_expected_cost_is_fired_blocks_times_block_flops():
    workload, src = load_workload("ray_tracing_mlp_serve_rpi5")
    result = estimate(workload, load_hardware("raspberry_pi_5"), src, SimulationOptions(request_count=200))
    model = result.sections["model"]
    assert model["blocks_fired_mean"] < 0.5  # the paper: over 50% fewer parameters used on average
    assert model["blocks_fired_mean"] <= model["blocks_fired_p95"] <= model["blocks_fired_p99"]
    assert model["active_params_b"] < 0.5 * model["params_b"]


def test_request_compute_scales_average_one_and_widen_the_tail():
    workload, src = load_workload("ray_tracing_mlp_serve_rpi5")
    scales = request_compute_scales(workload.model, 20000, seed=1)
    assert scales is not None and np.mean(scales) == pytest.approx(1.0, rel=0.02)
    system = load_hardware("raspberry_pi_5")
    varied = estimate(workload, system, src, SimulationOptions(request_count=3000)).sections["latency"]
    steady_workload, _ = load_workload("ray_tracing_mlp_serve_rpi5",
                                       ["model.blocks.1.threshold_tree.concentration_easy=5.0", "model.blocks.1.threshold_tree.hard_fraction=1.0"])
    steady_scales = request_compute_scales(steady_workload.model, 20000, seed=1)
    assert np.std(steady_scales) < np.std(scales)
    assert varied["latency_p99_s"] > 1.5 * varied["latency_p50_s"]
