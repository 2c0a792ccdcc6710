"""Model FLOPs in Megatron-Bridge's convention (causal attention products at half, no router),
against the formula worked by hand, and against a published TFLOP/s figure's own arithmetic."""

from __future__ import annotations

import pytest

from simcc.estimate import SimulationOptions, estimate
from simcc.model.blocks import Batch
from simcc.model.graph import megatron_forward_flops, units_forward_flops, units_of
from simcc.specs.loader import load_hardware, load_workload


def test_qwen3_30b_by_the_megatron_bridge_formula():
    workload, _ = load_workload("qwen3_30b_a3b_train_16xh100")
    s, L, h, V = 4096, 48, 2048, 151936
    heads, groups, kv_channels, moe_ffn, k = 32, 4, 128, 768, 8
    # flop_utils.transformer_flops per token, fwd + bwd (12 = 3 passes x 2 stacked GEMMs x 2 FLOPs):
    mlp = 12 * L * h * (moe_ffn * k * 3 / 2)
    attention = 12 * L * h * h * ((1 + groups / heads + s / h / 2) * (kv_channels * heads / h))
    logits = 6 * h * V
    per_token = mlp + attention + logits
    units = units_of(workload.model)
    forward = megatron_forward_flops(units, h, Batch(1, s, s))
    assert 3 * forward / s == pytest.approx(per_token, rel=1e-12)
    # simcc's own convention counts the full score square and the router on top
    narayanan = units_forward_flops(units, h, Batch(1, s, s))
    router = 2 * s * h * 128 * L
    causal_half = 2 * s * s * heads * kv_channels * L  # half of 4 s^2 heads head_dim
    assert narayanan - forward == pytest.approx(router + causal_half, rel=1e-12)


def test_throughput_reports_both_conventions():
    workload, source = load_workload("qwen3_30b_a3b_train_16xh100")
    system = load_hardware("dgx_h100_x4", ["nodes=2"])
    result = estimate(workload, system, source, SimulationOptions())
    throughput, step = result.throughput, result.step
    tokens_per_device_s = 1024 * 4096 / 16 / step.step_s
    assert throughput.megatron_tflops_per_device == pytest.approx(tokens_per_device_s * 2.3006e10 / 1e12, rel=1e-3)
    assert throughput.megatron_tflops_per_device < throughput.model_tflops_per_device
