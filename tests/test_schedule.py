"""SSD dense/sparse schedules and whole-run plans: phases add up, an all-dense schedule is the
baseline, switches scale with the model, a sparse phase that keeps every expert is never cheaper."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simcc.errors import InputError
from simcc.estimate import estimate
from simcc.layout import build_layout
from simcc.phases import Phase, expand, sparse_workload, switch_seconds
from simcc.specs.loader import load_hardware, load_workload, resolve_workload_path
from simcc.costs.collectives import collective_time
from simcc.layout import comm_group
from simcc.model.blocks import ffn_params
from simcc.costs.memory import optimizer_state_bytes
from simcc.model.ops import DTYPE_BYTES
from simcc.specs.workload import AdaptiveSwitch, Schedule

SSD = "ssd_gpt2_small_train"


def _workload_file(tmp_path: Path, change) -> str:
    data = yaml.safe_load(Path(resolve_workload_path(SSD)).read_text())
    change(data)
    path = tmp_path / "ssd.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _estimate(path: str, hardware: str = "dgx_a100_x1"):
    workload, source = load_workload(path)
    return estimate(workload, load_hardware(hardware), source)


def test_rule_expands_to_warmup_alternation_and_dense_finish():
    schedule = Schedule.model_validate({"experts": 32, "k": 8, "rule": {
        "warmup_tokens": 1e9, "sparse_tokens": 2e9, "dense_tokens": 0.5e9, "final_dense_tokens": 1e9}})
    phases = expand(schedule, 1e10, 524288.0, "w.yaml", "schedule")
    # 1 dense, then 8e9 to fill: S2 D.5 S2 D.5 S2 D.5 S.5, then the 1e9 dense finish
    assert [(p.mode, p.tokens) for p in phases] == [
        ("dense", 1e9), ("sparse", 2e9), ("dense", 0.5e9), ("sparse", 2e9), ("dense", 0.5e9),
        ("sparse", 2e9), ("dense", 0.5e9), ("sparse", 0.5e9), ("dense", 1e9)]
    assert sum(p.tokens for p in phases) == pytest.approx(1e10)
    assert phases[-1].mode == "dense" and all(p.experts == 32 and p.k == 8 for p in phases if p.mode == "sparse")


def test_only_dense_phases_equal_the_dense_baseline_exactly(tmp_path):
    def all_dense(data):
        data["schedules"] = {"dense": {"phases": [{"mode": "dense", "tokens": 4e9}, {"mode": "dense", "tokens": 6e9}]}}
        data.pop("serve")
    result = _estimate(_workload_file(tmp_path, all_dense))
    totals = result.schedules["schedule dense"]
    assert totals.days == pytest.approx(totals.dense_baseline_days, rel=1e-12)
    assert totals.days == pytest.approx(result.run.days, rel=1e-12)
    assert totals.kwh == pytest.approx(totals.dense_baseline_kwh, rel=1e-12)
    assert totals.switches == 0 and totals.speedup_vs_dense == pytest.approx(1.0)


def test_phase_times_add_up_to_the_total():
    result = _estimate(SSD)
    for name in ("ssd", "one_long_sparse"):
        rows = [r for r in result.phases if r.schedule == name]
        totals = result.schedules[f"schedule {name}"]
        assert sum(r.seconds for r in rows) / 86400 == pytest.approx(totals.days, rel=1e-12)
        assert sum(r.usd for r in rows) == pytest.approx(totals.usd, rel=1e-12)
        assert sum(r.tokens for r in rows) == pytest.approx(1e10)
        for row in rows:
            if row.phase != "switch":
                assert row.seconds == pytest.approx(row.steps * row.step_s)
    # The rule's run: 4 dense->sparse and 4 sparse->dense switches.
    assert result.schedules["schedule ssd"].switches == 8


def test_switch_cost_scales_with_layers_and_ffn_size():
    system = load_hardware("dgx_a100_x1")

    def seconds(overrides):
        workload, source = load_workload(SSD, overrides)
        layout = build_layout(workload, system, source)
        schedule = workload.schedules["ssd"]
        return switch_seconds(workload, system, layout, schedule, 32), switch_seconds(workload, system, layout, schedule, None)

    base_in, base_out = seconds([])
    deep_in, deep_out = seconds(["model.blocks.1.repeat=24"])
    wide_in, wide_out = seconds(["model.blocks.1.blocks.1.dense_ffn.hidden=6144"])
    assert deep_in == pytest.approx(2 * base_in) and deep_out == pytest.approx(2 * base_out)
    assert wide_in > 1.9 * base_in and wide_out > 1.9 * base_out
    assert base_in > base_out > 0  # clustering on top of the permutation


def test_sparse_phase_keeping_every_expert_costs_at_least_dense():
    workload, source = load_workload(SSD)
    system = load_hardware("dgx_a100_x1")
    dense = estimate(workload, system, source).step.step_s
    everything = sparse_workload(workload, Phase("sparse", 1.0, 32, 32), workload.schedules["ssd"], source, "schedule")
    assert estimate(everything, system, source).step.step_s >= dense


def test_fewer_active_experts_never_slow_a_sparse_step():
    workload, source = load_workload(SSD)
    system = load_hardware("dgx_a100_x1")
    steps = [estimate(sparse_workload(workload, Phase("sparse", 1.0, 32, k), workload.schedules["ssd"], source, "s"),
                      system, source).step.step_s for k in (2, 4, 8, 16)]
    assert steps == sorted(steps)


def test_phases_that_miss_the_total_tokens_name_the_field(tmp_path):
    def short(data):
        data["schedules"]["one_long_sparse"]["phases"][1]["tokens"] = 1e9
    with pytest.raises(InputError, match="schedules.one_long_sparse.phases"):
        _estimate(_workload_file(tmp_path, short))


def test_experts_must_divide_the_ffn(tmp_path):
    def odd(data):
        data["schedules"]["ssd"]["experts"] = 7
        data["schedules"]["ssd"]["k"] = 2
    path = _workload_file(tmp_path, odd)
    run = subprocess.run([sys.executable, "-m", "simcc", "estimate", path, "--hardware", "dgx_a100_x1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "schedules.ssd.experts" in run.stderr and "3072" in run.stderr


def test_ssd_workload_estimates_on_a_cluster_and_an_edge_device():
    for hardware in ("dgx_a100_x1", "jetson_agx_orin"):
        run = subprocess.run([sys.executable, "-m", "simcc", "estimate", SSD, "--hardware", hardware, "--format", "json"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        # ssd: 9 phases, 8 switches; one_long_sparse: 3 and 2; adaptive: 9, 8 and its monitoring row
        assert report["schedule ssd"]["phases"] == 9 and len(report["phases"]) == 9 + 8 + 3 + 2 + 9 + 8 + 1
        serving = report["serving dense vs moe"]
        assert serving["dense_output_tokens_per_s"] > 0 and serving["moe_output_tokens_per_s"] > 0
        # memory: the peak over phases is at least each phase's own
        assert report["schedule ssd"]["peak_memory_gb"] >= report["memory"]["total_gb"]


def test_training_flops_saved_by_hand():
    """SSD states its saving in FLOPs. GPT-2 small, k = 8 of 32 clusters: each of the 12 FFNs
    executes a quarter of its 2 x 2 x 768 x 3072 forward FLOPs per token and adds the centroid
    router's 2 x 768 x 32; the run's FLOPs are 3x forward x tokens, phase by phase."""
    result = _estimate(SSD)
    totals = result.schedules["schedule ssd"]
    dense_forward = result.model.forward_gflop_per_token * 1e9
    ffn = 2 * 2 * 768 * 3072
    sparse_forward = dense_forward - 12 * (ffn * (1 - 8 / 32) - 2 * 768 * 32)
    assert totals.sparse_flops_ratio == pytest.approx(sparse_forward / dense_forward, rel=2e-3)
    # 4e9 tokens dense (warm-up 1e9, three gaps of 0.5e9, finish 1e9... rounded by the rule), 6.5e9 sparse
    sparse_tokens = totals.sparse_token_share * 1e10
    expected = 3 * (dense_forward * (1e10 - sparse_tokens) + sparse_forward * sparse_tokens) / 1e15
    assert totals.training_pflop == pytest.approx(expected, rel=2e-3)
    assert totals.dense_baseline_pflop == pytest.approx(3 * dense_forward * 1e10 / 1e15, rel=1e-9)
    assert totals.flops_saved_vs_dense == pytest.approx(totals.dense_baseline_pflop / totals.training_pflop)
    rows = [r for r in result.phases if r.schedule == "ssd"]
    assert sum(r.pflop for r in rows) == pytest.approx(totals.training_pflop)
    # The wall-time gap is explained: FLOPs fall further than time, and a note says why.
    assert totals.sparse_step_ratio > totals.sparse_flops_ratio
    assert 0 < totals.sparse_layer_overhead_share < 1
    assert any("schedule ssd: a sparse step executes" in note for note in result.notes)


def test_all_dense_schedule_saves_no_flops(tmp_path):
    def all_dense(data):
        data["schedules"] = {"dense": {"phases": [{"mode": "dense", "tokens": 1e10}]}}
        data.pop("serve")
    totals = _estimate(_workload_file(tmp_path, all_dense)).schedules["schedule dense"]
    assert totals.flops_saved_vs_dense == pytest.approx(1.0, rel=1e-12) and totals.sparse_flops_ratio is None


def test_sparse_phases_run_with_expert_parallelism():
    """A MoEfied phase may spread its experts over EP ranks: its step then pays the all-to-all,
    and each switch back to dense all-gathers every layer's slices over the EP group."""
    system = load_hardware("dgx_h100_x8")
    workload, source = load_workload(SSD)
    schedule = workload.schedules["ssd"]
    layout = build_layout(workload, system, source)
    back_alone = switch_seconds(workload, system, layout, schedule, None, 1)
    back_ep8 = switch_seconds(workload, system, layout, schedule, None, 8)
    params = ffn_params(768, 3072, False)
    state = params.dense * (DTYPE_BYTES["bf16"] + DTYPE_BYTES["fp32"]) + optimizer_state_bytes(params, workload, layout) \
        + params.replicated * (DTYPE_BYTES["bf16"] + DTYPE_BYTES["fp32"])
    gather = collective_time("all_gather", state, comm_group(8, 1, system.devices_per_node), system)
    assert back_ep8 - back_alone == pytest.approx(12 * gather, rel=1e-6)
    assert switch_seconds(workload, system, layout, schedule, 32, 8) == switch_seconds(workload, system, layout, schedule, 32, 1)
    sparse = sparse_workload(workload, Phase("sparse", 1.0, 32, 8, 8), schedule, source, "schedules.ssd")
    run = estimate(sparse, system, source)
    assert run.layout.ep == 8 and run.comm.ep_link_s > 0
    assert estimate(sparse_workload(workload, Phase("sparse", 1.0, 32, 8), schedule, source, "s"), system,
                    source).comm.ep_link_s == 0


def test_expert_parallelism_must_divide_the_experts():
    with pytest.raises(ValueError, match="ep \\(3\\) must divide"):
        Schedule.model_validate({"experts": 32, "k": 8, "ep": 3, "rule": {
            "warmup_tokens": 1e9, "sparse_tokens": 2e9, "dense_tokens": 0.5e9, "final_dense_tokens": 1e9}})


def test_adaptive_switch_waits_for_a_stable_pattern_and_pays_its_checks():
    """Change 0.5 halving every 2e8 tokens falls to 0.05 after 2e8 x log2(10) = 6.64e8 tokens:
    the first checkpoint (every 1e8) at or after it is 7e8. Each check runs 1e6 probe tokens
    forward: a third of a training step's time per token."""
    switch = AdaptiveSwitch(check_every_tokens=1e8, probe_tokens=1e6, threshold=0.05, initial_change=0.5,
                            halving_tokens=2e8)
    assert switch.stable_after_tokens() == pytest.approx(7e8)
    assert AdaptiveSwitch(check_every_tokens=1e8, probe_tokens=1e6, threshold=0.01, initial_change=0.5,
                          halving_tokens=2e8).stable_after_tokens() == pytest.approx(12e8)  # log2(50) = 5.64 halvings
    result = _estimate(SSD)
    dense_step = result.step.step_s
    monitor = next(r for r in result.phases if r.schedule == "adaptive" and r.phase == "monitor")
    assert monitor.steps == pytest.approx(7) and monitor.step_s == pytest.approx(dense_step * 1e6 / (512 * 1024) / 3)
    warmup = next(r for r in result.phases if r.schedule == "adaptive" and r.phase == "phase 1")
    assert warmup.tokens == pytest.approx(7e8)
    # A stricter threshold switches later: fewer sparse tokens, fewer FLOPs saved.
    strict, _ = load_workload(SSD, ["schedules.adaptive.rule.adaptive.threshold=0.01"])
    later = estimate(strict, load_hardware("dgx_a100_x1"), SSD).schedules["schedule adaptive"]
    assert later.sparse_token_share < result.schedules["schedule adaptive"].sparse_token_share
    assert later.flops_saved_vs_dense < result.schedules["schedule adaptive"].flops_saved_vs_dense


@pytest.mark.parametrize("rule,message", [
    ({"warmup_tokens": 1e9, "adaptive": {"check_every_tokens": 1e8, "probe_tokens": 1e6, "threshold": 0.05,
                                          "halving_tokens": 2e8}}, "either warmup_tokens"),
    ({"adaptive": {"check_every_tokens": 1e6, "probe_tokens": 1e8, "threshold": 0.05, "halving_tokens": 2e8}},
     "probe_tokens"),
])
def test_adaptive_rule_bad_input(rule, message):
    rule.update({"sparse_tokens": 2e9, "dense_tokens": 0.5e9, "final_dense_tokens": 1e9})
    with pytest.raises(ValueError, match=message):
        Schedule.model_validate({"experts": 32, "k": 8, "rule": rule})
