"""Gating policies and expert loads: conservation, capacity formulas, balance, skew, placement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simcc.errors import InputError
from simcc.routing.gating import route
from simcc.routing.load import capacity_per_expert, expert_ranks, rank_loads
from simcc.specs.workload import MoEFFNBlock

from conftest import write


def moe(**kw) -> MoEFFNBlock:
    base: dict = dict(experts=64, k=2, expert_hidden=128)
    base.update(kw)
    return MoEFFNBlock(**base)


def loads(spec: MoEFFNBlock, tokens: int = 4096, ranks: int = 8, seed: int = 1, draws: int = 4):
    return rank_loads(spec, tokens, ranks, seed, sample_seed=seed, draws=draws)


@pytest.mark.parametrize("formula,expected", [
    ("switch", math.ceil(1.25 * 2 * 1000 / 64)),
    ("gshard", math.ceil(1.25 * 2 * 1000 / 64)),
    ("deepspeed", max(math.ceil(1.25 * 1000 / 64) * 2, 4)),
    ("tutel", math.ceil(2 * int(1.25 * math.ceil(1000 / 64)) / 8) * 8),
])
def test_capacity_formula_variants(formula, expected):
    spec = moe(routing={"capacity_factor": 1.25, "capacity_formula": formula, "min_capacity": 4, "capacity_alignment": 8})
    assert capacity_per_expert(spec, 1000, 1) == expected
    assert capacity_per_expert(spec, 1000, 4) == 4 * expected


def test_every_capacity_formula_has_one_rule():
    from typing import get_args

    from simcc.routing.load import CAPACITY_RULES
    from simcc.specs.vocab import CapacityFormula

    assert list(CAPACITY_RULES) == list(get_args(CapacityFormula))


def test_deepspeed_min_capacity_wins_for_small_batches():
    spec = moe(routing={"capacity_factor": 1.0, "capacity_formula": "deepspeed", "min_capacity": 64})
    assert capacity_per_expert(spec, 100, 1) == 64


@pytest.mark.parametrize("policy,extra", [("topk", {}), ("noisy_topk", {}), ("gshard", {}),
                                          ("hierarchical", {"groups": 8})])
def test_tokens_are_conserved(policy, extra):
    spec = moe(gating={"policy": policy, **extra}, routing={"capacity_factor": 1.0},
               load={"distribution": "zipf", "alpha": 1.0})
    result = loads(spec)
    computed = sum(result.mean_rank) * 8
    # every routed assignment is computed (inside the padded buffers) or dropped
    assert computed - result.padded == pytest.approx(result.routed - result.dropped)
    assert result.dropped > 0


def test_base_gives_exactly_equal_loads():
    result = loads(moe(gating={"policy": "base"}, load={"distribution": "zipf", "alpha": 1.5}), ranks=8)
    assert len(set(result.busiest_rank)) == 1 and result.busiest_rank == result.mean_rank
    assert result.cv == pytest.approx(0.0) and result.dropped == 0


def test_expert_choice_gives_exactly_c_tokens_per_expert():
    spec = moe(gating={"policy": "expert_choice"}, routing={"capacity_factor": 1.0},
               load={"distribution": "zipf", "alpha": 1.2})
    result = loads(spec, tokens=4096, ranks=8)
    c = 1.0 * 4096 * 8 * 2 / 64  # cf * T * k / E over the group's 8 x 4096 tokens
    assert result.busiest_rank == pytest.approx((c,) * 8)
    assert result.dropped == 0
    assert 0 < result.no_expert_fraction < 0.5  # some tokens get no expert under skew


def test_switch_and_gshard_experts_per_token():
    switch = route(moe(k=1, gating={"policy": "switch"}), 8, seed=0)
    gshard = route(moe(k=2, gating={"policy": "gshard"}), 8, seed=0)
    assert switch.experts_per_token == 1.0
    assert 1.0 < gshard.experts_per_token < 2.0  # the second expert is kept with probability min(1, 2 g2)


def test_drops_fall_monotonically_as_capacity_factor_rises():
    drops = [loads(moe(routing={"capacity_factor": cf}, load={"distribution": "zipf"}), ranks=4).dropped
             for cf in (0.5, 0.75, 1.0, 1.25, 2.0, 4.0, 16.0)]  # hottest expert: 13.5x the mean
    assert all(b <= a for a, b in zip(drops, drops[1:]))
    assert drops[0] > drops[-1] == 0


def test_dropless_drops_nothing_and_rounds_to_blocks():
    spec = moe(routing={"dropless": True, "capacity_factor": None})
    assert loads(spec).dropped == 0
    assert all(t % 128 == 0 for t in loads(spec, tokens=1000, ranks=64, draws=1).busiest_rank)


def test_zipf_skew_raises_max_over_mean():
    dropless = {"dropless": True, "capacity_factor": None}
    uniform = loads(moe(routing=dropless), draws=8)
    skewed = loads(moe(routing=dropless, load={"distribution": "zipf", "alpha": 1.2}), draws=8)
    assert skewed.max_over_mean > uniform.max_over_mean
    assert sum(skewed.busiest_rank) > sum(uniform.busiest_rank)


def test_target_cv():
    spec = moe(experts=256, routing={"dropless": True, "capacity_factor": None}, load={"distribution": "cv", "cv": 0.5},
               gating={"sample_tokens": 16384})
    assert loads(spec, tokens=65536, ranks=1).cv == pytest.approx(0.5, abs=0.15)


def test_aux_loss_gate_is_trained_for_the_layer():
    """An aux-loss layer's loads come from its trained gate: no loss collapses onto few experts,
    strong losses balance; the expert parameters the model passes decide the pull."""
    dropless = {"dropless": True, "capacity_factor": None}
    weak = moe(routing=dropless, load={"distribution": "aux_loss", "train_tokens": 1e9})
    strong = moe(routing=dropless, load={"distribution": "aux_loss", "w_importance": 1.0, "w_load": 1.0, "train_tokens": 1e9})
    params = 2 * 512 * 128

    def trained(spec: MoEFFNBlock):
        return rank_loads(spec, 4096, 8, 1, sample_seed=1, draws=4, expert_params=params)

    assert trained(weak).max_over_mean > 2 * trained(strong).max_over_mean
    assert route(strong, 8, 1, params).share == pytest.approx(route(strong, 8, 1, params).share)  # memoised, pure
    with pytest.raises(ValueError, match="train_tokens"):
        moe(load={"distribution": "aux_loss"})
    with pytest.raises(ValueError, match="at most 512 experts"):  # the training's work is bounded
        moe(experts=1024, load={"distribution": "aux_loss", "train_tokens": 1e9})


def test_top1_router_reproduces_the_popularity():
    spec = moe(k=1, gating={"policy": "switch", "sample_tokens": 50000}, load={"distribution": "zipf", "alpha": 1.0})
    profile = route(spec, 8, seed=3)
    expected = 1 / np.arange(1, 65) / (1 / np.arange(1, 65)).sum()
    assert np.sort(profile.share)[::-1][:4] == pytest.approx(expected[:4], rel=0.05)


def test_hash_routing_balance_follows_token_frequencies():
    flat = route(moe(k=1, gating={"policy": "hash", "token_zipf": 0.0}), 8, seed=0)
    skewed = route(moe(k=1, gating={"policy": "hash", "token_zipf": 1.2}), 8, seed=0)
    assert skewed.share.max() > flat.share.max()


def test_hierarchical_picks_k_primary_groups():
    spec = moe(k=4, gating={"policy": "hierarchical", "groups": 8, "k_primary": 2})
    profile = route(spec, 8, seed=0)
    assert profile.experts_per_token == 4 and profile.share.sum() == pytest.approx(1.0)


def test_histogram_and_placement_files(tmp_path):
    counts = "\n".join(str(1000 if e == 3 else 10) for e in range(64))
    hist = write(tmp_path, "h.csv", "tokens\n" + counts + "\n")
    spec = moe(routing={"dropless": True, "capacity_factor": None}, load={"distribution": "histogram", "histogram": str(hist)})
    assert route(spec, 8, seed=0).share.argmax() == 3
    placed = write(tmp_path, "p.csv", "rank\n" + "\n".join(str(e % 8) for e in range(64)) + "\n")
    file_spec = moe(routing={"capacity_factor": 1.0, "placement": "file", "placement_file": str(placed)})
    assert (expert_ranks(file_spec, 8) == expert_ranks(moe(routing={"placement": "round_robin"}), 8)).all()
    uneven = write(tmp_path, "u.csv", "rank\n" + "\n".join("0" for _ in range(64)) + "\n")
    with pytest.raises(InputError, match="each holding 8 experts"):
        expert_ranks(moe(routing={"placement": "file", "placement_file": str(uneven)}), 8)
    with pytest.raises(InputError, match="expected 64 rows"):
        route(moe(load={"distribution": "histogram", "histogram": str(write(tmp_path, "s.csv", "tokens\n1\n"))}), 8, 0)


def test_replicating_hot_experts_relieves_the_busiest_rank():
    skew = {"distribution": "zipf", "alpha": 1.5}
    dropless = {"dropless": True, "capacity_factor": None}
    plain = loads(moe(routing=dropless, load=skew), draws=8)
    shadowed = loads(moe(routing={**dropless, "replicate_hot": 2}, load=skew), draws=8)
    assert sum(shadowed.busiest_rank) < sum(plain.busiest_rank)
    assert len(shadowed.busiest_rank) == 8 + 2  # own experts, then a share of each hot one


def test_padded_capacity_buffers_make_all_to_all_grow_with_capacity_factor():
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware, load_workload

    system = load_hardware("dgx_a100_x4")
    traffic = []
    for cf in (1.0, 2.0):
        sets = [f"model.blocks.1.blocks.3.moe_ffn.routing.capacity_factor={cf}",
                f"model.blocks.2.blocks.5.moe_ffn.routing.capacity_factor={cf}"]
        workload, src = load_workload("switch_base_128_train", sets)
        result = estimate(workload, system, src)
        traffic.append(result.moe.all_to_all_mb_per_layer)
        layer = result.moe_layers[0]
        assert layer.a2a_intra_mb > 0 and layer.a2a_inter_mb > 0  # 32 ranks over 4 nodes
    assert traffic[1] == pytest.approx(2 * traffic[0], rel=0.02)


def test_topology_aware_gating_moves_traffic_into_the_node():
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware, load_workload

    system = load_hardware("dgx_a100_x4")
    base = ["model.blocks.1.blocks.3.moe_ffn.routing.capacity_factor=1.0"]
    plain = estimate(*load_workload("switch_base_128_train", base)[:1], system, "w")
    local = estimate(*load_workload("switch_base_128_train",
                                    base + ["model.blocks.1.blocks.3.moe_ffn.routing.keep_in_node=0.86"])[:1], system, "w")
    assert local.moe_layers[0].a2a_inter_mb < 0.2 * plain.moe_layers[0].a2a_inter_mb
    assert local.step.exposed_comm_s < plain.step.exposed_comm_s


def test_list_shows_policies_and_capacity_formulas():
    from simcc.report.catalog import catalog

    rows = catalog()
    assert {r["name"] for r in rows if r["kind"] == "gating"} == {
        "topk", "noisy_topk", "switch", "gshard", "expert_choice", "base", "hash", "hierarchical", "moefication",
        "round_robin"}
    assert {r["name"] for r in rows if r["kind"] == "routing"} == {"switch", "gshard", "deepspeed", "tutel"}


def test_noisy_hierarchical_gate_doubles_its_gate_products():
    from simcc.model.kinds.moe_ffn import params as moe_params
    from simcc.routing.gating import router_products

    plain = moe(experts=64, k=4, gating={"policy": "hierarchical", "groups": 8})
    noisy = moe(experts=64, k=4, gating={"policy": "hierarchical", "groups": 8, "noisy": True})
    assert len(router_products(noisy, 8)) == 2 * len(router_products(plain, 8)) == 4
    assert moe_params(noisy, 32).replicated - moe_params(plain, 32).replicated == 32 * (8 + 64)
    assert route(noisy, 8, seed=0).experts_per_token == 4


@pytest.mark.parametrize("groups, ranks_hold_whole_groups", [(16, True), (8, False)])
def test_hierarchical_moe_sends_a_token_once_per_picked_group(groups, ranks_hold_whole_groups):
    """Shazeer et al. 2017 sec. 3.1: each secondary MoE lives on one device, so a token crosses the
    network once per picked group (k_primary = 2), not once per expert (k = 4). 16 K40, 20480
    tokens per rank, d = 512 fp32: 20480 x 2 x 512 x 4 B = 83.9 MB. With 8 groups over 16 ranks a
    group spans two devices and the token goes to each expert: 4 copies."""
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware, load_workload

    workload, src = load_workload("shazeer_moe_4096h_lstm_train", [f"model.blocks.2.moe_ffn.gating.groups={groups}"])
    traffic = estimate(workload, load_hardware("k40_x16"), src).moe.all_to_all_mb_per_layer
    copies = 2 if ranks_hold_whole_groups else 4
    assert traffic == pytest.approx(20480 * copies * 512 * 4 / 1e6, rel=1e-6)


def _share_cv(spec: MoEFFNBlock) -> float:
    share = route(spec, 8, seed=3).share
    return float(share.std() / share.mean())


@pytest.mark.parametrize("load", [{"distribution": "zipf", "alpha": 1.0}, {"distribution": "cv", "cv": 1.0}])
def test_gate_noise_spreads_a_skewed_router_as_shazeer_et_al_say(load):
    """Noisy top-k (Shazeer et al. 2017, eq. 4, gates initialised at zero) adds the same noise
    scale to every expert, so it moves tokens off popular experts: the share is more even than
    plain top-k's, and more so as the noise grows."""
    plain = _share_cv(moe(load=load))
    noisy = [_share_cv(moe(load=load, gating={"policy": "noisy_topk", "noise_std": std})) for std in (1.0, 4.0)]
    assert noisy[1] < noisy[0] < plain


def test_gate_noise_does_not_unbalance_a_flat_router():
    """With flat popularity the noise must not favour some experts: noisy top-k's share varies only
    by the sample's own multinomial noise, CV about sqrt(E / (T k)) (before, a random noise
    projection made it five times plain top-k's)."""
    flat, tokens = {"distribution": "cv", "cv": 0.0}, 65536
    sampling = math.sqrt(64 / (tokens * 2))
    for gating in ({"sample_tokens": tokens}, {"sample_tokens": tokens, "policy": "noisy_topk"}):
        assert _share_cv(moe(load=flat, gating=gating)) < 1.5 * sampling


@pytest.mark.parametrize("policy,k", [("topk", 2), ("noisy_topk", 2), ("switch", 1), ("gshard", 2)])
def test_a_flat_router_has_no_frozen_sample_bias(policy, k):
    """A target CV of 0 gives every expert the same share: the sample's own noise (CV ~0.1 at the
    default 4,096 tokens) must not become a fixed bias in every step."""
    share = route(moe(k=k, gating={"policy": policy}, load={"distribution": "cv", "cv": 0.0}), 8, seed=5).share
    assert share == pytest.approx(np.full(64, 1 / 64))


def test_switch_shares_follow_popularity_closer_than_one_sample_does():
    """Top-1 over log popularity plus Gumbel noise picks expert e with probability p_e (the
    Gumbel-max trick), so the expected share is p itself. The smoothed share is non-decreasing in
    p and closer to p than the raw 4,096-token sample by a third or more (here 0.073 against 0.130
    relative RMS)."""
    from simcc.routing.gating import _route_sample, popularity

    spec = moe(k=1, gating={"policy": "switch"}, load={"distribution": "cv", "cv": 0.5})
    rng = np.random.default_rng(11)
    p = popularity(spec, rng)
    raw, smooth = _route_sample(spec, 8, rng, p).share, route(spec, 8, seed=11).share
    order = np.argsort(p)
    assert np.all(np.diff(smooth[order]) >= -1e-15)
    rms = lambda share: float(np.sqrt(np.mean((share / p - 1) ** 2)))  # noqa: E731
    assert rms(smooth) < 0.67 * rms(raw)
