"""The CLI as a user meets it: formats, listing, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from simcc.cli import main

from conftest import write


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_estimate_formats_agree():
    args = ["estimate", "mixtral_8x7b_train_64xh100", "--hardware", "dgx_h100_x8"]
    table = invoke(*args)
    assert table.exit_code == 0 and "model_tflops_per_device" in table.output
    data = json.loads(invoke(*args, "--format", "json").output)
    rows = list(csv.DictReader(io.StringIO(invoke(*args, "--format", "csv").output)))
    by_key = {(r["section"], r["metric"]): r["value"] for r in rows}
    assert float(by_key[("step", "step_s")]) == pytest.approx(data["step"]["step_s"])
    assert data["layout"]["dp"] == 16 and data["workload"] == "mixtral-8x7b-train-64xh100"


def test_set_override_changes_the_estimate():
    base = json.loads(invoke("estimate", "mixtral_8x7b_train_64xh100", "-H", "dgx_h100_x8", "--format", "json").output)
    more = json.loads(invoke("estimate", "mixtral_8x7b_train_64xh100", "-H", "dgx_h100_x8", "--format", "json",
                             "--set", "train.global_batch=512").output)
    assert more["layout"]["microbatches_per_step"] == 2 * base["layout"]["microbatches_per_step"]


def test_list_shows_profiles_and_workloads():
    result = invoke("list", "--format", "json")
    rows = json.loads(result.output)
    assert {"dgx_h100_x8", "mixtral_8x7b_train_64xh100", "jetson_agx_orin"} <= {r["name"] for r in rows}


def test_help():
    assert invoke("--help").exit_code == 0
    assert "--set" in invoke("estimate", "--help").output


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True)


BAD_CASES = {
    "tp_pp_not_dividing": (["--set", "parallelism.pp=3"], "parallelism", "does not divide the 64 devices"),
    "ep_not_dividing_experts": (["--set", "parallelism.ep=16"], "parallelism.ep", "ep=16 does not divide experts=8"),
    "heads_not_divisible": (["--set", "parallelism.tp=64", "--set", "parallelism.pp=1", "--set", "parallelism.vpp=1",
                             "--set", "parallelism.schedule=1f1b", "--set", "parallelism.ep=1"],
                            "parallelism.tp", "does not divide attention heads=32"),
    "dp_mismatch": (["--set", "parallelism.dp=3"], "parallelism.dp", "64 devices"),
    "negative": (["--set", "train.seq_len=-1"], "train.seq_len", "greater than 0"),
    "wrong_type": (["--set", "parallelism.micro_batch=many"], "parallelism.micro_batch", "integer"),
    "unknown_key": (["--set", "parallelism.zero=1"], "parallelism.zero", "did you mean 'zero_stage'"),
    "dtype_missing_on_device": (["--set", "precision.compute=fp8", "-H", "dgx_a100_x8"], "precision.compute", "no fp8 peak"),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_input_is_one_line_and_exit_2(case):
    extra, field, fragment = BAD_CASES[case]
    hardware = [] if "-H" in extra else ["-H", "dgx_h100_x8"]
    result = _cli("estimate", "mixtral_8x7b_train_64xh100", *hardware, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: ") and f": {field}: " in lines[0] and fragment in lines[0]


def test_missing_files_exit_2(tmp_path):
    result = _cli("estimate", str(tmp_path / "missing.yaml"), "-H", "dgx_h100_x8")
    assert result.returncode == 2 and "missing.yaml: file not found" in result.stderr
    result = _cli("estimate", "mixtral_8x7b_train_64xh100", "-H", str(tmp_path / "nohw.yaml"))
    assert result.returncode == 2 and "nohw.yaml: file not found" in result.stderr


def test_bad_workload_file_names_the_file(tmp_path):
    path = write(tmp_path, "w.yaml", "name: x\nmode: trian\nmodel: {name: m, hidden: 8, blocks: [{mlp: {widths: [8, 8]}}]}\n")
    result = _cli("estimate", str(path), "-H", "h100_sxm")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}: mode: expected 'train' or 'serve'")


def test_click_usage_errors_exit_2():
    assert _cli("estimate", "mixtral_8x7b_train_64xh100").returncode == 2  # --hardware missing
    assert _cli("estimate", "x", "-H", "y", "--format", "xml").returncode == 2


def test_bad_ffn_shape_is_one_line_before_any_profiling(tmp_path):
    run = _cli("profile", "--ffn-shape", "768x3072x7", "--out", str(tmp_path / "k.csv"))
    assert run.returncode == 2 and "--ffn-shape" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "k.csv").exists()
