"""parallelism.tp_comm_overlap: sequence parallelism's all-gathers and reduce-scatters beside a
dense layer's linears pipelined with their GEMMs, as Transformer Engine's userbuffers run them
under Megatron-Core's --tp-comm-overlap. Expected values are derived by hand from the costs of the
same items without the overlap (plan/training.py, tp_overlap_costs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simcc.estimate import estimate
from simcc.layout import build_layout
from simcc.model.blocks import Shard
from simcc.model.kinds._shared import output_head, tp_entry, tp_exit
from simcc.plan.training import Cost, layer_costs, micro_batch
from simcc.specs.loader import load_hardware, load_workload

LLAMA = "llama3_70b_train_64xh100"  # TP4 with sequence parallelism and tp_comm_overlap on
TP = 4


def _costs(overlap: bool, index: int) -> tuple[dict[str, Cost], dict[str, Cost]]:
    """One block's forward and backward costs by name (1: attention, 2: the dense FFN)."""
    workload, source = load_workload(LLAMA, [f"parallelism.tp_comm_overlap={str(overlap).lower()}"])
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, source)
    forward, backward = layer_costs(workload, system, layout, index, micro_batch(workload))
    return {c.name: c for c in forward}, {c.name: c for c in backward}


@pytest.mark.parametrize("index,gather,first,second,scatter", [
    (1, "attn.tp_gather", "attn.qkv", "attn.out", "attn.tp_reduce"),
    (2, "ffn.tp_gather", "ffn.up", "ffn.down", "ffn.tp_reduce"),
])
def test_pipelined_collectives_wait_only_beyond_the_other_gemm_chunks(index, gather, first, second, scatter):
    off_fwd, off_bwd = _costs(False, index)
    on_fwd, on_bwd = _costs(True, index)
    # Forward: the all-gather beside the GEMM after it, the reduce-scatter beside the GEMM before
    # it; tp - 1 of the tp chunks move while another chunk multiplies: max(0, C - G (tp-1)/tp).
    for comm, gemm in ((gather, first), (scatter, second)):
        expected = max(0.0, off_fwd[comm].seconds - off_fwd[gemm].seconds * (TP - 1) / TP)
        assert on_fwd[comm].seconds == pytest.approx(expected)
    # Backward of the reduce-scatter: the gradient's all-gather beside the input-gradient kernel,
    # half of the GEMM's backward (the other half is the weight gradient).
    data_grad = off_bwd[second + ".bwd"].seconds / 2
    expected = max(0.0, off_bwd[scatter + ".bwd"].seconds - data_grad * (TP - 1) / TP)
    assert on_bwd[scatter + ".bwd"].seconds == pytest.approx(expected)
    # Backward of the all-gather (bulk): the saved shard gathered again beside the input-gradient
    # kernel, the input gradient reduce-scattered beside the weight-gradient kernel.
    again = off_fwd[gather].seconds
    scatter_back = off_bwd[gather + ".bwd"].seconds - again
    half = off_bwd[first + ".bwd"].seconds / 2
    expected = max(0.0, again - half) + max(0.0, scatter_back - half)
    assert on_bwd[gather + ".bwd"].seconds == pytest.approx(expected)
    # Link time is conserved (waited for + hidden), and no compute changes.
    for costs_off, costs_on in ((off_fwd, on_fwd), (off_bwd, on_bwd)):
        for name, cost in costs_off.items():
            if cost.stream == "comm":
                assert costs_on[name].seconds + costs_on[name].hidden == pytest.approx(cost.seconds + cost.hidden)
                assert costs_on[name].seconds <= cost.seconds
            else:
                assert costs_on[name].seconds == cost.seconds


def test_the_overlap_shortens_the_step_by_the_tp_time_it_hides():
    system = load_hardware("dgx_h100_x8")
    results = []
    for sets in ([], ["parallelism.tp_comm_overlap=false"]):
        workload, source = load_workload(LLAMA, sets)
        results.append(estimate(workload, system, source))
    on, off = results
    assert on.comm is not None and off.comm is not None and on.step is not None and off.step is not None
    assert on.comm.tp_link_s == pytest.approx(off.comm.tp_link_s)  # the same bytes move
    assert on.comm.tp_exposed_s < 0.7 * off.comm.tp_exposed_s  # most of it now hides
    # The step saves what stops being waited for, and the pipeline fill and drain shrink with the
    # chunks: a little more, (pp - 1) / (vpp x micro-batches) = 7 / 640 of it, within float noise.
    saved, hidden = off.step.step_s - on.step.step_s, off.comm.tp_exposed_s - on.comm.tp_exposed_s
    assert hidden <= saved <= hidden * (1 + 2 * 7 / 640)


def test_only_collectives_beside_a_transformer_engine_linear_overlap():
    shard = Shard(tp=TP, sequence_parallel=True, tp_comm_overlap=True)
    assert tp_entry("attn.tp_gather", 1024, 512, shard, linear=True)[0].gemm_overlap
    assert tp_exit("ffn.tp_reduce", 1024, 512, shard, linear=True)[0].gemm_overlap
    # the MoE layer's gather feeds the router, the LM head's a plain column-parallel layer
    assert not tp_entry("moe.tp_gather", 1024, 512, shard)[0].gemm_overlap
    assert not any(getattr(item, "gemm_overlap", False) for item in output_head("head", 1024, 512, 1000, shard))
    # without sequence parallelism the row-parallel output is all-reduced, never overlapped
    plain = Shard(tp=TP, sequence_parallel=False, tp_comm_overlap=True)
    assert not tp_exit("ffn.tp_reduce", 1024, 512, plain, linear=True)[0].gemm_overlap


@pytest.mark.parametrize("sets,field", [
    (["parallelism.tp=1", "parallelism.pp=8", "parallelism.dp=8"], "parallelism"),
    (["parallelism.sequence_parallel=false"], "parallelism"),
])
def test_overlap_without_sequence_parallel_tp_is_refused_in_one_line(sets, field):
    args = [sys.executable, "-m", "simcc", "estimate", LLAMA, "--hardware", "dgx_h100_x8"]
    for item in sets:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "tp_comm_overlap needs tp >= 2 and sequence_parallel" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sets,element", [
    ([], 1.0),  # per-tensor current scaling: one FP8 byte per element
    (["precision.fp8_scaling=block"], 1.0 + 4 / 128),  # and an fp32 scale per 1 x 128 tile
])
def test_fp8_linears_gather_inputs_cast_on_the_local_shard(sets, element):
    """Transformer Engine casts before it gathers (layernorm_linear.py; base.py
    grad_output_preprocess): the QKV and FC1 inputs and the output projection's and FC2's
    output gradients move in FP8; the input gradients reduce-scatter in bf16."""
    workload, source = load_workload(LLAMA, sets)
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, source)
    forward, backward = layer_costs(workload, system, layout, 1, micro_batch(workload))
    fwd, bwd = {c.name: c for c in forward}, {c.name: c for c in backward}
    full = 8192 * 8192  # tokens x hidden of one micro-batch, gathered
    assert fwd["attn.tp_gather"].bytes == pytest.approx(full * element)
    # backward: the input gradient reduce-scattered in bf16, the saved FP8 shard gathered again
    assert bwd["attn.tp_gather.bwd"].bytes == pytest.approx(full * 2 + full * element)
    assert fwd["attn.tp_reduce"].bytes == pytest.approx(full * 2)  # the GEMM's bf16 output
    assert bwd["attn.tp_reduce.bwd"].bytes == pytest.approx(full * element)  # its gradient, cast
    # the cast runs on this rank's shard before the gather: 2 FLOPs per element of T x h / tp
    assert fwd["attn.qkv.cast"].flops == pytest.approx(2 * full / TP)
    assert fwd["attn.out.cast"].flops == pytest.approx(2 * 8192 * 8192 / TP)  # after the core: T x (h / tp)


def test_bf16_linears_gather_at_the_communication_dtype():
    workload, source = load_workload(LLAMA, ["precision.matmul=null"])
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, source)
    forward, backward = layer_costs(workload, system, layout, 2, micro_batch(workload))
    fwd, bwd = {c.name: c for c in forward}, {c.name: c for c in backward}
    full = 8192 * 8192 * 2
    assert fwd["ffn.tp_gather"].bytes == pytest.approx(full) and bwd["ffn.tp_gather.bwd"].bytes == pytest.approx(2 * full)
    assert fwd["ffn.tp_reduce"].bytes == pytest.approx(full) and bwd["ffn.tp_reduce.bwd"].bytes == pytest.approx(full)
    assert "ffn.up.cast" not in fwd


def test_an_fp8_run_s_mfu_divides_by_the_fp8_peak():
    """Model FLOPs per second over the peak of the dtype the weight GEMMs run in: FP8's 1,979
    TFLOP/s on an H100, not bf16's 989 (against which a good FP8 run passes 100%)."""
    workload, source = load_workload(LLAMA)
    result = estimate(workload, load_hardware("dgx_h100_x8"), source)
    assert result.throughput is not None
    assert result.throughput.mfu == pytest.approx(result.throughput.model_tflops_per_device / 1979)


@pytest.mark.parametrize("scaling,present", [("tensor", True), ("delayed", False), ("block", False)])
def test_current_scaling_all_reduces_a_gathered_tensor_s_amax(scaling, present):
    """Current scaling takes the amax from the tensor: the TP group's, one 4-byte all-reduce before
    each gathered input's cast; its backward conjugate stands for the output gradient's."""
    workload, source = load_workload(LLAMA, [f"precision.fp8_scaling={scaling}"])
    system = load_hardware("dgx_h100_x8")
    layout = build_layout(workload, system, source)
    forward, backward = layer_costs(workload, system, layout, 2, micro_batch(workload))
    fwd, bwd = {c.name: c for c in forward}, {c.name: c for c in backward}
    assert ("ffn.up.amax" in fwd) == present and ("ffn.up.amax.bwd" in bwd) == present
    assert "ffn.down.amax" not in fwd  # the row-parallel input is not gathered
    if present:
        assert fwd["ffn.up.amax"].bytes == 4 and fwd["ffn.up.amax"].group == "tp"
