"""Profile -> calibrate -> validate on this machine's CPU, with small shapes. Timing is noisy, so
the assertions are about well-formed outputs and finite, reported errors, never about speed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from simcc.calibrate.fit import held_out_mask  # noqa: E402
from simcc.isotonic import isotonic  # noqa: E402
from simcc.profile.kernels import FAMILIES, HOST_CORES_COLUMN, HOST_LOAD_COLUMN, MEASUREMENT_COLUMNS  # noqa: E402
from simcc.specs.loader import load_hardware  # noqa: E402


def simcc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "cpu.csv"
    result = simcc("profile", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_profile_writes_a_tidy_table(measured):
    frame = pd.read_csv(measured)
    assert list(frame.columns) == [*MEASUREMENT_COLUMNS, HOST_LOAD_COLUMN, HOST_CORES_COLUMN]
    assert (frame[HOST_CORES_COLUMN] >= frame["threads"]).all()  # a process's share of its host
    assert (frame[HOST_LOAD_COLUMN] >= 0).all()  # the profiler watched its host
    assert set(frame["family"]) == set(FAMILIES)
    assert (frame["median_s"] > 0).all() and (frame["p10_s"] <= frame["p90_s"]).all()
    assert frame["device_type"].unique().tolist() == ["cpu"]


def test_calibrate_writes_a_new_profile_and_reports_held_out_error(measured, tmp_path):
    out = tmp_path / "calibrated.yaml"
    before = measured.read_bytes()
    result = simcc("calibrate", str(measured), "--base", "cpu_host_generic", "--out", str(out), "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert measured.read_bytes() == before  # the input is untouched
    summary = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert {"family", "points", "median_abs_error", "worst_abs_error"} <= set(summary.columns)
    assert summary["median_abs_error"].map(math.isfinite).all()
    system = load_hardware(str(out))  # estimate can use it directly
    efficiency = system.device.efficiency
    # every family has a fitted curve, unless the host was busy and calibrate says why it kept the
    # base profile's figure: timings too contended to fit, or a fit its held-out timings refuted
    notes = result.stderr  # with --format csv the notes go to stderr, the table stays parseable
    for family in ("gemm", "grouped_gemm", "attention"):
        said = f"{family}: " in notes and ("contended" in notes or "missed its held-out points" in notes)
        assert family in efficiency.curves or said
    assert efficiency.memory_curves or "could not be measured" in notes
    assert "calibrated" in system.device.name


def test_validate_predicts_every_row_with_finite_error(measured, tmp_path):
    out = tmp_path / "calibrated.yaml"
    assert simcc("calibrate", str(measured), "--base", "cpu_host_generic", "--out", str(out)).returncode == 0
    result = simcc("validate", "--profile", str(out), "--measurements", str(measured), "--format", "csv")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert len(table) == len(pd.read_csv(measured))
    assert table["error"].map(math.isfinite).all()
    assert set(table["family"]) >= {"moe_layer"}  # the end-to-end layer check


def test_calibrate_refuses_to_overwrite_its_inputs(measured):
    result = simcc("calibrate", str(measured), "--base", "cpu_host_generic", "--out", str(measured))
    assert result.returncode == 2 and "would overwrite an input" in result.stderr


@pytest.mark.parametrize("mutation,fragment", [
    (lambda f: f.drop(columns=["median_s"]), "missing column"),
    (lambda f: f.assign(family="warp_drive"), "unknown op name"),
    (lambda f: f.assign(device_type="cuda"), "describes a cpu"),
])
def test_bad_measurements_are_one_line_errors(measured, tmp_path, mutation, fragment):
    bad = tmp_path / "bad.csv"
    mutation(pd.read_csv(measured)).to_csv(bad, index=False)
    result = simcc("calibrate", str(bad), "--base", "cpu_host_generic", "--out", str(tmp_path / "o.yaml"))
    assert result.returncode == 2 and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_gpu_profile_rejects_cpu_measurements(measured, tmp_path):
    result = simcc("calibrate", str(measured), "--base", "h100_sxm", "--out", str(tmp_path / "o.yaml"))
    assert result.returncode == 2 and "measured on a cpu" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    result = simcc("profile", "--device", "cuda", "--quick", "--out", str(tmp_path / "x.csv"))
    assert result.returncode == 2 and "CUDA is not available" in result.stderr


def test_monotone_fit_and_hold_out():
    assert isotonic([0.1, 0.3, 0.2, 0.5], [1, 1, 1, 1]) == pytest.approx([0.1, 0.25, 0.25, 0.5])
    frame = pd.DataFrame({"family": ["gemm"] * 6, "kernel_flops": [1, 2, 3, 4, 5, 6], "bytes": [0] * 6})
    held = held_out_mask(frame)
    assert not held.iloc[0] and not held.iloc[-1] and held.sum() == 2  # ends always fitted


# ---------------------------------------------------------------- collectives

from simcc.costs.collectives import collective_time  # noqa: E402
from simcc.layout import CommGroup


@pytest.fixture(scope="module")
def comm_measured(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("comm") / "comm.csv"
    result = simcc("profile", "comm", "--ranks", "2", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_comm_profile_covers_every_collective_and_size(comm_measured):
    frame = pd.read_csv(comm_measured)
    assert set(frame["collective"]) == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"}
    assert frame.groupby("collective")["bytes"].nunique().min() >= 5  # 4 KB .. 4 MB, every 4x
    assert (frame["median_s"] > 0).all() and (frame["backend"] == "gloo").all()


def test_collectives_calibrate_into_link_fits_and_validate(comm_measured, measured, tmp_path):
    out = tmp_path / "node.yaml"
    result = simcc("calibrate", str(measured), str(comm_measured), "--base", "cpu_host_local", "--out", str(out),
                   "--format", "csv")
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert {"all_reduce", "p2p", "gemm"} <= set(summary["family"])
    system = load_hardware(str(out))
    assert {f.collective for f in system.intra_link.fits} == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"}
    checked = simcc("validate", "--profile", str(out), "--measurements", str(comm_measured), "--format", "csv")
    table = pd.read_csv(pd.io.common.StringIO(checked.stdout))
    assert checked.returncode == 0 and table["error"].map(math.isfinite).all()


def test_collective_measurements_need_a_node_profile(comm_measured, tmp_path):
    result = simcc("calibrate", str(comm_measured), "--base", "cpu_host_generic", "--out", str(tmp_path / "x.yaml"))
    assert result.returncode == 2 and "need a node or cluster profile" in result.stderr


def test_unknown_collective_is_a_one_line_error(comm_measured, tmp_path):
    bad = tmp_path / "bad.csv"
    pd.read_csv(comm_measured).assign(collective="broadcast_storm").to_csv(bad, index=False)
    result = simcc("calibrate", str(bad), "--base", "cpu_host_local", "--out", str(tmp_path / "x.yaml"))
    assert result.returncode == 2 and "unknown op name" in result.stderr and "Traceback" not in result.stderr


def test_fitted_lines_replace_the_model_for_the_groups_they_cover():
    from simcc.specs.hardware import CollectiveFit

    system = load_hardware("dgx_h100_x1")
    fits = [CollectiveFit(collective="all_reduce", ranks=8, max_bytes=65536, latency_us=40, bandwidth_gb_s=10),
            CollectiveFit(collective="all_reduce", ranks=8, max_bytes=1e12, latency_us=100, bandwidth_gb_s=180)]
    link = system.intra_link.model_copy(update={"fits": fits})
    import dataclasses

    calibrated = dataclasses.replace(system, intra_link=link)
    assert collective_time("all_reduce", 32e3, CommGroup(8, 8), calibrated) == pytest.approx(40e-6 + 32e3 / 10e9)
    assert collective_time("all_reduce", 1e9, CommGroup(8, 8), calibrated) == pytest.approx(100e-6 + 1e9 / 180e9)
    # a group size or collective the fits do not cover keeps the model
    assert collective_time("all_reduce", 1e9, CommGroup(4, 4), calibrated) == collective_time("all_reduce", 1e9, CommGroup(4, 4), system)
    assert collective_time("all_to_all", 1e9, CommGroup(8, 8), calibrated) == collective_time("all_to_all", 1e9, CommGroup(8, 8), system)
    # an all-gather is half of a ring all-reduce: half the fitted all-reduce line
    assert collective_time("all_gather", 1e9, CommGroup(8, 8), calibrated) == pytest.approx((100e-6 + 1e9 / 180e9) / 2)


def test_balanced_kmeans_gives_equal_clusters_closer_than_chance():
    from simcc.profile.moefication import balanced_kmeans

    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(8, 32, generator=generator) * 4
    rows = (centres.repeat_interleave(64, dim=0) + torch.randn(512, 32, generator=generator))[torch.randperm(512, generator=generator)]
    labels = balanced_kmeans(rows, 8, 10)
    assert torch.bincount(labels, minlength=8).tolist() == [64] * 8  # balanced: f/E neurons each

    def spread(assignment):
        return sum(((rows[assignment == c] - rows[assignment == c].mean(0)) ** 2).sum().item() for c in range(8))

    chance = torch.arange(512) % 8
    assert spread(labels) < 0.5 * spread(chance)
