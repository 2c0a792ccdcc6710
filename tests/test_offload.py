"""Activation offloading (Megatron-Core's --cpu-offloading-num-layers): memory freed, copies over
the host link waited for only beyond the neighbouring layer's compute, and the refusals."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from simcc.estimate import SimulationOptions, estimate
from simcc.layout import build_layout
from simcc.plan.training import forward_work, layer_costs, micro_batch, offload_costs, units_of
from simcc.specs.loader import load_hardware, load_workload

from conftest import write

# A 32-layer GPT-3-XL-like model (all layers alike), data parallel over 8 H100s, no recompute.
MODEL = """
name: offload-test
mode: train
model:
  name: test
  hidden: 2048
  blocks:
    - embedding: {vocab: 32000}
    - repeat: 24
      blocks:
        - attention: {heads: 16, head_dim: 128}
        - dense_ffn: {hidden: 8192}
    - lm_head: {vocab: 32000}
precision: {weights: bf16, compute: bf16, gradients: fp32, communication: bf16}
parallelism: {pp: 1, micro_batch: 2}
train: {seq_len: 4096, global_batch: 64}
"""


def _run(tmp_path, offloaded: int, host_gb_s: float | None = None):
    path = write(tmp_path, "w.yaml", MODEL)
    workload, source = load_workload(str(path), [f"parallelism.offload_activation_layers={offloaded}"])
    system = load_hardware("dgx_h100_x1")
    if host_gb_s is not None:
        system = dataclasses.replace(system, host_link=system.host_link.model_copy(update={"bandwidth_gb_s": host_gb_s}))
    return workload, system, source, estimate(workload, system, source, SimulationOptions())


def test_offloaded_layers_leave_one_layer_of_activations_on_the_device(tmp_path):
    """Double buffering keeps one offloaded layer on the device at a time: offloading N of 24 alike
    layers frees N - 1 layers' saved activations."""
    workload, system, source, kept = _run(tmp_path, 0)
    layer = forward_work(units_of(workload.model), workload, build_layout(workload, system, source),
                         micro_batch(workload)).unit_works[5].saved_bytes
    for offloaded in (1, 8, 23):
        *_, result = _run(tmp_path, offloaded)
        freed = (kept.memory.activations_gb - result.memory.activations_gb) * 1e9
        assert freed == pytest.approx((offloaded - 1) * layer, rel=1e-9)


def test_copies_wait_only_beyond_the_next_layers_compute(tmp_path):
    """Per micro-batch an offloaded layer's saved bytes go out at the host link's rate while the
    next layer's forward runs, and come back while its backward runs: the step grows by
    microbatches x N x (max(0, copy - forward) + max(0, copy - backward)), by hand from the link
    and the layer's own costs."""
    workload, system, source, base = _run(tmp_path, 0)
    layout = build_layout(workload, system, source)
    batch = micro_batch(workload)
    layer = forward_work(units_of(workload.model), workload, layout, batch).unit_works[5].saved_bytes
    link = system.host_link
    copy = link.latency_us * 1e-6 + layer / (link.bandwidth_gb_s * 1e9 * link.efficiency)
    forward, backward = layer_costs(workload, system, layout, 3, batch)
    # layer_costs costs one block (index 3: the second layer's attention); a layer is attention + FFN
    forward_ffn, backward_ffn = layer_costs(workload, system, layout, 4, batch)
    compute_f = sum(c.seconds for c in forward + forward_ffn if c.stream == "compute")
    compute_b = sum(c.seconds for c in backward + backward_ffn if c.stream == "compute")
    assert copy > compute_f  # PCIe is slower than the layer: the forward copy is partly exposed
    offloaded = 6
    *_, result = _run(tmp_path, offloaded)
    per_microbatch = offloaded * (max(0.0, copy - compute_f) + max(0.0, copy - compute_b))
    grown = result.step.step_s - base.step.step_s
    assert grown == pytest.approx(layout.microbatches * per_microbatch, rel=0.02)
    assert any("activation offloading" in note for note in result.notes)


def test_a_fast_host_link_hides_the_copies_and_a_slow_one_does_not(tmp_path):
    *_, base = _run(tmp_path, 0)
    *_, hidden = _run(tmp_path, 8, host_gb_s=10_000)
    *_, slow = _run(tmp_path, 8, host_gb_s=16)
    *_, slower = _run(tmp_path, 8, host_gb_s=8)
    assert hidden.step.step_s == pytest.approx(base.step.step_s, rel=1e-6)
    assert base.step.step_s < slow.step.step_s < slower.step.step_s
    assert hidden.memory.activations_gb == pytest.approx(slow.memory.activations_gb)


@pytest.mark.parametrize("override,field", [
    ("parallelism.pp=2", "parallelism: offload_activation_layers needs pp 1"),
    ("parallelism.recompute=selective", "parallelism: offload_activation_layers needs recompute none"),
    ("parallelism.offload_activation_layers=24", "parallelism.offload_activation_layers: expected fewer layers"),
])
def test_what_megatron_refuses_is_one_line_naming_the_field(tmp_path, override, field):
    path = write(tmp_path, "w.yaml", MODEL.replace("parallelism: {pp: 1,", "parallelism: {offload_activation_layers: 4,"))
    result = subprocess.run([sys.executable, "-m", "simcc", "estimate", str(path), "-H", "dgx_h100_x1", "--set", override],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and field in result.stderr, result.stderr


def test_offloading_needs_a_host_link(tmp_path):
    path = write(tmp_path, "w.yaml", MODEL)
    workload, source = load_workload(str(path), ["parallelism.offload_activation_layers=2"])
    system = load_hardware("h100_sxm")
    work = forward_work(units_of(workload.model), workload, build_layout(workload, system, source), micro_batch(workload))
    from simcc.errors import InputError
    with pytest.raises(InputError, match="host_link"):
        offload_costs(work, system, build_layout(workload, system, source))
