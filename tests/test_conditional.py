"""Input-dependent computation: threshold-activated block trees (ray tracing)."""

from __future__ import annotations

import numpy as np
import pytest

from simcc.estimate import SimulationOptions, estimate
from simcc.model.graph import input_dependent_share
from simcc.model.threshold import firing_sample, request_compute_scales, tree_blocks
from simcc.specs.loader import load_hardware, load_workload
from simcc.specs.workload import ThresholdTreeBlock


def tree(**kw) -> ThresholdTreeBlock:
    base: dict = dict(widths=[64, 256, 64], branching=2, levels=5, threshold=0.1)
    base.update(kw)
    return ThresholdTreeBlock(**base)


def test_tree_size_and_root_always_fires():
    spec = tree(branching=3, levels=4)
    assert tree_blocks(spec) == 1 + 3 + 9 + 27
    profile = firing_sample(spec, 0)
    assert profile.active_per_level[0] == 1.0
    assert (profile.fraction >= 1 / 40).all() and (profile.fraction <= 1).all()


def test_harder_inputs_fire_more_blocks():
    easy = firing_sample(tree(hard_fraction=0.0), 0).mean_fraction
    mixed = firing_sample(tree(hard_fraction=0.3), 0).mean_fraction
    hard = firing_sample(tree(hard_fraction=1.0), 0).mean_fraction
    assert easy < mixed < hard


def test_a_higher_threshold_fires_fewer_blocks():
    fractions = [firing_sample(tree(threshold=t), 0).mean_fraction for t in (0.02, 0.1, 0.3, 1.0)]
    assert all(b < a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == pytest.approx(1 / tree_blocks(tree()))  # only the root


def test_expected_cost_is_fired_blocks_times_block_flops():
    workload, src = load_workload("ray_tracing_mlp_serve_rpi5")
    result = estimate(workload, load_hardware("raspberry_pi_5"), src, SimulationOptions(request_count=200))
    model = result.model
    assert model.blocks_fired_mean < 0.5  # the paper: over 50% fewer parameters used on average
    assert model.blocks_fired_mean <= model.blocks_fired_p95 <= model.blocks_fired_p99
    assert model.active_params_b < 0.5 * model.params_b


def test_request_compute_scales_average_one_and_widen_the_tail():
    workload, src = load_workload("ray_tracing_mlp_serve_rpi5")
    share, profile = input_dependent_share(workload.model, workload.model.hidden)
    assert profile is not None and 0 < share <= 1  # this model's compute depends on the input
    scales = request_compute_scales(share, profile, 20000, seed=1)
    assert np.mean(scales) == pytest.approx(1.0, rel=0.02)
    system = load_hardware("raspberry_pi_5")
    varied = estimate(workload, system, src, SimulationOptions(request_count=3000)).latency
    steady_workload, _ = load_workload("ray_tracing_mlp_serve_rpi5",
                                       ["model.blocks.1.threshold_tree.concentration_easy=5.0", "model.blocks.1.threshold_tree.hard_fraction=1.0"])
    steady_scales = request_compute_scales(*input_dependent_share(steady_workload.model, steady_workload.model.hidden),
                                           20000, seed=1)
    assert np.std(steady_scales) < np.std(scales)
    assert varied.latency_p99_s > 1.5 * varied.latency_p50_s


# ---------------------------------------------------------------- TIPS anytime networks

from simcc.errors import InputError  # noqa: E402
from simcc.model.anytime import expected_sandwich, sandwich, scale_units  # noqa: E402
from simcc.model.blocks import Batch  # noqa: E402
from simcc.model.graph import units_forward_flops, units_of  # noqa: E402


def _anytime(overrides=()):
    return load_workload("tips_anytime_mobilenet_train", list(overrides))


def test_sandwich_has_the_largest_and_smallest_and_samples_the_rest():
    workload, _ = _anytime(["anytime.importance=[0.4, 0.6]"])  # the user's override of the TIPS scores
    spec = workload.anytime
    for step in range(5):
        widths = sandwich(spec, step, seed=0)
        assert len(widths) == 4 and widths[:2] == [1.0, 0.25]
        assert set(widths[2:]) <= {0.5, 0.75}
    draws = [w for step in range(4000) for w in sandwich(spec, step, 0)[2:]]
    assert draws.count(0.75) / len(draws) == pytest.approx(0.6, abs=0.02)  # the importance weights
    assert sum(t for _, t in expected_sandwich(spec)) == pytest.approx(4)


def test_width_slices_keep_the_model_input_and_output():
    workload, _ = _anytime()
    units = units_of(workload.model)
    half = scale_units(units, 0.5)
    first, last = half[0].blocks[0].spec, half[-1].blocks[-1].spec
    assert first.in_channels == 3 and first.out_channels == 16
    assert last.widths == [256, 10]
    flops_full = units_forward_flops(units, 512, Batch(1, 1, 1))
    flops_half = units_forward_flops(half, 512, Batch(1, 1, 1))
    assert 0.2 < flops_half / flops_full < 0.35  # ~w^2 for convs with both channel counts scaled


def test_step_cost_is_the_sum_of_its_subnetworks():
    system = load_hardware("rtx_4090")
    two = estimate(*_anytime(["anytime.subnets_per_step=2"])[:1], system, "w").step.compute_s
    four = estimate(*_anytime(["anytime.importance=[0.4, 0.6]"])[:1], system, "w")
    assert four.step.compute_s > 1.5 * two
    widths_flops = {w: units_forward_flops(scale_units(units_of(four_spec.model), w), 512, Batch(1, 1, 1))
                    for four_spec in [_anytime()[0]] for w in (0.25, 0.5, 0.75, 1.0)}
    expected = widths_flops[1.0] + widths_flops[0.25] + 2 * (0.4 * widths_flops[0.5] + 0.6 * widths_flops[0.75])
    assert four.model.forward_gflop_per_token == pytest.approx(expected / 1e9)


def test_serving_at_a_smaller_width_is_faster():
    system = load_hardware("rtx_4090")
    serve = ["mode=serve", "serve.batch=1", "serve.prompt_tokens=1", "serve.output_tokens=1", "serve.arrival_rate=10"]
    half = estimate(*_anytime(serve)[:1], system, "w", SimulationOptions(request_count=100))
    full = estimate(*_anytime(serve + ["anytime.serve_width=1.0"])[:1], system, "w", SimulationOptions(request_count=100))
    assert half.latency.latency_p50_s < full.latency.latency_p50_s


def test_anytime_spec_is_validated():
    with pytest.raises(InputError, match="end at 1.0"):
        _anytime(["anytime.widths=[0.25, 0.5]"])
    with pytest.raises(InputError, match="one weight per width"):
        _anytime(["anytime.importance=[1.0]"])


def test_models_without_threshold_trees_have_no_input_dependent_compute():
    workload, _ = load_workload("mixtral_8x7b_train_64xh100")
    assert input_dependent_share(workload.model, workload.model.hidden) == (0.0, None)


# Gallicchio & Nuti 2025's remaining mechanisms: rays, progressive thresholds, reuse of block outputs.
TINY = 1e-9  # a threshold every child with any rate passes


@pytest.mark.parametrize("rays", [1, 3])
def test_each_ray_computes_one_block_per_level_without_reuse(rays):
    spec = tree(threshold=TINY, rays=rays, reuse=False, samples=500)
    profile = firing_sample(spec, 0)
    assert profile.computations_per_level == pytest.approx([rays] * spec.levels)
    assert profile.fraction == pytest.approx(np.full(500, rays * spec.levels / tree_blocks(spec)))
    assert all(distinct <= rays for distinct in profile.active_per_level)


@pytest.mark.parametrize("rays, distinct", [(1, 1.0), (2, 1.5), (3, 1.75), (6, 2 * (1 - 0.5**6))])
def test_rays_reach_distinct_blocks_as_draws_with_replacement(rays, distinct):
    # Hard inputs split evenly: each ray picks either child with probability 1/2, so R rays reach
    # 2 (1 - (1/2)^R) distinct children of the root; with reuse each is computed once.
    spec = tree(levels=2, threshold=TINY, rays=rays, hard_fraction=1.0, concentration_hard=1e4, samples=8000)
    profile = firing_sample(spec, 0)
    assert profile.active_per_level[1] == pytest.approx(distinct, abs=0.03)
    assert profile.computations_per_level == profile.active_per_level


def test_rays_fire_a_subset_of_all_paths_and_more_rays_more_blocks():
    all_paths = firing_sample(tree(), 0)
    by_rays = [firing_sample(tree(rays=r), 0) for r in (1, 2, 8)]
    for profile in by_rays:  # a ray only enters children that fire
        assert all(r <= a + 1e-12 for r, a in zip(profile.active_per_level, all_paths.active_per_level))
    means = [p.mean_fraction for p in by_rays]
    assert means[0] < means[1] < means[2] <= all_paths.mean_fraction


def test_progressive_thresholds_cost_the_last_with_reuse_and_every_one_without():
    schedule = (0.5, 0.3, 0.1)
    stages = [firing_sample(tree(threshold=t), 0) for t in schedule]  # the same routing draws
    reused = firing_sample(tree(progressive=schedule[:-1], threshold=schedule[-1]), 0)
    again = firing_sample(tree(progressive=schedule[:-1], threshold=schedule[-1], reuse=False), 0)
    assert reused.mean_fraction == pytest.approx(stages[-1].mean_fraction)  # lower thresholds fire supersets
    assert again.mean_fraction == pytest.approx(sum(s.mean_fraction for s in stages))
    assert again.active_per_level == pytest.approx(reused.active_per_level)  # the same blocks' weights


def test_progressive_thresholds_must_fall():
    with pytest.raises(ValueError, match="must fall"):
        tree(progressive=(0.05,), threshold=0.1)
    with pytest.raises(ValueError, match="must fall"):
        tree(progressive=(0.3, 0.5), threshold=0.1)


def _latency_ms(*sets: str) -> float:
    workload, src = load_workload("ray_tracing_mlp_serve_rpi5", list(sets))
    result = estimate(workload, load_hardware("raspberry_pi_5"), src, SimulationOptions(request_count=100))
    return result.latency.latency_p50_s * 1e3


def test_serving_cost_follows_rays_and_reuse():
    tree_path = "model.blocks.1.threshold_tree"
    one, many = _latency_ms(f"{tree_path}.rays=1"), _latency_ms(f"{tree_path}.rays=16")
    assert one < many  # fewer rays compute fewer blocks
    kept = _latency_ms(f"{tree_path}.progressive=[0.5, 0.3]")
    recomputed = _latency_ms(f"{tree_path}.progressive=[0.5, 0.3]", f"{tree_path}.reuse=false")
    assert kept < recomputed
