"""Measured collective curves: the shipped DGX A100 all-reduce lines (Vidur's published sweep,
fitted by `simcc calibrate`), the ring halves taken from an all-reduce fit, monotone ranges, the
held-out split per rank count, and the Vidur table converter."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from simcc.calibrate.fit import held_out_mask
from simcc.costs.collectives import bus_bandwidth, collective_time
from simcc.layout import CommGroup
from simcc.specs.hardware import CollectiveFit
from simcc.specs.loader import load_hardware

from conftest import with_intra_fits

ROOT = Path(__file__).resolve().parents[1]
EIGHT = CommGroup(8, 8)


def _with_fits(fits: list[CollectiveFit]):
    return with_intra_fits(load_hardware("dgx_a100_x1", []), fits)


def test_shipped_a100_lines_follow_the_measured_mid_size_slowdown() -> None:
    system = load_hardware("dgx_a100_x1", [])
    # Vidur's DGX A100 sweep: 64 MiB all-reduce on 8 GPUs in 675 us (174 GB/s bus bandwidth),
    # where 300 GB/s x 0.80 per direction would give ~230 GB/s.
    seconds = collective_time("all_reduce", 64 << 20, EIGHT, system)
    assert seconds == pytest.approx(675e-6, rel=0.05)
    # Large messages still reach the nccl-tests bandwidth (232 GB/s at 1 GiB; Galvatron 230.8).
    large = collective_time("all_reduce", 1 << 30, EIGHT, system)
    assert 215e9 < bus_bandwidth("all_reduce", 1 << 30, large, 8) < 235e9
    # Galvatron's 8x A100 fixture, not used in the fit: 178.7 GB/s at 64 MB, 186.9 at 128 MB.
    for size, measured in ((64e6, 178.7e9), (128e6, 186.9e9)):
        predicted = bus_bandwidth("all_reduce", size, collective_time("all_reduce", size, EIGHT, system), 8)
        assert predicted == pytest.approx(measured, rel=0.08)


def test_groups_across_nodes_and_unfitted_rank_counts_keep_the_model() -> None:
    system = load_hardware("dgx_a100_x8", [])
    fitted = load_hardware("dgx_a100_x1", [])
    bare = _with_fits([])
    # 16 ranks over two nodes: the hierarchical model, the same with or without intra-node fits
    across = CommGroup(16, 8)
    assert collective_time("all_reduce", 64e6, across, system) == collective_time("all_reduce", 64e6, across, bare)
    # 3 ranks were never measured: the model answers
    three = CommGroup(3, 3)
    assert collective_time("all_reduce", 64e6, three, fitted) == collective_time("all_reduce", 64e6, three, bare)


def test_ring_halves_take_half_a_measured_all_reduce() -> None:
    # One line: t = 100 us + bytes / 50 GB/s. Hand-derived: a 10 MB all-reduce takes
    # 100 + 200 = 300 us, its reduce-scatter and all-gather halves 150 us each.
    system = _with_fits([CollectiveFit(collective="all_reduce", ranks=8, max_bytes=1e12, latency_us=100.0,
                                       bandwidth_gb_s=50.0)])
    assert collective_time("all_reduce", 10e6, EIGHT, system) == pytest.approx(300e-6)
    assert collective_time("all_gather", 10e6, EIGHT, system) == pytest.approx(150e-6)
    assert collective_time("reduce_scatter", 10e6, EIGHT, system) == pytest.approx(150e-6)
    # a measured all-gather of its own wins over the half
    own = _with_fits([CollectiveFit(collective="all_reduce", ranks=8, max_bytes=1e12, latency_us=100.0,
                                    bandwidth_gb_s=50.0),
                      CollectiveFit(collective="all_gather", ranks=8, max_bytes=1e12, latency_us=10.0,
                                    bandwidth_gb_s=100.0)])
    assert collective_time("all_gather", 10e6, EIGHT, own) == pytest.approx(110e-6)
    # all-to-all is not a ring half: the model answers
    assert collective_time("all_to_all", 10e6, EIGHT, system) == collective_time("all_to_all", 10e6, EIGHT, _with_fits([]))


def test_a_larger_message_never_finishes_sooner_across_a_range_edge() -> None:
    # Range 1 (to 4 MB): 20 us + bytes / 40 GB/s -> 120 us at its top. Range 2: 10 us + bytes /
    # 200 GB/s would give 30 us just above 4 MB: held at 120 us until its own line passes it
    # (at 22 MB: 10 + 110 = 120 us).
    system = _with_fits([CollectiveFit(collective="all_reduce", ranks=8, max_bytes=4e6, latency_us=20.0, bandwidth_gb_s=40.0),
                         CollectiveFit(collective="all_reduce", ranks=8, max_bytes=1e12, latency_us=10.0, bandwidth_gb_s=200.0)])
    assert collective_time("all_reduce", 4e6, EIGHT, system) == pytest.approx(120e-6)
    assert collective_time("all_reduce", 4.1e6, EIGHT, system) == pytest.approx(120e-6)
    assert collective_time("all_reduce", 30e6, EIGHT, system) == pytest.approx(160e-6)
    shipped = load_hardware("dgx_a100_x1", [])
    for ranks in (2, 4, 8):
        times = [collective_time("all_reduce", 1024 * 2 ** (step / 5), CommGroup(ranks, ranks), shipped) for step in range(100)]
        assert all(b >= a for a, b in zip(times, times[1:]))


def test_held_out_points_spread_over_every_rank_count() -> None:
    # Three rank counts measured at the same nine sizes: sorted together, every third point was one
    # rank count, which then had no fit at all. Per rank count: 7 interior points, 3 held out.
    sizes = [2 ** k for k in range(10, 19)]
    frame = pd.DataFrame([{"family": "all_reduce", "ranks": ranks, "kernel_flops": size, "bytes": size}
                          for ranks in (2, 4, 8) for size in sizes])
    mask = held_out_mask(frame)
    for ranks in (2, 4, 8):
        held = mask[frame["ranks"] == ranks]
        assert int(held.sum()) == 3
        assert not held.iloc[0] and not held.iloc[-1]  # the ends stay in the fit


def _converter():
    spec = importlib.util.spec_from_file_location("import_vidur_collectives", ROOT / "benchmarks" / "import_vidur_collectives.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vidur_rows_become_simcc_collective_rows(tmp_path: Path) -> None:
    module = _converter()
    header = ["", "time_stats.all_reduce.min", "time_stats.all_reduce.max", "time_stats.all_reduce.mean",
              "time_stats.all_reduce.median", "time_stats.all_reduce.std", "rank", "num_workers", "size", "collective",
              "devices_per_node", "max_devices_per_node"]
    rows = [
        ["0", "0.6", "0.7", "0.65", "0.675", "0.01", "0", "8", str(64 << 20), "all_reduce", "8", "8"],
        ["1", "0.1", "0.2", "0.15", "0.155", "0.01", "0", "8", str(8 << 20), "all_reduce", "8", "8"],
        ["2", "0.1", "0.2", "0.15", "0.150", "0.01", "0", "2", str(8 << 20), "all_reduce", "1", "8"],  # across nodes
    ]
    source = tmp_path / "all_reduce.csv"
    with source.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)
    out = tmp_path / "a100.comm.csv"
    assert module.main([str(source), "--device-name", "A100", "--out", str(out)]) == 0
    converted = list(csv.DictReader(out.open()))
    assert [(int(r["ranks"]), int(r["bytes"])) for r in converted] == [(8, 8 << 20), (8, 64 << 20)]
    assert float(converted[1]["median_s"]) == pytest.approx(675e-6)  # milliseconds to seconds
    assert float(converted[1]["p10_s"]) == pytest.approx(600e-6) and float(converted[1]["p90_s"]) == pytest.approx(700e-6)
    before = out.read_bytes()  # a table the user owns is never replaced
    assert module.main([str(source), "--device-name", "A100", "--out", str(out)]) == 2
    assert out.read_bytes() == before


def test_the_shipped_table_refits_to_the_shipped_lines() -> None:
    """`simcc calibrate` on the committed table reproduces the node profile's fits (to the printed
    two decimals), so the profile's lines can be regenerated from the data."""
    from simcc.calibrate.fit import comm_held_out, fit_collectives
    from simcc.calibrate.measurements import read_collectives

    table = read_collectives(str(ROOT / "hardware_profiles" / "measured" / "dgx_a100_vidur_2024-05.comm.csv"))
    fits = fit_collectives(table[~comm_held_out(table)])
    shipped = load_hardware("dgx_a100_x1", []).intra_link.fits
    assert len(fits) == len(shipped) == 12
    for fit, line in zip(sorted(fits, key=lambda f: (f.ranks, f.max_bytes)), sorted(shipped, key=lambda f: (f.ranks, f.max_bytes))):
        assert (fit.ranks, fit.max_bytes) == (line.ranks, line.max_bytes)
        assert fit.latency_us == pytest.approx(line.latency_us, abs=0.006)
        assert fit.bandwidth_gb_s == pytest.approx(line.bandwidth_gb_s, abs=0.006)


def test_a_table_that_is_not_vidurs_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    module = _converter()
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    assert module.main([str(wrong), "--device-name", "A100", "--out", str(tmp_path / "o.csv")]) == 2
    assert module.main([str(tmp_path / "missing.csv"), "--device-name", "A100", "--out", str(tmp_path / "o.csv")]) == 2
    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes(b"num_workers,size\n\xe9,1\n")
    assert module.main([str(not_utf8), "--device-name", "A100", "--out", str(tmp_path / "o.csv")]) == 2
    assert module.main([str(wrong), "--device-name", "A100", "--out", str(wrong)]) == 2  # the output is the input
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4
    assert "num_workers" in lines[0] and "file not found" in lines[1] and "UTF-8" in lines[2] and "exists" in lines[3]
    assert not (tmp_path / "o.csv").exists() and wrong.read_text() == "a,b\n1,2\n"
