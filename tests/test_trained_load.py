"""A router trained to balance still leaves published imbalance (Wang et al. 2024, Table 2):
the log-normal spread hits the published MaxVio, dropless pays the busiest rank, capacity drops."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from simcc.cli import main
from simcc.routing.load import rank_loads
from simcc.routing.trained_load import PUBLISHED_MAX_VIOLATION, REFERENCE_EXPERTS, spread_for
from simcc.specs.blocks import MoEFFNBlock


@pytest.mark.parametrize("violation", [PUBLISHED_MAX_VIOLATION["aux_loss"], PUBLISHED_MAX_VIOLATION["aux_loss_free"], 2.0])
def test_spread_reproduces_the_published_max_violation(violation):
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
    assert busiest["aux"] > 1.1 * mean  # 8 experts per rank average 128 log-normal loads with sigma ~0.18
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
