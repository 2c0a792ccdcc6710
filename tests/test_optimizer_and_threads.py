"""The optimizer step (fused or torch's unfused loop) and a CPU process's share of its host:
hand-derived bytes, kernel counts and scaling."""

from __future__ import annotations

import pandas as pd
import pytest

from simcc.calibrate.fit import measured_threads
from simcc.costs.compute import op_cost
from simcc.estimate import estimate
from simcc.model.graph import block_params
from simcc.model.optimizer import optimizer_step, step_bytes_per_param, update_bytes_per_param
from simcc.specs.hardware import threads_share
from simcc.specs.loader import load_hardware, load_profile_model, validate
from simcc.specs.workload import Optimizer, Precision, Workload

FP32 = Precision(weights="fp32", compute="fp32", gradients="fp32", communication="fp32")
MIXED = Precision(weights="bf16", compute="bf16", gradients="fp32", communication="bf16")


def test_fused_adam_moves_seven_fp32_accesses_per_parameter():
    # read grad, weight, m, v; write weight, m, v
    assert update_bytes_per_param(Optimizer(), FP32) == 7 * 4
    # bf16 weights, fp32 master: fp32 grad + master and moments read/written + the bf16 copy written
    assert update_bytes_per_param(Optimizer(), MIXED) == 4 + 2 * (4 + 8) + 2


def test_bf16_moments_halve_adams_state_and_its_traffic():
    """moments_dtype bf16 (DeepSeek-V3's AdamW, Megatron's precision-aware optimizer): 2 + 2 bytes of
    moments a parameter instead of 4 + 4, read and written by the update; the master copy stays.
    Qwen3-30B-A3B on 16 H100 (ZeRO-1): the optimizer memory goes from 12 to 8 bytes a parameter."""
    bf16 = Optimizer(moments_dtype="bf16")
    assert update_bytes_per_param(bf16, MIXED) == 4 + 2 * (4 + 4) + 2
    assert update_bytes_per_param(Optimizer(type="sgd", moments_dtype="bf16"), FP32) == 3 * 4  # no moments
    from simcc.specs.loader import load_workload

    def optimizer_gb(sets):
        workload, src = load_workload("qwen3_30b_a3b_train_16xh100", sets)
        return estimate(workload, load_hardware("dgx_h100_x4", ["nodes=2"]), src).memory.optimizer_gb

    assert optimizer_gb(["optimizer.moments_dtype=bf16"]) == pytest.approx(optimizer_gb([]) * 8 / 12)


def test_unfused_adam_adds_torchs_temporaries_and_kernels():
    unfused = Optimizer(implementation="unfused")
    assert update_bytes_per_param(unfused, FP32) == 19 * 4  # lerp 3, mul 2 + addcmul 4, sqrt/div/add 6, addcdiv 4
    op = optimizer_step(1e6, 10, unfused, FP32)
    assert op.launches == 10 * 8 and op.family == "optimizer_unfused"
    fused = optimizer_step(1e6, 10, Optimizer(), FP32)
    assert fused.launches == 1 and fused.family == "optimizer"
    # SGD without momentum is one add_ either way
    sgd = Optimizer(type="sgd", implementation="unfused")
    assert update_bytes_per_param(sgd, FP32) == update_bytes_per_param(Optimizer(type="sgd"), FP32) == 3 * 4


def test_the_step_adds_clipping_and_zeroing_around_the_update():
    no_clip = Optimizer(clip_grad_norm=False)
    assert step_bytes_per_param(no_clip, FP32) == update_bytes_per_param(no_clip, FP32) + 4  # zeroing
    assert step_bytes_per_param(Optimizer(), FP32) == update_bytes_per_param(no_clip, FP32) + 8  # + the norm's read


def _moe_model(implementation: str) -> Workload:
    data = {"name": "tiny", "mode": "train",
            "model": {"name": "tiny", "hidden": 256, "blocks": [{"repeat": 2, "blocks": [
                {"attention": {"heads": 4}}, {"moe_ffn": {"experts": 4, "k": 2, "expert_hidden": 512}}]}]},
            "parallelism": {"micro_batch": 1},
            "precision": {"weights": "fp32", "compute": "fp32", "gradients": "fp32", "communication": "fp32"},
            "optimizer": {"clip_grad_norm": False, "implementation": implementation},
            "train": {"seq_len": 64, "global_batch": 1}}
    return validate(Workload, data, "test")


def test_parameter_tensors_are_counted_per_block():
    from simcc.model.graph import units_of

    blocks = [b for unit in units_of(_moe_model("fused").model) for b in unit.blocks]
    attention, moe = block_params(blocks[0], 256), block_params(blocks[1], 256)
    assert attention.tensors == 3  # fused QKV, output projection, norm
    assert (moe.tensors, moe.expert_tensors) == (2, 8)  # router + norm; up and down per expert


def test_an_unfused_optimizer_step_costs_its_bytes_and_kernels():
    system = load_hardware("cpu_host_generic")
    fused = estimate(_moe_model("fused"), system, "test").step.optimizer_s
    unfused = estimate(_moe_model("unfused"), system, "test").step.optimizer_s
    device = system.device
    parameters = 2 * (4 * 256 * 256 + 256 + 256 * 4 + 256 + 4 * 2 * 256 * 512)
    tensors = 2 * (3 + 2 + 8)
    bandwidth = device.memory_bandwidth_gb_s * 1e9 * device.efficiency.memory
    launch = device.efficiency.kernel_launch_us * 1e-6
    assert fused == pytest.approx(parameters * (28 + 4) / bandwidth + launch, rel=1e-6)
    assert unfused == pytest.approx(parameters * (76 + 4) / bandwidth + tensors * 8 * launch, rel=1e-6)


def _cpu(threads: int | None, cores: int | None):
    device = load_hardware("cpu_host_generic").device
    return device.model_copy(update={"threads": threads, "cores": cores})


def test_each_process_gets_its_share_of_the_host():
    assert threads_share(_cpu(2, 2), processes=2) == 0.5  # measured with both cores, runs on one
    assert threads_share(_cpu(1, 2), processes=2) == 1.0  # measured as it will run
    assert threads_share(_cpu(1, 2), processes=1) == 2.0  # alone, it gets both cores
    assert threads_share(_cpu(2, 2), processes=2, threads_per_process=2) == 1.0  # as pinned
    assert threads_share(_cpu(None, None), processes=2) == 1.0  # a profile that does not say
    assert threads_share(load_hardware("h100_sxm").device, processes=8) == 1.0


def test_a_node_of_processes_scales_each_ones_peak_and_bandwidth():
    profile, source = load_profile_model("cpu_host_local")
    measured = profile.device.model_copy(update={"threads": 2, "cores": 2})
    from simcc.specs.hardware import system_from

    alone = system_from(measured, source).device
    shared = system_from(profile.model_copy(update={"device": measured}), source).device  # 2 processes
    assert shared.peak_tflops.fp32 == pytest.approx(alone.peak_tflops.fp32 / 2)
    assert shared.memory_bandwidth_gb_s == pytest.approx(alone.memory_bandwidth_gb_s / 2)
    op = optimizer_step(1e7, 1, Optimizer(), FP32)
    launch = alone.efficiency.kernel_launch_us * 1e-6
    assert op_cost(shared, op).seconds - launch == pytest.approx(2 * (op_cost(alone, op).seconds - launch))


def test_calibration_records_the_threads_it_measured_with():
    frame = pd.DataFrame({"device_type": ["cpu", "cpu"], "threads": [1, 1], "host_cores": [4, 4]})
    assert measured_threads(frame) == {"threads": 1, "cores": 4}
    assert measured_threads(frame.assign(device_type="cuda")) == {}
    assert measured_threads(frame.drop(columns="host_cores")) == {"threads": 1, "cores": 1}
