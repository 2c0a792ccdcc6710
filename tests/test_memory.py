"""Memory per device against hand-derived values."""

from __future__ import annotations

import pytest

from simcc.costs.memory import in_flight_microbatches, optimizer_state_bytes, training_memory
from simcc.layout import build_layout
from simcc.model.blocks import Params, kv_cache_bytes_per_token
from simcc.specs.loader import load_hardware, load_workload
from simcc.specs.workload import AttentionBlock


def _setup(overrides):
    workload, src = load_workload("gpt_22b_dense_train_8xa100", overrides)
    system = load_hardware("dgx_a100_x1")
    return workload, system, build_layout(workload, system, src)


def test_mixed_precision_adam_is_16_bytes_per_parameter_without_zero():
    workload, system, layout = _setup(["precision.weights=bf16", "precision.gradients=bf16", "precision.compute=bf16",
                                       "parallelism.tp=1", "model.blocks.1.repeat=1", "train.global_batch=8"])
    params = Params(dense=1e9)
    memory = training_memory(workload, system, layout, params, 0.0, 0.0)
    assert memory.weights + memory.gradients + memory.optimizer == pytest.approx(16e9)


def test_zero_stages_shard_state_over_data_parallel_ranks():
    common = ["precision.weights=bf16", "precision.gradients=bf16", "parallelism.tp=1", "train.global_batch=8"]
    params = Params(dense=1e9)
    totals = {}
    for stage in (0, 1, 2, 3):
        workload, system, layout = _setup(common + [f"parallelism.zero_stage={stage}"])
        assert layout.dp == 8
        m = training_memory(workload, system, layout, params, 0.0, 0.0)
        totals[stage] = (m.weights, m.gradients, m.optimizer)
    assert totals[0] == pytest.approx((2e9, 2e9, 12e9))
    assert totals[1] == pytest.approx((2e9, 2e9, 12e9 / 8))
    assert totals[2] == pytest.approx((2e9, 2e9 / 8, 12e9 / 8))
    assert totals[3] == pytest.approx((2e9 / 8, 2e9 / 8, 12e9 / 8))


def test_factored_optimizer_keeps_rows_plus_columns():
    workload, system, layout = _setup(["optimizer.type=adafactor", "optimizer.master_weights=false", "parallelism.tp=1",
                                       "train.global_batch=8"])
    params = Params(dense=4096 * 1024, dense_rows_cols=4096 + 1024)
    assert optimizer_state_bytes(params, workload, layout) == pytest.approx(4 * (4096 + 1024))


def test_in_flight_microbatches_by_schedule():
    workload, src = load_workload("mixtral_8x7b_train_64xh100")
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, src)  # p=4, v=8, m=16
    assert in_flight_microbatches(workload, layout) == pytest.approx(4 + 3 / 8)
    w1, _ = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.vpp=1", "parallelism.schedule=1f1b"])
    assert in_flight_microbatches(w1, build_layout(w1, system, src)) == 4
    w2, _ = load_workload("mixtral_8x7b_train_64xh100", ["parallelism.vpp=1", "parallelism.schedule=gpipe"])
    assert in_flight_microbatches(w2, build_layout(w2, system, src)) == 16


def test_kv_cache_bytes_per_token():
    spec = AttentionBlock(heads=32, kv_heads=8, head_dim=128)
    assert kv_cache_bytes_per_token(spec, 4096, "bf16") == 2 * 8 * 128 * 2


def test_full_recompute_keeps_less_activation_memory():
    from simcc.estimate import estimate

    system = load_hardware("dgx_h100_x8")
    mem = {}
    for policy in ("none", "selective", "full"):
        workload, src = load_workload("mixtral_8x7b_train_64xh100", [f"parallelism.recompute={policy}"])
        mem[policy] = estimate(workload, system, src).value("memory", "activations_gb")
    assert mem["full"] < mem["selective"] <= mem["none"]
