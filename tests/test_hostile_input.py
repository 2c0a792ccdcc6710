"""Hostile input keeps simcc's promise: one line naming the file and the field, exit code 2, no
traceback; sizes no real system has are refused with their limit; no output replaces a file the
command reads; an interrupted sweep stops at once. Every case here once broke that promise."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = ROOT / "workloads" / "mixtral_8x7b_train_64xh100.yaml"
MOE = "model.blocks.1.blocks.1.moe_ffn"


def simcc(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def estimate(*sets: str, workload: str = str(WORKLOAD), hardware: str = "dgx_h100_x8", extra: tuple[str, ...] = ()):
    args = ["estimate", workload, "-H", hardware, "--steps", "1", "--format", "json", *extra]
    for text in sets:
        args += ["--set", text]
    return simcc(*args)


# ---------------------------------------------------------------- files that are not specs

def test_a_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_bytes(WORKLOAD.read_bytes() + b"\xff\xfe")
    assert_one_line_error(estimate(workload=str(bad)), "w.yaml", "expected UTF-8 text")


def test_nesting_deeper_than_any_spec(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 1000 + "]" * 1000 + "\n")
    assert_one_line_error(estimate(workload=str(deep)), "deep.yaml", "nested deeper than")


def test_a_key_given_twice_is_refused_not_last_wins(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text(WORKLOAD.read_text() + "seed: 3\nseed: 4\n")
    assert_one_line_error(estimate(workload=str(twice)), "twice.yaml", "key 'seed' appears twice")


@pytest.mark.parametrize("kind", ["{a: 1}", "[node, cluster]"])
def test_profile_kind_as_a_mapping_or_list(tmp_path, kind):
    profile = tmp_path / "p.yaml"
    profile.write_text(f"kind: {kind}\nname: x\n")
    assert_one_line_error(estimate(hardware=str(profile)), "p.yaml", "kind")


def test_a_folder_given_as_a_file(tmp_path):
    assert_one_line_error(estimate(workload=str(tmp_path)), "is a folder")
    assert_one_line_error(estimate(extra=("--trace", str(tmp_path))), "--trace", "is a folder")


# ---------------------------------------------------------------- numbers no system has

@pytest.mark.parametrize("override", [
    "hardware.network.oversubscription=.inf", "hardware.network.latency_us=.inf",
    "hardware.node.device.efficiency.kernel_launch_us=.inf", "train.total_tokens=.inf", "train.total_tokens=.nan",
    "hardware.node.device.memory_gb=.inf", "hardware.node.device.reserve_gb=.inf",
])
def test_infinite_or_nan_floats_are_refused(override):
    assert_one_line_error(estimate(override), override.split("=")[0].removeprefix("hardware."), "finite")


@pytest.mark.parametrize("override", ["hardware.network.nic_gbit_s=5e-324", "hardware.node.intra_link.bandwidth_gb_s=1e-300",
                                      "hardware.node.device.efficiency.matmul=5e-324"])
def test_a_subnormal_figure_is_refused_with_the_floor(override):
    """A positive figure or fraction so small that what is derived from it underflows to 0 once
    divided (a ZeroDivisionError in the all-to-all and the roofline, found by the fuzzer) is
    refused, its floor written as 1e-18."""
    assert_one_line_error(estimate(override, workload=str(ROOT / "workloads/validation/deepep_moe_layer.yaml")),
                          override.split("=")[0].removeprefix("hardware."), "1e-18")


@pytest.mark.parametrize("override, workload, hardware, expected", [
    ("precision.fp8_expert_gemm=per-expert", "mixtral_8x7b_train_64xh100", "dgx_h100_x8", "expected 'per_expert' or 'grouped'"),
    ("serve.prompt_logits=first", "qwen3_30b_a3b_serve", "raspberry_pi_5", "expected 'last' or 'all'"),
    ("train.local_batch=3", "mixtral_8x7b_train_64xh100", "dgx_h100_x8", "train.local_batch: local_batch=3 must be"),
    ("hardware.device.efficiency.quantized_matmul={q9_0: 0.3}", "qwen3_30b_a3b_serve", "raspberry_pi_5",
     "quantized_matmul.q9_0: expected a weight format"),
    ("hardware.device.peak_tflops={fp32: 0.154}", "qwen3_30b_a3b_serve", "raspberry_pi_5", "needs peak_tflops.int8"),
])
def test_this_rounds_fields_refuse_a_bad_value_in_one_line(override, workload, hardware, expected):
    """The precision, serving, training and profile fields added for issues 17 and 18 answer a bad
    value as every other field does."""
    assert_one_line_error(estimate(override, workload=workload, hardware=hardware), expected)


@pytest.mark.parametrize("option, value", [("--slo-ttft", "nan"), ("--slo-tpot", "inf"), ("--slo-ttft", "0")])
def test_a_latency_objective_that_is_not_a_positive_finite_time_is_refused(option, value):
    serve = str(ROOT / "workloads" / "mixtral_8x7b_serve_edge.yaml")
    assert_one_line_error(simcc("estimate", serve, "-H", "h200", "--requests", "10", option, value), option)


@pytest.mark.parametrize("override, limit", [
    ("seed=" + "9" * 320, "9007199254740992"),
    ("model.blocks.1.repeat=99999999999999999999", "9007199254740992"),
    ("model.blocks.1.repeat=1000000", "100,000"),
    ("train.global_batch=1000000", "131,072"),
    (f"{MOE}.routing.overlap_degree=100000", "64"),
    (f"{MOE}.experts=1000000", "134,217,728"),
    (f"{MOE}.gating.sample_tokens=1000000000", "134,217,728"),
])
def test_sizes_no_real_system_has_are_refused_with_the_limit(override, limit):
    assert_one_line_error(estimate(override), override.split("=")[0], limit)


def test_a_threshold_tree_of_a_billion_branches():
    result = estimate("model.blocks.1.threshold_tree.branching=1000000000",
                      workload="ray_tracing_mlp_serve_rpi5", hardware="raspberry_pi_5")
    assert_one_line_error(result, "threshold_tree", "1,048,576")


def test_json_output_is_strict_and_finite():
    result = estimate()
    assert result.returncode == 0, result.stderr

    def refuse(token: str) -> float:
        raise AssertionError(f"non-finite number {token} in JSON output")

    json.loads(result.stdout, parse_constant=refuse)


# ---------------------------------------------------------------- outputs never replace inputs

def test_trace_naming_the_workload_or_profile_is_refused_and_both_stay_intact(tmp_path):
    workload, profile = tmp_path / "w.yaml", tmp_path / "p.yaml"
    workload.write_text(WORKLOAD.read_text())
    profile.write_text((ROOT / "hardware_profiles/clusters/dgx_h100_x8.yaml").read_text())
    for target in (workload, profile):
        result = estimate(workload=str(workload), hardware=str(profile), extra=("--trace", str(target)))
        assert_one_line_error(result, "--trace", "is a file this command reads")
    assert workload.read_text() == WORKLOAD.read_text()


def test_sweep_out_naming_a_histogram_the_sweep_reads(tmp_path):
    histogram = tmp_path / "loads.csv"
    histogram.write_text("tokens\n" + "".join(f"{n}\n" for n in (5, 1, 1, 1, 1, 1, 1, 1)))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "workload": str(WORKLOAD), "hardware": ["dgx_h100_x8"],
        "set": [f"{MOE}.load.distribution=histogram", f"{MOE}.load.histogram={histogram}"],
        "axes": {"parallelism.pp": [4]}}))
    result = simcc("sweep", str(sweep), "--out", str(histogram), cwd=tmp_path)
    assert_one_line_error(result, "--out", "is a file this command reads")
    assert histogram.read_text().startswith("tokens\n5\n")


def test_calibrate_out_naming_the_base_profiles_device(tmp_path):
    device = ROOT / "hardware_profiles/devices/cpu_host_generic.yaml"
    before = device.read_bytes()
    measured = ROOT / "hardware_profiles/measured"
    kernels = sorted(measured.glob("*.kernels.csv"))[0]
    result = simcc("calibrate", str(kernels), "--base", "cpu_host_local", "--out", str(device), cwd=tmp_path)
    assert_one_line_error(result, "--out")
    assert device.read_bytes() == before


def test_an_output_under_a_regular_file_fails_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    started = time.perf_counter()
    result = simcc("sweep", str(ROOT / "workloads/sweeps/mixtral_clusters.yaml"), "--out", "afile/x.csv", cwd=tmp_path)
    assert_one_line_error(result, "--out", "is a file, not a folder")
    assert time.perf_counter() - started < 30  # refused up front, not after the sweep


def test_outputs_keep_the_mode_of_the_file_they_replace_or_follow_the_umask(tmp_path):
    trace = tmp_path / "t.json"
    assert estimate(extra=("--trace", str(trace))).returncode == 0
    assert stat.S_IMODE(trace.stat().st_mode) == 0o666 & ~_umask()
    trace.chmod(0o640)
    assert estimate(extra=("--trace", str(trace))).returncode == 0
    assert stat.S_IMODE(trace.stat().st_mode) == 0o640


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- sweeps

def test_a_sweep_too_large_to_run_is_refused_before_expanding(tmp_path):
    sweep = tmp_path / "huge.yaml"
    sweep.write_text(yaml.safe_dump({"workload": str(WORKLOAD), "hardware": ["dgx_h100_x8"],
                                     "axes": {"seed": list(range(10)), **{f"set{i}": list(range(10)) for i in range(9)}}}))
    started = time.perf_counter()
    assert_one_line_error(simcc("sweep", str(sweep)), "huge.yaml", "10,000,000,000 configurations", "100,000")
    assert time.perf_counter() - started < 30


def test_an_interrupted_sweep_exits_at_once_without_output(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"workload": str(WORKLOAD), "hardware": ["dgx_h100_x8", "dgx_h100_x4"],
                                     "axes": {"seed": list(range(5000))}}))  # minutes of work
    process = subprocess.Popen([sys.executable, "-m", "simcc", "sweep", str(sweep), "--jobs", "2", "--out", "r.csv"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(6)  # workers are running
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground group
    try:
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode not in (0, None)
    assert list(tmp_path.iterdir()) == [sweep]  # no results table, no temporary file
