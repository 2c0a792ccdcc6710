"""DeepEP microbenchmark cases (EP_KERNEL_METRICS in simcc/validation.py): the metric reads the
first MoE layer's moe.dispatch / moe.combine Cost, and its bandwidth counts DeepEP's test bytes
(deepseek-ai/DeepEP tests/legacy/test_internode.py, test_intranode.py)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from simcc.errors import InputError
from simcc.validation import Case, load_suite, run_case

WORKLOAD = "workloads/validation/deepep_moe_layer.yaml"
TOKENS, HIDDEN, K, EXPERTS = 4096, 7168, 8, 256


def _case(metric: str, *sets: str, workload: str | None = WORKLOAD) -> Case:
    return Case(name="t", source="test", metric=metric, measured=1.0, hardware="hgx_h800_x4", workload=workload,
                set=list(sets))


def _ep16(metric: str) -> float:
    return run_case(_case(metric, "hardware.nodes=2", "parallelism.ep=16")).predicted


def _no_expert_on_node(per_node: int, pool: int) -> float:
    """P(none of a token's k distinct experts, uniform over `pool`, lies on a node of `per_node`)."""
    return math.prod((pool - per_node - i) / (pool - i) for i in range(K))


def test_ep16_dispatch_bandwidth_counts_deepep_rdma_bytes() -> None:
    # EP16 = 2 nodes of 8; 128 experts per node; top-4 groups covers both nodes. DeepEP counts one
    # RDMA copy per token per distinct node reached, its own included (num_rdma_token_sent):
    # E[nodes] = 2 x (1 - C(128,8)/C(256,8)) = 1.992. FP8 tokens carry a 4-byte scale per 128
    # channels: 7168 x (1 + 4/128) = 7392 B. Bytes = 4096 x 1.992 x 7392 = 60.3 MB.
    reached = 2 * (1 - _no_expert_on_node(128, 256))
    rdma_bytes = TOKENS * reached * HIDDEN * (1 + 4 / 128)
    # simcc's deduplicated dispatch at EP16 on the H800 profile: the NVLink forward stage bounds it.
    # DeepEP writes a token once to each GPU holding any of its experts (16 experts per GPU):
    # E[GPUs] = 16 x (1 - C(240,8)/C(256,8)) = 6.52, 7/8 of them not the forwarding GPU itself,
    # over 200 GB/s x 0.71 (all-to-all efficiency) = 142 GB/s, after one 2 us round of 7 peers (the
    # RDMA stage: 5 us + 4096 x (1 - p) x 7168 B / 40 GB/s = 0.74 ms, under it).
    gpus = 16 * (1 - _no_expert_on_node(16, 256))
    assert gpus == pytest.approx(6.52, abs=0.01)
    forward_s = 2e-6 + 7 / 8 * TOKENS * gpus * HIDDEN * 1 / (200e9 * 0.71)
    assert _ep16("dispatch_us") == pytest.approx(forward_s * 1e6, rel=1e-6)
    assert _ep16("dispatch_gb_s") == pytest.approx(rdma_bytes / forward_s / 1e9, rel=1e-6)


def test_combine_is_bf16_both_ways() -> None:
    # Combine returns the same rows (one per token and GPU, its experts' outputs summed there) in
    # BF16: twice the dispatch's bytes on the NVLink stage, and DeepEP counts 2 B per element
    # without scales.
    forward_s = 2e-6 + 7 / 8 * TOKENS * 16 * (1 - _no_expert_on_node(16, 256)) * HIDDEN * 2 / (200e9 * 0.71)
    reached = 2 * (1 - _no_expert_on_node(128, 256))
    assert _ep16("combine_us") == pytest.approx(forward_s * 1e6, rel=1e-6)
    assert _ep16("combine_gb_s") == pytest.approx(TOKENS * reached * HIDDEN * 2 / forward_s / 1e9, rel=1e-6)


def test_intranode_bandwidth_counts_tokens_received_per_rank() -> None:
    # EP8 in one node: DeepEP's NVLink bytes are recv_x.numel(): a token reaches each distinct rank
    # once. E[ranks] = 8 x (1 - C(224,8)/C(256,8)) = 5.25 of 32-expert ranks.
    reached = 8 * (1 - _no_expert_on_node(32, 256))
    case = _case("dispatch_gb_s", "hardware.nodes=1", "parallelism.ep=8")
    seconds = run_case(_case("dispatch_us", "hardware.nodes=1", "parallelism.ep=8")).predicted / 1e6
    assert run_case(case).predicted == pytest.approx(TOKENS * reached * HIDDEN * (1 + 4 / 128) / seconds / 1e9, rel=1e-6)


def test_low_latency_dispatch_slows_when_it_leaves_the_node() -> None:
    low = ("train.seq_len=128", "model.blocks.0.moe_ffn.routing.dispatcher=low_latency")
    ep8 = run_case(_case("dispatch_us", "hardware.nodes=1", "parallelism.ep=8", *low)).predicted
    ep16 = run_case(_case("dispatch_us", "hardware.nodes=2", "parallelism.ep=16", *low)).predicted
    assert ep16 > ep8  # NIC (40 GB/s) instead of NVLink (160 GB/s)
    bf16 = run_case(_case("dispatch_us", "hardware.nodes=2", "parallelism.ep=16", *low,
                          "model.blocks.0.moe_ffn.routing.dispatch_dtype=bf16")).predicted
    assert bf16 > 1.9 * ep16 - 10  # twice the bytes, one 5 us latency term shared


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(ValidationError, match="need a workload"):
        _case("dispatch_us", workload=None)
    with pytest.raises(InputError, match="dispatcher deduplicated"):
        run_case(_case("dispatch_gb_s", "hardware.nodes=2", "parallelism.ep=16",
                       "model.blocks.0.moe_ffn.routing.dispatcher=low_latency"))
    with pytest.raises(InputError, match="ep >= 2"):
        run_case(_case("combine_us", "hardware.nodes=1", "parallelism.ep=1"))
    with pytest.raises(InputError, match="moe_ffn block"):
        run_case(_case("dispatch_us", workload="gpt_22b_dense_train_8xa100"))


def test_suite_holds_the_deepep_cases() -> None:
    names = {case.name for case in load_suite("moe").cases}
    assert {"deepep-normal-dispatch-ep16-h800", "deepep-low-latency-combine-ep256-h800"} <= names


def test_a_moe_layer_case_times_the_moe_module_alone() -> None:
    """moe_layer_forward_ms / moe_layer_backward_ms (Megatron-LM's MoE layer benchmark): the first
    MoE layer's costs for one micro-batch, in sequence, without the norm before the module and the
    residual add after it. Mixtral proxy by hand: each of 8 ranks holds one expert of 14336 that
    takes 4096 x 8 x 2 / 8 = 8192 rows; its two forward GEMMs are 2 x 8192 x 4096 x 14336 FLOPs each,
    the backward's twice that."""
    from simcc.layout import build_layout
    from simcc.plan.training import layer_costs, micro_batch
    from simcc.specs.loader import load_hardware, load_workload

    moe_layer = "workloads/validation/megatron_moe_layer.yaml"
    forward = run_case(Case(name="f", source="test", metric="moe_layer_forward_ms", measured=1.0,
                            hardware="dgx_h100_x1", workload=moe_layer, set=[]))
    backward = run_case(Case(name="b", source="test", metric="moe_layer_backward_ms", measured=1.0,
                             hardware="dgx_h100_x1", workload=moe_layer, set=[]))
    workload, source = load_workload(moe_layer)
    system = load_hardware("dgx_h100_x1")
    layout = build_layout(workload, system, source)
    fwd, bwd = layer_costs(workload, system, layout, 0, micro_batch(workload))
    by_name = {c.name: c for c in fwd + bwd}
    whole_forward, whole_backward = sum(c.seconds for c in fwd), sum(c.seconds for c in bwd)
    outside_forward = by_name["moe.norm"].seconds + by_name["moe.residual"].seconds
    outside_backward = by_name["moe.norm.bwd"].seconds + by_name["moe.residual.bwd"].seconds
    assert forward.predicted == pytest.approx((whole_forward - outside_forward) * 1e3)
    assert backward.predicted == pytest.approx((whole_backward - outside_backward) * 1e3)
    gemm_flops = 2 * 8192 * 4096 * 14336  # the mean rank's; uniform routing leaves the busiest a few % more
    assert gemm_flops < by_name["moe.expert_up"].flops < 1.03 * gemm_flops
    assert by_name["moe.expert_down.bwd"].flops == pytest.approx(2 * by_name["moe.expert_up"].flops)
    # the dispatcher's choice moves the layer only through its exchanges
    assert "moe.dispatch" in by_name and forward.predicted > (by_name["moe.expert_up"].seconds
                                                               + by_name["moe.expert_down"].seconds) * 1e3


def test_a_peak_allocated_case_reads_the_tensors_of_the_memory_model() -> None:
    """peak_allocated_gib (torch.cuda.max_memory_allocated, as a source reports it): simcc's memory
    per device less the profile's reserve (CUDA context, allocator slack, workspaces), in GiB."""
    from simcc.estimate import estimate
    from simcc.specs.loader import load_hardware, load_workload

    sets = ["hardware.nodes=2", "parallelism.overlap_moe_comm=true"]
    case = Case(name="m", source="test", metric="peak_allocated_gib", measured=1.0, hardware="dgx_h100_x4",
                workload="qwen3_30b_a3b_train_16xh100", set=sets)
    workload, source = load_workload("qwen3_30b_a3b_train_16xh100", ["parallelism.overlap_moe_comm=true"])
    memory = estimate(workload, load_hardware("dgx_h100_x4", ["nodes=2"]), source).memory
    expected = (memory.weights_gb + memory.gradients_gb + memory.optimizer_gb + memory.activations_gb
                + memory.buffers_gb + memory.kv_cache_gb) * 1e9 / 2**30
    assert run_case(case).predicted == pytest.approx(expected, rel=1e-6)
