"""compare and sweep: rows agree with single estimates, axes expand to their product, invalid
combinations keep their reason, the Pareto front is right, and Ray gives the local results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simcc.estimate import SimulationOptions, estimate
from simcc.specs.loader import load_hardware, load_workload
from simcc.sweep.pareto import pareto_front
from simcc.sweep.run import Config, evaluate, run_local, sweep_configs
from simcc.sweep.spec import SweepSpec

# GPT-2 small trained dense (the SSD workload without its schedules): one estimate takes ~10 ms.
WORKLOAD = "ssd_gpt2_small_train"
DENSE = "schedules=null"


def simcc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True)


def _tokens_per_s(overrides: list[str], hardware: str, steps: int) -> float:
    workload, source = load_workload(WORKLOAD, [DENSE, *overrides])
    return estimate(workload, load_hardware(hardware), source, SimulationOptions(steps=steps)).throughput.tokens_per_s


def _sweep_file(tmp_path: Path, **changes) -> Path:
    spec = {"workload": WORKLOAD, "hardware": ["dgx_a100_x1"], "set": [DENSE],
            "axes": {"parallelism.micro_batch": [4, 8]}, "steps": 1, **changes}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_compare_rows_equal_single_estimates_and_mark_the_best():
    run = simcc("compare", WORKLOAD, "--hardware", "dgx_a100_x1", "--hardware", "hgx_h200_x2", "--set", DENSE,
                "--steps", "2", "--format", "json")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["devices"] for r in rows] == [8, 16]
    for row, hardware in zip(rows, ("dgx_a100_x1", "hgx_h200_x2")):
        assert row["tokens_per_s"] == pytest.approx(_tokens_per_s([], hardware, 2), rel=1e-12)
    fastest = max(rows, key=lambda r: r["tokens_per_s"])
    cheapest = min(rows, key=lambda r: r["usd_per_million_tokens"])
    assert "fastest" in fastest["mark"] and "cheapest" in cheapest["mark"]


def test_compare_says_why_a_configuration_does_not_run():
    run = simcc("compare", WORKLOAD, "--hardware", "dgx_a100_x1", "--hardware", "hgx_h200_x2", "--set", DENSE,
                "--set", "parallelism.micro_batch=48", "--format", "json")
    assert run.returncode == 2 and "micro_batch" in run.stderr and "Traceback" not in run.stderr
    mixed = simcc("compare", WORKLOAD, "--hardware", "dgx_a100_x1", "--hardware", "hgx_h200_x2", "--set", DENSE,
                  "--set", "parallelism.micro_batch=64", "--format", "json")  # 512 = 8 x 64, but not 16 x 64
    assert mixed.returncode == 0, mixed.stderr
    rows = json.loads(mixed.stdout)
    assert rows[0]["status"] != "invalid" and rows[1]["status"] == "invalid" and "micro_batch" in rows[1]["reason"]


def test_sweep_of_two_values_equals_the_two_estimates(tmp_path):
    spec = SweepSpec.model_validate(yaml.safe_load(_sweep_file(tmp_path).read_text()))
    rows = run_local(sweep_configs(spec), jobs=2)
    assert [r["parallelism.micro_batch"] for r in rows] == [4, 8]
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(
            _tokens_per_s([f"parallelism.micro_batch={row['parallelism.micro_batch']}"], "dgx_a100_x1", 1), rel=1e-12)


def test_sweep_expands_the_product_and_keeps_reasons(tmp_path):
    path = _sweep_file(tmp_path, hardware=["dgx_a100_x1", "hgx_h200_x2"],
                       axes={"parallelism.micro_batch": [4, 48], "parallelism.tp": [1, 5]})
    out = tmp_path / "results.csv"
    run = simcc("sweep", str(path), "--out", str(out), "--jobs", "1")
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(out)
    assert len(table) == 2 * 2 * 2
    ok = table[table["status"] == "ok"]
    assert set(zip(ok["parallelism.micro_batch"], ok["parallelism.tp"])) == {(4, 1)}
    assert table[table["status"] == "invalid"]["reason"].str.len().gt(0).all()
    assert "Pareto front" in run.stdout


def test_pareto_front_on_a_hand_made_table():
    table = pd.DataFrame({"name": list("abcdefg"), "time": [1, 2, 2, 3, 4, 5, 1],
                          "cost": [9, 5, 6, 5, 2, 1, 10]})
    # a(1,9) beats g(1,10); c(2,6) loses to b(2,5); d(3,5) loses to b; e and f trade time for cost.
    assert pareto_front(table, "time", "cost")["name"].tolist() == ["a", "b", "e", "f"]


def test_bad_sweeps_are_one_line_errors(tmp_path):
    typo = _sweep_file(tmp_path, axes={"parallelism.micro_batch": []})
    run = simcc("sweep", str(typo))
    assert run.returncode == 2 and "axes" in run.stderr and "Traceback" not in run.stderr
    wrong_path = _sweep_file(tmp_path, axes={"parallelism.micro_btach": [1, 2]})
    run = simcc("sweep", str(wrong_path))
    assert run.returncode == 2 and "micro_btach" in run.stderr
    run = simcc("sweep", str(_sweep_file(tmp_path)), "--out", str(tmp_path / "results.txt"))
    assert run.returncode == 2 and ".csv or .parquet" in run.stderr


def test_plot_and_parquet(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pyarrow")
    plot, out = tmp_path / "front.png", tmp_path / "results.parquet"
    run = simcc("sweep", str(_sweep_file(tmp_path)), "--plot", str(plot), "--out", str(out), "--jobs", "1")
    assert run.returncode == 0, run.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_parquet(out)) == 2


def test_ray_executor_gives_the_local_results(tmp_path):
    """Runs a local Ray instance on the CI machine's 2 cores."""
    ray = pytest.importorskip("ray")
    configs = [Config(WORKLOAD, "dgx_a100_x1", (DENSE, f"parallelism.micro_batch={m}"), steps=1) for m in (2, 4, 8, 48)]
    from simcc.sweep.run import run_ray

    try:
        remote = run_ray(configs)
    finally:
        ray.shutdown()
    local = [evaluate(c) for c in configs]
    assert remote == local


@pytest.mark.parametrize("workload, hardware, overrides", [
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x8", []),
    ("mixtral_8x7b_train_64xh100", "dgx_h100_x8", ["parallelism.recompute=selective", "parallelism.pp=2"]),
    ("gpt_22b_dense_train_8xa100", "dgx_a100_x1", []),
    ("switch_base_128_train", "dgx_a100_x4", []),
])
def test_the_fit_check_a_sweep_runs_first_matches_the_full_plan(workload, hardware, overrides):
    from simcc.layout import build_layout
    from simcc.plan.training import build_training_plan, chunk_works, footprint, stage_footprints

    spec, source = load_workload(workload, overrides)
    system = load_hardware(hardware)
    layout = build_layout(spec, system, source)
    plan = build_training_plan(spec, system, layout)
    from_plan = [(s.params, sum(c.saved_bytes for c in s.chunks), max(c.transient_bytes for c in s.chunks),
                  max(c.largest_unit_saved for c in s.chunks)) for s in plan.stages]
    assert from_plan == [footprint(s.chunks) for s in plan.stages]
    works = chunk_works(spec, layout)
    assert stage_footprints(spec, layout, works) == from_plan
    shared = build_training_plan(spec, system, layout, works=works)  # the plan a sweep builds after its check
    assert [(c.forward, c.backward, c.grad_buckets) for s in shared.stages for c in s.chunks] == \
        [(c.forward, c.backward, c.grad_buckets) for s in plan.stages for c in s.chunks]


def test_a_sweep_skips_what_does_not_fit_with_the_estimates_reason():
    config = Config("mixtral_8x7b_train_64xh100", "dgx_h100_x8", ("parallelism.ep=1", "parallelism.pp=2"),
                    steps=1, simulate_unfit=False)
    skipped = evaluate(config)
    full = evaluate(Config(config.workload, config.hardware, config.overrides, steps=1))
    assert skipped["status"] == full["status"] == "does not fit"
    assert skipped["reason"] == full["reason"] and skipped["memory_gb"] == pytest.approx(full["memory_gb"])
    assert skipped["step_s"] is None and full["step_s"] > 0
