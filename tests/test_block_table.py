"""`simcc estimate --layers`: every block's forward, backward and recomputation, against
hand-derived FLOPs and the policy's invariants."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from simcc.cli import main
from simcc.estimate import estimate_blocks, estimate_layer
from simcc.model.graph import blocks_of
from simcc.specs.loader import load_hardware, load_workload

SYSTEM = ("dgx_h100_x4", ["nodes=2"])


def _rows(*overrides: str):
    workload, source = load_workload("qwen3_30b_a3b_train_16xh100", list(overrides))
    return workload, source, estimate_blocks(workload, load_hardware(*SYSTEM), source).block_costs


def test_one_row_per_block_and_the_head_by_hand():
    workload, _, rows = _rows()
    assert [r.layer for r in rows] == [b.index for b in blocks_of(workload.model)]
    head = rows[-1]
    assert head.kind == "lm_head"
    T, h, V = 4096, 2048, 151936
    # logits 2 T h V, softmax cross-entropy 5 flops per logit, the final norm 5 per element
    assert head.forward_gflop == pytest.approx((2 * T * h * V + 5 * T * V + 5 * T * h) / 1e9, rel=1e-9)


def test_recomputation_is_apart_from_the_backward():
    _, _, plain = _rows()
    _, _, full = _rows("parallelism.recompute=full")
    assert all(r.recompute_s == 0 for r in plain)
    for kept, replayed in zip(plain, full):
        # full recomputation replays exactly the forward; the backward itself does not change
        assert replayed.recompute_s == pytest.approx(replayed.forward_s)
        assert replayed.backward_s == pytest.approx(kept.backward_s)
        if kept.kind != "embedding":  # costed alone, a block keeps its input under full recomputation
            assert replayed.saved_gb < kept.saved_gb
    moe = next(r for r in full if r.kind == "moe_ffn")
    # the replayed dispatch and combine travel again
    assert moe.comm_s == pytest.approx(3 / 2 * next(r for r in plain if r.kind == "moe_ffn").comm_s)


def test_rows_agree_with_one_layer_costed_alone():
    workload, source, rows = _rows()
    system = load_hardware(*SYSTEM)
    one = estimate_layer(workload, system, source, 2, "both").layer
    assert rows[2].forward_s == pytest.approx(one.forward_s)
    assert rows[2].backward_s == pytest.approx(one.backward_s)  # no recomputation here
    assert rows[2].forward_gflop + rows[2].backward_gflop == pytest.approx(one.gflop)


def test_cli_layers_json_and_table():
    runner = CliRunner()
    args = ["estimate", "qwen3_30b_a3b_train_16xh100", "-H", "dgx_h100_x4", "--set", "hardware.nodes=2", "--layers"]
    table = runner.invoke(main, args)
    assert table.exit_code == 0, table.output
    assert "Blocks (one micro-batch" in table.output and "moe_ffn" in table.output
    document = json.loads(runner.invoke(main, args + ["--format", "json"]).output)
    assert len(document["block_costs"]) == 98  # embedding, 48 x (attention, MoE), head
