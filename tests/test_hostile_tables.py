"""Every CSV a user gives simcc (request traces, placements, histograms, kernel and collective
measurements) keeps the input promise through the real CLI: bad content is one stderr line
`error: FILE: line N: COLUMN: ...`, exit code 2, never a traceback, never a silent NaN."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner, Result

from simcc.cli import main

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "hardware_profiles" / "measured" / "cpu_amd_epyc_2core_2026-11-23"
KERNELS, COMM = MEASURED.with_suffix(".kernels.csv"), MEASURED.with_suffix(".comm.csv")
TRACE_HEADER = "arrival_s,prompt_tokens,output_tokens"
SERVE = ["estimate", "mixtral_8x7b_serve_edge", "-H", "jetson_agx_orin", "--requests-trace"]
MOE = "model.blocks.1.blocks.3.moe_ffn"  # switch_base_128_train: 128 experts, ep 32 on 32 GPUs
PLACED = ["estimate", "switch_base_128_train", "-H", "dgx_a100_x4", "--steps", "1",
          "--set", f"{MOE}.routing.placement=file", "--set", f"{MOE}.routing.placement_file=p.csv"]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Files are named relative to the working directory, as a user names them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def simcc(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Result, file: str, *fragments: str) -> str:
    """Exit code 2 and one `error: FILE: ...` line on stderr naming every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # not an escaped exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {file}: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def rewrite(source: Path, out: str, change: Callable[[list[dict[str, str]]], None]) -> int:
    """Copy a measurements table with `change` applied to its rows; the first changed row's line."""
    with source.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    before = [dict(r) for r in rows]
    change(rows)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    changed = [i for i, (a, b) in enumerate(zip(before, rows)) if a != b]
    return changed[0] + 2 if changed else 0  # line 1 is the header


def first(family: str, column: str, value: str) -> Callable[[list[dict[str, str]]], None]:
    def change(rows: list[dict[str, str]]) -> None:
        next(r for r in rows if family in ("*", r.get("family"), r.get("collective")))[column] = value
    return change


def every(column: str, value: str) -> Callable[[list[dict[str, str]]], None]:
    def change(rows: list[dict[str, str]]) -> None:
        for row in rows:
            row[column] = value
    return change


# ------------------------------------------------------------------ request traces

@pytest.mark.parametrize("rows,line,column,fragment", [
    ("0,inf,128", 2, "prompt_tokens", "got 'inf'"),
    ("0,128", 2, "", "2 fields; the header has 3"),
    ("0,128,128,7", 2, "", "4 fields; the header has 3"),
    ("1,128,128\n0,128", 3, "", "2 fields"),
    ("inf,128,128", 2, "arrival_s", "finite"),
    ("nan,128,128", 2, "arrival_s", "got 'nan'"),
    ("0,nan,128", 2, "prompt_tokens", "got 'nan'"),
    ("-1,128,128", 2, "arrival_s", ">= 0"),
    ("0,-5,128", 2, "prompt_tokens", "from 1 to 10,000,000"),
    ("0,128,0", 2, "output_tokens", "from 1 to 10,000,000"),
    ("0,12.5,128", 2, "prompt_tokens", "an integer"),
    ("0,128,10000001", 2, "output_tokens", "10,000,000"),
    ("0,128,1e300", 2, "output_tokens", "10,000,000"),
    ("0,,128", 2, "prompt_tokens", "an empty cell"),
    ("0,abc,128", 2, "prompt_tokens", "got 'abc'"),
    ("2e9,128,128", 2, "arrival_s", "at most 1,000,000,000"),
])
def test_bad_trace_rows(rows, line, column, fragment):
    Path("t.csv").write_text(f"{TRACE_HEADER}\n{rows}\n")
    field = f"line {line}: {column}:" if column else f"line {line}:"
    assert_one_line_error(simcc(*SERVE, "t.csv"), "t.csv", field, fragment)


@pytest.mark.parametrize("scale,fragment", [("inf", "finite"), ("nan", "got 'nan'"), ("0", "> 0"), ("-1", "> 0"),
                                            ("1e9", "at most 1,000,000")])
def test_bad_compute_scale(scale, fragment):
    Path("t.csv").write_text(f"{TRACE_HEADER},compute_scale\n0,128,128,1\n1,64,64,{scale}\n")
    assert_one_line_error(simcc(*SERVE, "t.csv"), "t.csv", "line 3: compute_scale:", fragment)


def test_a_good_trace_still_runs_with_blank_lines_and_any_order():
    Path("t.csv").write_text(f"{TRACE_HEADER},compute_scale\n0.5,64,32,2.5\n\n0,128,128,1\n2e0,12,40,1\n")
    result = simcc(*SERVE, "t.csv", "--format", "json")
    assert result.exit_code == 0, result.output
    assert "nan" not in result.stdout.lower()


# ------------------------------------------------------------------ placement files

def placement(value: str, position: int = 5, experts: int = 128) -> None:
    ranks = [str(e % 32) for e in range(experts)]
    if position < experts:
        ranks[position] = value
    Path("p.csv").write_text("rank\n" + "\n".join(ranks) + "\n")


@pytest.mark.parametrize("value", ["inf", "1e300", str(2**63), "2**63", "0.5", "-1", "32", "nan", "abc"])
def test_bad_placement_ranks(value):
    placement(value)
    assert_one_line_error(simcc(*PLACED), "p.csv", "line 7: rank:", "an integer from 0 to 31")


def test_placement_needs_every_expert_once():
    placement("0", experts=127)
    assert_one_line_error(simcc(*PLACED), "p.csv", "rank:", "expected 128 rows")
    placement("0", experts=129)
    assert_one_line_error(simcc(*PLACED), "p.csv", "rank:", "expected 128 rows")
    rows = [f"{e},{e % 32}" for e in range(128)]
    Path("p.csv").write_text("expert,rank\n" + "\n".join(rows[:-1] + ["5,31"]) + "\n")
    assert_one_line_error(simcc(*PLACED), "p.csv", "line 129: expert:", "got '5'")
    Path("p.csv").write_text("expert,rank\n" + "\n".join(rows[:-1]) + "\n")
    assert_one_line_error(simcc(*PLACED), "p.csv", "expert:", "expert 127 has no row")
    placement("1", position=0)  # rank 1 now holds five experts
    assert_one_line_error(simcc(*PLACED), "p.csv", "rank:", "each holding 4 experts")


def test_placement_file_is_found_relative_to_the_working_directory():
    assert_one_line_error(simcc(*PLACED), "p.csv", "file not found", "routing.placement_file")
    Path("p.csv").mkdir()
    assert_one_line_error(simcc(*PLACED), "p.csv", "is a folder")


def test_a_placement_with_an_expert_column_is_read_in_expert_order():
    from simcc.routing.load import expert_ranks
    from simcc.specs.blocks import MoEFFNBlock

    rows = [f"{e},{e // 4}" for e in reversed(range(128))]  # contiguous, listed last expert first
    Path("p.csv").write_text("expert,rank\n" + "\n".join(rows) + "\n")
    spec = MoEFFNBlock(experts=128, k=1, expert_hidden=64, routing={"capacity_factor": 1.0, "placement": "file",
                                                                     "placement_file": "p.csv"})
    assert expert_ranks(spec, 32).tolist() == [e // 4 for e in range(128)]


def test_bad_histogram_is_a_one_line_error():
    Path("h.csv").write_text("tokens\n" + "\n".join("inf" if e == 3 else "10" for e in range(128)) + "\n")
    result = simcc("estimate", "switch_base_128_train", "-H", "dgx_a100_x4", "--steps", "1",
                   "--set", f"{MOE}.load.distribution=histogram", "--set", f"{MOE}.load.histogram=h.csv")
    assert_one_line_error(result, "h.csv", "line 5: tokens:", "finite")


# ------------------------------------------------------------------ measurements

def calibrate(path: str) -> Result:
    return simcc("calibrate", path, "--base", "cpu_host_local", "--out", "out.yaml")


def validate(path: str) -> Result:
    return simcc("validate", "--profile", "cpu_host_local", "--measurements", path)


COMMANDS = {"calibrate": calibrate, "validate": validate}
KERNEL_CASES = {
    "tokens_abc": (first("gemm", "tokens", "abc"), "tokens", "got 'abc'"),
    "dtype_fp64": (first("gemm", "dtype", "fp64"), "dtype", "unknown dtype 'fp64'; expected one of fp32"),
    "k_zero_combine": (first("combine", "k", "0"), "k", "at least 1 for a combine row"),
    "k_zero_moe_layer": (first("moe_layer", "k", "0"), "k", "at least 1 for a moe_layer row"),
    "k_above_experts": (first("moe_layer", "k", "9"), "k", "at most the row's experts"),
    "ffn_inf": (first("gemm", "ffn", "inf"), "ffn", "got 'inf'"),
    "hidden_negative": (first("gemm", "hidden", "-1"), "hidden", "from 0 to 10,000,000"),
    "tokens_fractional": (first("gate", "tokens", "2.5"), "tokens", "an integer"),
    "tokens_huge": (first("gemm", "tokens", "1e12"), "tokens", "10,000,000"),
    "experts_huge": (first("moe_layer", "experts", "100000"), "experts", "moe_layer row simcc cannot model"),
    "flops_nan": (first("gemm", "flops", "nan"), "flops", "got 'nan'"),
    "bytes_zero_memcpy": (first("memcpy", "bytes", "0"), "bytes", "at least 1 for a memcpy row"),
    "bytes_all_zero": (every("bytes", "0"), "bytes", "at least 1"),
    "median_inf": (first("gemm", "median_s", "inf"), "median_s", "finite"),
    "median_huge": (first("gemm", "median_s", "1e9"), "median_s", "at most 86,400"),
    "backward_word": (first("moe_layer", "backward", "maybe"), "backward", "True or False"),
    "family_unknown": (first("gemm", "family", "warp_drive"), "family", "unknown op name"),
    "device_type_unknown": (every("device_type", "tpu"), "device_type", "unknown device type"),
    "device_name_empty": (first("gemm", "device_name", ""), "device_name", "an empty cell"),
}


COMM_CASES = {
    "bytes_all_zero": (every("bytes", "0"), "bytes", "> 0"),
    "bytes_inf": (first("*", "bytes", "inf"), "bytes", "finite"),
    "ranks_one": (first("*", "ranks", "1"), "ranks", "from 2 to 1,000,000"),
    "ranks_fractional": (first("*", "ranks", "2.5"), "ranks", "an integer"),
    "ranks_per_node_above_ranks": (first("*", "ranks_per_node", "3"), "ranks_per_node", "at most the row's ranks"),
    "collective_unknown": (first("*", "collective", "broadcast"), "collective", "unknown op name"),
    "median_nan": (first("*", "median_s", "nan"), "median_s", "got 'nan'"),
}


# Each measurement table: the shipped one it mutates, the name it is written under, its cases.
MEASUREMENT_TABLES = {"kernels": (KERNELS, "k.csv", KERNEL_CASES), "collectives": (COMM, "c.csv", COMM_CASES)}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("table,case", [(table, case) for table, (_, _, cases) in MEASUREMENT_TABLES.items()
                                        for case in cases])
def test_bad_measurements(command, table, case):
    shipped, name, cases = MEASUREMENT_TABLES[table]
    change, column, fragment = cases[case]
    line = rewrite(shipped, name, change)
    assert_one_line_error(COMMANDS[command](name), name, f"line {line}: {column}:", fragment)


@pytest.mark.parametrize("command", COMMANDS)
def test_unreadable_measurement_files(command):
    run = COMMANDS[command]
    assert_one_line_error(run("none.csv"), "none.csv", "file not found")
    Path("folder.csv").mkdir()
    assert_one_line_error(run("folder.csv"), "folder.csv", "is a folder")
    Path("empty.csv").write_text("")
    assert_one_line_error(run("empty.csv"), "empty.csv", "empty file")
    Path("header.csv").write_text(KERNELS.read_text().splitlines()[0] + "\n")
    assert_one_line_error(run("header.csv"), "header.csv", "no rows")
    Path("latin1.csv").write_bytes(KERNELS.read_bytes()[:400] + "caf\xe9".encode("latin-1"))
    assert_one_line_error(run("latin1.csv"), "latin1.csv", "expected UTF-8")
    lines = KERNELS.read_text().splitlines()
    Path("ragged.csv").write_text("\n".join(lines[:3] + ["gemm,short"] + lines[3:]) + "\n")
    assert_one_line_error(run("ragged.csv"), "ragged.csv", "line 4:", "2 fields; the header has 20")
    Path("twice.csv").write_text(lines[0] + ",case\n" + "\n".join(line + ",x" for line in lines[1:]) + "\n")
    assert_one_line_error(run("twice.csv"), "twice.csv", "line 1: case:", "appears twice")


def test_a_dtype_the_profile_lacks_names_the_measurements():
    rewrite(KERNELS, "k.csv", every("dtype", "int8"))
    assert_one_line_error(validate("k.csv"), "k.csv", "dtype:", "no int8 peak")


def test_a_numeric_case_name_is_a_label():
    rewrite(KERNELS, "k.csv", lambda rows: [row.update(case=str(i)) for i, row in enumerate(rows)])
    result = validate("k.csv")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("0 ")


def test_copies_of_one_size_keep_the_base_launch_and_bandwidth():
    """A line through copies of one size is undetermined: numpy would warn and return noise."""
    import warnings

    import numpy as np

    rewrite(KERNELS, "k.csv", lambda rows: [row.update(bytes="4096") for row in rows if row["family"] == "memcpy"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.RankWarning)
        result = calibrate("k.csv")
    assert result.exit_code == 0, (result.output, result.exception)


def test_a_real_process_prints_one_line_and_no_traceback(in_tmp):
    (in_tmp / "t.csv").write_text(f"{TRACE_HEADER}\n0,inf,128\n")
    (in_tmp / "k.bin").write_bytes(b"\xff\xfe\x00garbage")
    for args in (SERVE + ["t.csv"], ["validate", "--profile", "cpu_host_local", "--measurements", "k.bin"]):
        result = subprocess.run([sys.executable, "-m", "simcc", *args], capture_output=True, text=True, cwd=in_tmp)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"error: {args[-1]}: ")


def test_the_shipped_measurements_still_read():
    """The valid baseline that every case above breaks in one place."""
    for path in (KERNELS, COMM):
        assert validate(str(path)).exit_code == 0
