"""Redundant experts placed by load (DeepSeek-V3 sec. 3.4; the EPLB method): hand-derived
placement, the busiest rank's relief, conservation of tokens, memory for the copies, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from simcc.cli import main
from simcc.routing.load import balanced_copies, rank_loads
from simcc.specs.blocks import MoEFFNBlock


def test_copies_and_packing_by_hand():
    # Six experts on two ranks with two redundant copies (four slots a rank). Copies: expert 0
    # (0.4) gets the first (0.2 per copy), then ties at 0.2 go to the lowest index, expert 0 again
    # (0.133 per copy). Heaviest first onto the least-loaded open rank: e1 -> r0, e2 -> r1, e0 ->
    # r0 (tie), e0 -> r1, e0 -> r0 (0.333 each, lower rank), e3 (0.1) -> r1 = 0.433, e4 (0.05)
    # -> r1 = 0.483 (full), e5 -> r0 = 0.517 (full).
    share = np.array([0.4, 0.2, 0.2, 0.1, 0.05, 0.05])
    index, fraction = balanced_copies(share, ranks=2, redundant=2)
    assert sorted(index[0].tolist()) == [0, 0, 1, 5] and sorted(index[1].tolist()) == [0, 2, 3, 4]
    loads = (share[index] * fraction).sum(axis=1)
    assert loads == pytest.approx([0.4 / 3 * 2 + 0.2 + 0.05, 0.4 / 3 + 0.2 + 0.1 + 0.05])
    assert loads.sum() == pytest.approx(1.0)  # every token has one home
    # contiguous placement would put 0.8 of the tokens on rank 0
    assert loads.max() < 0.8


def _layer(redundant: int, distribution: str = "zipf") -> MoEFFNBlock:
    return MoEFFNBlock(experts=64, expert_hidden=512, k=4, gated=True,
                       routing={"dropless": True, "capacity_factor": None, "dropless_block": 1,
                                "redundant_experts": redundant},
                       load={"distribution": distribution, "alpha": 1.2})


def test_redundant_copies_relieve_the_busiest_rank_and_conserve_tokens():
    tokens, ranks = 4096.0, 8
    busiest = {}
    for redundant in (0, 8, 32):
        loads = rank_loads(_layer(redundant), tokens, ranks, seed=3, sample_seed=3)
        busiest[redundant] = sum(loads.busiest_rank)
        # block 1: every routed assignment is computed exactly once over the ranks' slots
        assert sum(loads.mean_rank) * ranks == pytest.approx(loads.routed, rel=1e-9)
        assert len(loads.busiest_rank) == (64 + redundant) // ranks
    assert busiest[32] < busiest[8] < busiest[0]
    mean = 4096 * 4 / 1  # tokens per rank x k x ranks / ranks
    assert busiest[32] < 1.15 * mean < busiest[0]


def test_copies_cost_memory_and_bad_values_are_refused():
    runner = CliRunner()
    base = ["estimate", "mixtral_8x7b_train_64xh100", "-H", "dgx_h100_x8",
            "--set", "model.blocks.1.blocks.1.moe_ffn.routing.dropless=true",
            "--set", "model.blocks.1.blocks.1.moe_ffn.routing.capacity_factor=null", "--format", "json"]
    import json

    plain = json.loads(runner.invoke(main, base).output)
    copied = runner.invoke(main, base + ["--set", "model.blocks.1.blocks.1.moe_ffn.routing.redundant_experts=8"])
    assert copied.exit_code == 0, copied.output
    copied_doc = json.loads(copied.output)
    # one more expert per EP8 rank: each expert is 3 x 4096 x 14336 bf16 weights, per layer of the stage
    layers = 8  # 32 layers over pp 4
    extra = 3 * 4096 * 14336 * 2 * layers / 1e9
    assert copied_doc["memory"]["weights_gb"] - plain["memory"]["weights_gb"] == pytest.approx(extra, rel=1e-6)
    assert copied_doc["model"]["params_b"] == plain["model"]["params_b"]  # copies are not model parameters
    for value, words in (("5", "multiple of ep=8"), ("9", "exceeds experts"), ("-1", "redundant_experts")):
        bad = runner.invoke(main, base + ["--set", f"model.blocks.1.blocks.1.moe_ffn.routing.redundant_experts={value}"])
        assert bad.exit_code == 2 and words in bad.output and "Traceback" not in bad.output, bad.output
    routing = "model.blocks.1.blocks.1.moe_ffn.routing"
    undropped = runner.invoke(main, ["estimate", "mixtral_8x7b_train_64xh100", "-H", "dgx_h100_x8",
                                     "--set", f"{routing}.dropless=false", "--set", f"{routing}.capacity_factor=1.25",
                                     "--set", f"{routing}.redundant_experts=8"])
    assert undropped.exit_code == 2 and "dropless" in undropped.output
