"""A router trained to balance still leaves published imbalance: the log-normal spread hits the
published busiest-rank load per micro-batch (UltraEP, arXiv 2606.04101) or a user's MaxVio (Wang
et al. 2024, Table 2), dropless pays the busiest rank, capacity drops."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from simcc.cli import main
from simcc.routing.load import rank_loads
from simcc.routing.trained_load import (PUBLISHED_RANK_IMBALANCE, REFERENCE_EXPERTS, load_spread, spread_for,
                                        spread_for_ranks)
from simcc.specs.blocks import LoadSpec, MoEFFNBlock


def _busiest_rank_over_mean(sigma: float, experts: int, ranks: int, seed: int) -> float:
    """Independent check: fresh log-normal shares, experts dealt to ranks in order."""
    shares = np.random.default_rng(seed).lognormal(0.0, sigma, size=(20_000, experts))
    per_rank = shares.reshape(20_000, ranks, experts // ranks).sum(axis=2)
    return float((per_rank.max(axis=1) / per_rank.mean(axis=1)).mean())


@pytest.mark.parametrize("balancing", ["aux_loss", "aux_loss_free"])
def test_spread_reproduces_the_published_busiest_rank(balancing):
    published = PUBLISHED_RANK_IMBALANCE[balancing]
    sigma = spread_for_ranks(published)
    assert load_spread(LoadSpec(distribution="trained", balancing=balancing)) == sigma
    measured = _busiest_rank_over_mean(sigma, published.experts, published.ranks, seed=7)
    assert measured == pytest.approx(published.max_over_mean, rel=0.02)


def test_fewer_larger_ranks_are_closer_to_the_mean():
    # Qwen3-235B's router (2.86 on 64 ranks of 2 experts) on 8 ranks of 16: each rank sums 8x as
    # many experts, so its spread shrinks and the busiest rank comes out near 1.3, not 2.86.
    sigma = spread_for_ranks(PUBLISHED_RANK_IMBALANCE["aux_loss"])
    on_eight = _busiest_rank_over_mean(sigma, 128, 8, seed=3)
    assert 1.2 < on_eight < 1.4
    assert on_eight < _busiest_rank_over_mean(sigma, 128, 32, seed=3) < 2.86


def test_a_users_max_violation_takes_over():
    load = LoadSpec(distribution="trained", max_violation=0.52)
    assert load_spread(load) == spread_for(0.52) < spread_for_ranks(PUBLISHED_RANK_IMBALANCE["aux_loss"])


@pytest.mark.parametrize("violation", [0.52, 0.04, 2.0])
def test_spread_reproduces_a_users_max_violation(violation):
    sigma = spread_for(violation)
    draws = np.random.default_rng(0).lognormal(0.0, sigma, size=(40_000, REFERENCE_EXPERTS))
    measured = (draws.max(axis=1) / draws.mean(axis=1)).mean() - 1.0
    # the quadrature divides by the expected mean; a sample's own mean differs by O(sigma^2 / n)
    assert measured == pytest.approx(violation, rel=0.03)


def _layer(load: dict, dropless: bool = True) -> MoEFFNBlock:
    routing = {"dropless": True, "capacity_factor": None} if dropless else {"capacity_factor": 1.0}
    return MoEFFNBlock(experts=128, expert_hidden=768, k=8, gated=True, routing=routing, load=load)


def test_dropless_waits_longer_the_less_balanced_the_router():
    tokens, ranks = 4096.0, 16
    busiest = {name: sum(rank_loads(_layer(load), tokens, ranks, seed=1, sample_seed=2).busiest_rank)
               for name, load in (("uniform", {}), ("free", {"distribution": "trained", "balancing": "aux_loss_free"}),
                                  ("aux", {"distribution": "trained"}))}
    mean = tokens * 8  # assignments per rank: tokens x k x ranks / ranks
    assert busiest["uniform"] < busiest["free"] < busiest["aux"]
    assert busiest["aux"] > 1.2 * mean  # 8 experts per rank average 128 log-normal loads with sigma ~0.65
    # a MaxVio of 0 is an untilted router: the same loads as uniform popularity
    flat = rank_loads(_layer({"distribution": "trained", "max_violation": 0.0}), tokens, ranks, seed=1, sample_seed=2)
    assert sum(flat.busiest_rank) == pytest.approx(busiest["uniform"], rel=1e-9)


def test_capacity_caps_the_busiest_rank_and_drops():
    tokens, ranks = 4096.0, 16
    capped = rank_loads(_layer({"distribution": "trained"}, dropless=False), tokens, ranks, seed=1, sample_seed=2)
    assert capped.dropped > 0
    assert capped.capacity is not None
    assert sum(capped.busiest_rank) == pytest.approx(capped.capacity * 128 / ranks)  # padded to capacity


def test_bad_values_are_refused():
    runner = CliRunner()
    load = "model.blocks.1.blocks.1.moe_ffn.load"
    base = ["estimate", "qwen3_30b_a3b_train_16xh100", "-H", "dgx_h100_x4", "--set", "hardware.nodes=2",
            "--set", f"{load}.distribution=trained"]
    for extra, words in ((f"{load}.max_violation=-1", "max_violation"), (f"{load}.max_violation=100", "max_violation"),
                         (f"{load}.balancing=bias", "balancing")):
        result = runner.invoke(main, base + ["--set", extra])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert runner.invoke(main, base).exit_code == 0


def _first_dispatch(sets: list[str]):
    """The first MoE layer's dispatch all-to-all, its cost, and its loads, on 2 DGX H100 at EP16."""
    from simcc.costs.collectives import collective_time
    from simcc.layout import build_layout
    from simcc.model.graph import blocks_of
    from simcc.plan.training import cost_item, layer_work, micro_batch
    from simcc.specs.loader import load_hardware, load_workload, split_overrides

    workload_sets, hardware_sets = split_overrides(["hardware.nodes=2", *sets])
    workload, source = load_workload("qwen3_30b_a3b_train_16xh100", workload_sets)
    system = load_hardware("dgx_h100_x4", hardware_sets)
    layout = build_layout(workload, system, source)
    index = next(i for i, b in enumerate(blocks_of(workload.model)) if isinstance(b.spec, MoEFFNBlock))
    work = layer_work(workload, layout, index, micro_batch(workload))
    dispatch = next(i for i in work.items if i.name == "moe.dispatch")
    by_hand = collective_time(dispatch.collective, dispatch.bytes * dispatch.busiest_share, layout.groups["ep"], system,
                              dispatch.algorithm, dispatch.remote_share)
    return dispatch, cost_item(dispatch, system, layout).seconds, by_hand, work.moe[0].loads


def test_a_dropless_exchange_waits_for_its_busiest_receiver():
    load = "model.blocks.1.blocks.1.moe_ffn.load"
    trained, seconds, by_hand, loads = _first_dispatch([f"{load}.distribution=trained"])
    assert trained.busiest_share == pytest.approx(sum(loads.busiest_rank) / sum(loads.mean_rank))
    assert trained.busiest_share > 1.1  # 8 experts per rank under the Qwen3 router's spread
    assert seconds == pytest.approx(by_hand)
    # forced balance (random logits) leaves only the multinomial noise of 32,768 assignments per
    # rank over its 8 experts: about 1%
    forced, forced_seconds, _, _ = _first_dispatch([f"{load}.distribution=uniform"])
    assert 1.0 < forced.busiest_share < 1.02 and forced.bytes == pytest.approx(trained.bytes)
    assert forced_seconds < seconds
    # padded capacity buffers move whole, however the tokens fell
    routing = "model.blocks.1.blocks.1.moe_ffn.routing"
    capped, _, _, _ = _first_dispatch([f"{load}.distribution=trained", f"{routing}.dropless=false",
                                       f"{routing}.capacity_factor=1.0", f"{routing}.dispatcher=alltoall"])
    assert capped.busiest_share == 1.0


def test_the_report_says_how_far_the_busiest_rank_is_above_the_mean():
    import json

    load = "model.blocks.1.blocks.1.moe_ffn.load"
    base = ["estimate", "qwen3_30b_a3b_train_16xh100", "-H", "dgx_h100_x4", "--set", "hardware.nodes=2",
            "--format", "json"]
    reports = {name: json.loads(CliRunner().invoke(main, base + ["--set", f"{load}.distribution={name}"]).output)
               for name in ("uniform", "trained")}
    _, _, _, loads = _first_dispatch([f"{load}.distribution=trained"])
    trained = reports["trained"]
    assert trained["moe"]["busiest_rank_over_mean"] == pytest.approx(sum(loads.busiest_rank) / sum(loads.mean_rank))
    assert all(row["busiest_rank_over_mean"] > 1.1 for row in trained["moe_layers"])
    assert 1.0 <= reports["uniform"]["moe"]["busiest_rank_over_mean"] < 1.02
