"""`simcc validate --suite published`: every published case still estimates, errors are the
signed ratio to the measured figure, no case moves unseen (the golden table), and the mechanisms
the suite leans on hold by hand."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from simcc.costs.collectives import bus_bandwidth, collective_time
from simcc.layout import CommGroup
from simcc.model.blocks import distinct_rows
from simcc.specs.loader import load_hardware, load_workload
from simcc.validation import SUITES, load_suite, run_suite, summary

from conftest import with_intra_fits


@pytest.fixture(scope="module")
def rows():
    return run_suite(load_suite("published"))


GOLDEN = Path(__file__).parent / "golden"
ERROR_TOLERANCE_POINTS = 1.0  # percentage points a case may move before the golden table must change
MEMORY_TOLERANCE = 0.01  # relative


def test_every_published_case_estimates(rows):
    suite = load_suite("published")
    assert [r.case for r in rows] == [c.name for c in suite.cases]
    for row, case in zip(rows, suite.cases):
        assert math.isfinite(row.predicted) and row.predicted > 0, row
        assert row.error == pytest.approx(row.predicted / case.measured - 1.0)
        assert row.dominant and case.source
    totals = summary(rows)
    assert totals.cases == len(rows) >= 30
    assert 0 <= totals.median_abs_error <= totals.worst_abs_error


@pytest.fixture(scope="module", params=list(SUITES))
def suite_rows(request, rows):
    return request.param, rows if request.param == "published" else run_suite(load_suite(request.param))


def test_no_case_moves_without_the_golden_table(suite_rows):
    """Every accuracy change is visible in review: a change that moves a case of any suite by more
    than a point (or its predicted memory by more than 1%) fails here until `tests/golden/update.py`
    rewrites the table in the same commit."""
    name, rows = suite_rows
    with (GOLDEN / f"{name}_suite.csv").open(encoding="utf-8") as handle:
        golden = {line["case"]: line for line in csv.DictReader(handle)}
    assert sorted(golden) == sorted(r.case for r in rows), "cases added or removed: run tests/golden/update.py"
    moved = []
    for row in rows:
        expected = golden[row.case]
        assert float(expected["measured"]) == pytest.approx(row.measured), f"{row.case}: measured figure changed"
        if abs(row.error * 100 - float(expected["error_pct"])) > ERROR_TOLERANCE_POINTS:
            moved.append(f"{row.case}: error {float(expected['error_pct']):+.1f}% -> {row.error * 100:+.1f}%")
        if expected["memory_gb"] and row.memory_gb is not None and \
                abs(row.memory_gb / float(expected["memory_gb"]) - 1) > MEMORY_TOLERANCE:
            moved.append(f"{row.case}: memory {expected['memory_gb']} -> {row.memory_gb:.2f} GB")
    assert not moved, "cases moved (update tests/golden with the change that moved them):\n" + "\n".join(moved)


def test_suite_covers_the_published_families():
    metrics = {c.metric for c in load_suite("published").cases}
    assert metrics == {"step_s", "tflops_per_device", "throughput_ratio", "activation_memory_ratio", "busbw_gb_s", "latency_us"}


def test_large_all_reduce_bus_bandwidth_is_the_link_at_its_efficiency():
    # the link model alone: the shipped node's measured lines are checked in test_measured_collectives
    system = with_intra_fits(load_hardware("dgx_a100_x1"), [])
    size = 2.0**30
    seconds = collective_time("all_reduce", size, CommGroup(8, 8), system)
    # nccl-tests bus bandwidth of a ring all-reduce tends to the link bandwidth x efficiency (300 x 0.8)
    assert bus_bandwidth("all_reduce", size, seconds, 8) / 1e9 == pytest.approx(240, rel=0.01)


def test_distinct_rows_by_hand():
    assert distinct_rows(2, 1, 0.0) == pytest.approx(1.0)  # one draw touches one row
    assert distinct_rows(2, 2, 0.0) == pytest.approx(1.5)  # 2 - 2 * (1/2)^2
    assert distinct_rows(1000, 1e7, 1.0) == pytest.approx(1000, rel=1e-3)  # every row, eventually
    assert distinct_rows(793471, 20480, 1.0) < 20480  # Zipf: repeats


def test_sparse_embedding_gradients_replace_the_table_all_reduce():
    from simcc.layout import build_layout
    from simcc.plan.training import build_training_plan

    system = load_hardware("k40_x16")

    def grad_bytes(sparse: bool) -> dict[str, float]:
        """Bytes per kind of gradient collective over all units' buckets."""
        workload, source = load_workload("shazeer_4xlstm512_train", [f"model.blocks.0.embedding.sparse_gradients={str(sparse).lower()}"])
        plan = build_training_plan(workload, system, build_layout(workload, system, source))
        chunk = plan.stages[0].chunks[0]
        totals: dict[str, float] = {}
        for bucket in chunk.grad_buckets:
            for cost in bucket:
                totals[cost.name] = totals.get(cost.name, 0.0) + cost.bytes
        return totals

    dense, sparse = grad_bytes(False), grad_bytes(True)
    table = 793471 * 512 * 4
    assert dense["grad_all_reduce.dp"] == pytest.approx(sparse["grad_all_reduce.dp"] + table)
    rows = distinct_rows(793471, 16384 * 20 / 16, 1.0)
    assert sparse["embed.sparse_grad_all_gather"] == pytest.approx(16 * rows * (512 * 4 + 8))


def test_suite_cli_errors_and_json():
    bad = subprocess.run([sys.executable, "-m", "simcc", "validate", "--suite", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown suite" in bad.stderr and "Traceback" not in bad.stderr
    none = subprocess.run([sys.executable, "-m", "simcc", "validate"], capture_output=True, text=True)
    assert none.returncode == 2 and "--suite" in none.stderr
