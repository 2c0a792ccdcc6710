"""Fuzzing simcc's inputs against its promise to users: for any input, either exit 0 with valid
output (strict JSON, every number finite) or exit 2 with exactly one `error: ` line; never a
traceback, never unbounded time or memory.

Shared by tests/test_fuzz.py (a short seeded budget for CI) and benchmarks/fuzz.py (the long run).
Three parts:
- a mutation engine: every shipped workload, hardware profile and sweep file, and each CSV kind
  simcc reads, mutated one way per case (a deleted key, a wrong type, an infinite or huge
  number, a YAML tag, deep nesting, aliases that expand to a billion nodes, bytes that are not
  UTF-8, a ragged CSV row, `--set` overrides with such values, ...);
- a runner: one case is one `python -m simcc ...` subprocess in its own temporary folder, under a
  wall-clock timeout and an address-space limit, so a hang or a runaway allocation is observed
  rather than suffered;
- a classifier: ok, clean_error, or one of the broken outcomes (FAILURES), with a root-cause key
  (exception type and the innermost simcc function) that groups failures by what to fix.

Every case is built from its own `random.Random(f"{seed}:{index}")`, so a case is reproducible
from (seed, index) alone, whatever else the run generated.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Outcomes

OK = "ok"
CLEAN_ERROR = "clean_error"
# Everything below breaks the promise.
TRACEBACK = "traceback"  # an uncaught exception (exit 1)
BAD_ERROR = "bad_error"  # exit 2 (or another code) without exactly one `error: ` line
BAD_JSON = "bad_json"  # exit 0, but `--format json` output (or a JSON file written) does not parse
NONFINITE_JSON = "nonfinite_json"  # exit 0, but the output holds Infinity/NaN (or a .inf/.nan profile)
TIMEOUT = "timeout"  # still running at the wall-clock limit
MEMORY = "memory"  # MemoryError under the address-space limit, or killed for memory
CRASH = "crash"  # killed by a signal (segfault from deep recursion, file-size limit, ...)
PASSING = (OK, CLEAN_ERROR)
FAILURES = (TRACEBACK, BAD_ERROR, BAD_JSON, NONFINITE_JSON, TIMEOUT, MEMORY, CRASH)
OUTCOMES = PASSING + FAILURES

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_BYTES = 3 << 30  # RLIMIT_AS: importing numpy/pandas/pydantic needs well under 1 GiB
OUTPUT_FILE_LIMIT = 256 << 20  # RLIMIT_FSIZE: output that large is itself a runaway

# ---------------------------------------------------------------------------------------------
# Base inputs: what each shipped file is run with, so that the unmutated case exits 0 and a
# mutation reaches the simulator instead of stopping at a layout check.

# workload stem -> (profile it runs on, extra --set texts, slow: > 2 s even unmutated)
WORKLOAD_PAIRS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "bitpattern_tree_mlp_train": ("dgx_a100_x1", (), False),
    "deepseek_v3_shape_train": ("dgx_h100_x128", (), True),
    "gpt_22b_dense_train_8xa100": ("dgx_a100_x1", (), False),
    "mixtral_8x7b_serve_edge": ("jetson_agx_orin", (), False),
    "mixtral_8x7b_train_64xh100": ("dgx_h100_x8", (), False),
    "ray_tracing_mlp_serve_rpi5": ("raspberry_pi_5", (), False),
    "shazeer_moe_4096h_lstm_train": ("k40_x16", (), True),
    "ssd_gpt2_small_train": ("dgx_a100_x1", (), False),
    "switch_base_128_train": ("tpu_v3_32", (), False),
    "tips_anytime_mobilenet_train": ("dgx_a100_x1", (), False),
    "megatron_175b_train": ("dgx_a100_x8", (), False),
    "megatron_530b_train": ("dgx_a100_x8", ("hardware.nodes=35",), True),
    "megatron_1t_train": ("dgx_a100_x8", ("hardware.nodes=64",), True),
    "shazeer_4xlstm512_train": ("k40_x16", (), False),
    "shazeer_moe143m_lstm_train": ("k40_x32", (), False),
    "shazeer_moe34m_lstm_train": ("k40_x32", (), False),
}
DEFAULT_PAIR: tuple[str, tuple[str, ...], bool] = ("dgx_h100_x8", (), True)  # a workload added later
# Small workloads that run on every shipped profile: the probes for a mutated profile.
PROFILE_PROBES = ("bitpattern_tree_mlp_train", "ray_tracing_mlp_serve_rpi5")
SECOND_PROFILE = "dgx_h100_x8"  # `compare` runs a mutated workload on its own profile and this one

MOE_BLOCK = "model.blocks.1.blocks.1.moe_ffn"  # Mixtral's MoE layer, for the histogram/placement CSVs
MIXTRAL = "mixtral_8x7b_train_64xh100"
MEASURED = "hardware_profiles/measured/cpu_amd_epyc_2core_2026-11-23"

# Overrides the brief names explicitly: always in the CI selection and in every long run.
FIXED_OVERRIDES: tuple[tuple[str, str, str], ...] = (
    (MIXTRAL, "dgx_h100_x8", "hardware.network.oversubscription=.inf"),
    (MIXTRAL, "dgx_h100_x8", "model.blocks.1.repeat=99999999999999999999"),
    (MIXTRAL, "dgx_h100_x8", "train.global_batch=1e12"),
)

# Kinds of case and their share of a long run.
KIND_WEIGHTS: dict[str, float] = {
    "workload": 0.28, "hardware": 0.20, "override": 0.20, "sweep": 0.08, "trace_csv": 0.08,
    "kernels_csv": 0.05, "comm_csv": 0.05, "histogram_csv": 0.03, "placement_csv": 0.03, "argument": 0.05,
}
KINDS = tuple(KIND_WEIGHTS)

# ---------------------------------------------------------------------------------------------
# Hostile values

SENTINEL = "FUZZ_SENTINEL_0x5eed"  # dumped in place of a value, then replaced by raw YAML/bytes
BIG_INT = 10**30
HUGE_INT = int("7" * 320)  # 320 digits: beyond any float
NUMBERS: tuple[Any, ...] = (0, -1, 1e308, math.inf, -math.inf, math.nan, BIG_INT, HUGE_INT, 2**63, 1e12,
                            -0.0, 5e-324, 0.5)
TYPE_CHANGES: tuple[tuple[str, Any], ...] = (
    ("str", "fuzz"), ("empty_str", ""), ("list", [1, "two"]), ("empty_list", []), ("dict", {"fuzz": 1}),
    ("empty_dict", {}), ("null", None), ("true", True), ("false", False),
)


def deep_list(levels: int = 1000) -> str:
    return "[" * levels + "]" * levels


def deep_map(levels: int = 1000) -> str:
    return "{a: " * levels + "1" + "}" * levels


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """A flow list whose last item expands to width**(levels-1) scalars through aliases."""
    items = [f"&lol0 [{', '.join(['lol'] * width)}]"]
    items += [f"&lol{i} [{', '.join([f'*lol{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


# Raw YAML put where a value was (the text after `key: ` or `- `).
RAW_VALUES: tuple[tuple[str, str], ...] = (
    ("tag_python_apply", '!!python/object/apply:os.system ["echo fuzz"]'),
    ("tag_python_name", "!!python/name:os.system"),
    ("tag_python_tuple", "!!python/tuple [1, 2]"),
    ("tag_binary", "!!binary aGVsbG8="),
    ("tag_set", "!!set {a: null, b: null}"),
    ("tag_timestamp", "!!timestamp 2001-12-14t21:59:43.10-05:00"),
    ("tag_omap", "!!omap [a: 1, b: 2]"),
    ("tag_pairs", "!!pairs [a: 1, a: 2]"),
    ("tag_unknown", "!fuzz value"),
    ("tag_float_nan", "!!float .NaN"),
    ("tag_int_hex", '!!int "0x1F"'),
    ("tag_str_number", "!!str 8"),
    ("deep_list", deep_list()),
    ("deep_map", deep_map()),
    ("billion_laughs", billion_laughs()),
    ("recursive_list", "&fuzzr [*fuzzr]"),
    ("recursive_map", "&fuzzm {a: *fuzzm}"),
    ("undefined_alias", "*nowhere"),
    ("long_string", "x" * 1_000_000),
    ("float_literal_overflow", "1e400"),
    ("sexagesimal", "1:30:00"),
    ("octal_like", "0o777"),
    ("unicode", '"\u00e9\u4e2d\U0001f600\u202e"'),
)
RAW_BYTES: tuple[tuple[str, bytes], ...] = (
    ("non_utf8_value", b'"caf\xe9 \xff\xfe"'),
    ("nul_byte", b'"a\x00b"'),
    ("lone_surrogate_escape", b'"\\ud800"'),
)

# Values for `--set key.path=VALUE` (the CLI parses VALUE as YAML).
SET_VALUES: tuple[str, ...] = (
    ".inf", "-.inf", ".nan", "+.inf", "0", "-1", "1e308", "1e400", "1e12", "99999999999999999999", str(HUGE_INT),
    "0.5", "2.5", "-0", "5e-324", "[]", "{}", "null", "~", "true", "false", "abc", "''", "[1, 2]", "{a: 1}",
    '!!python/object/apply:os.system ["echo fuzz"]', "!!binary aGk=", "2001-01-01", "0x10", "1_000", "&a [*a]",
    deep_list(), deep_map(), billion_laughs(), "*nowhere", "[", "'unterminated", "a: b: c",
)

# File names given on the command line. Inputs may be absolute (reading is harmless); outputs stay
# inside the case folder: simcc writes beside the target and renames, and as root a rename onto
# /dev/null would replace it.
LONG_NAME = "x" * 5000  # past NAME_MAX: stat() raises ENAMETOOLONG rather than answering "missing"
NON_UTF8_NAME = os.fsdecode(b"caf\xe9.yaml")  # a byte name that is not UTF-8, as Python sees it
INPUT_NAMES: tuple[str, ...] = (LONG_NAME, "", " ", ".", "hw", "/", "/dev/null", "/proc/self/status", NON_UTF8_NAME,
                                "missing.yaml", "-", "~", "a\nb.yaml", "nodir/x.yaml")
OUTPUT_NAMES: tuple[str, ...] = (LONG_NAME, "", ".", "hw", "-", "nodir/out.json", os.fsdecode(b"caf\xe9.json"),
                                 "a\nb.json", "out." + "y" * 300)

CSV_CELLS: tuple[str, ...] = (
    "inf", "-inf", "nan", "NaN", "Infinity", "-1", "0", "-0", "1e308", "1e400", str(BIG_INT), str(HUGE_INT), "",
    "abc", "1.5", "0.0000001", "True", " 1 ", "0x10", "1_000", "1,5", "None", "NULL", "1e-320",
)

# ---------------------------------------------------------------------------------------------
# Cases and outcomes


@dataclass
class Case:
    """One mutated input and the simcc command line that reads it (paths relative to its folder)."""

    ident: str
    kind: str
    base: str  # the shipped (or generated) input that was mutated
    mutation: str  # what was done to it
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)
    hardware_tree: bool = False  # copy hardware_profiles/ to hw/ first (a profile's references resolve there)
    json_stdout: bool = True  # on exit 0, stdout must be strict, finite JSON
    json_files: tuple[str, ...] = ()  # files the run writes that must be strict, finite JSON
    yaml_files: tuple[str, ...] = ()  # files the run writes that must hold no .inf/.nan

    def shell(self, python: str = ".venv/bin/python") -> str:
        return " ".join([python, "-m", "simcc", *(_quote(a) for a in self.argv)])


def _quote(text: str) -> str:
    """A shell word for display: long values shortened."""
    if len(text) > 200:
        return _shell_arg(text[:60]) + f"...<{len(text)} chars>"
    return _shell_arg(text)


@dataclass
class Outcome:
    ident: str
    kind: str
    base: str
    mutation: str
    command: str
    outcome: str
    rc: int | None
    seconds: float
    root: str  # what to fix: exception type and innermost simcc function, or the output problem
    detail: str  # the exception or error line, shortened
    stderr_tail: str
    stdout_head: str
    warnings: int = 0  # RuntimeWarning lines on stderr (overflow, invalid value) of an exit 0 or 2

    @property
    def passed(self) -> bool:
        return self.outcome in PASSING

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The corpus: every base input, parsed once


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.yaml") if p.is_file())


class Corpus:
    """The shipped inputs of one source tree (the repository, or a snapshot of it)."""

    def __init__(self, source_root: Path = ROOT) -> None:
        self.root = source_root
        workloads = [*sorted((source_root / "workloads").glob("*.yaml")),
                     *sorted((source_root / "workloads" / "validation").glob("*.yaml"))]
        # A validation suite is not a workload (simcc's own listing skips it too).
        self.workloads = [p for p in workloads if not p.stem.endswith("_suite")]
        self.profiles = _yaml_files(source_root / "hardware_profiles")
        self.sweeps = sorted((source_root / "workloads" / "sweeps").glob("*.yaml"))
        self._trees: dict[Path, Any] = {}
        self.references = self._profile_references()

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def tree(self, path: Path) -> Any:
        if path not in self._trees:
            self._trees[path] = yaml.safe_load(path.read_text(encoding="utf-8"))
        return copy.deepcopy(self._trees[path])

    def _profile_references(self) -> dict[Path, list[Path]]:
        """For each profile, the profiles that use it (itself first): a mutated device is read
        directly and through the nodes, clusters and edge profiles naming it."""
        by_name = {("device" if p.parent.name == "devices" else "node", p.stem): p
                   for p in self.profiles if p.parent.name in ("devices", "nodes")}
        users: dict[Path, list[Path]] = {p: [p] for p in self.profiles}
        direct: dict[Path, list[Path]] = {p: [] for p in self.profiles}
        for profile in self.profiles:
            data = self.tree(profile)
            if not isinstance(data, dict):
                continue
            for field_name, kind in (("device", "device"), ("node", "node")):
                target = by_name.get((kind, data.get(field_name))) if isinstance(data.get(field_name), str) else None
                if target is not None:
                    direct[target].append(profile)
        for profile in self.profiles:
            frontier = list(direct[profile])
            while frontier:
                user = frontier.pop()
                if user not in users[profile]:
                    users[profile].append(user)
                    frontier.extend(direct[user])
        return users

    def resolved_profile(self, name: str) -> dict[str, Any]:
        """A shipped profile with its device/node names replaced by their mappings, as simcc
        resolves them before applying `--set hardware.` overrides."""
        path = next((self.root / "hardware_profiles" / folder / f"{name}.yaml"
                     for folder in ("clusters", "edge", "nodes", "devices", "measured")
                     if (self.root / "hardware_profiles" / folder / f"{name}.yaml").is_file()), None)
        if path is None:
            return {}
        data = self.tree(path)
        for field_name, folder in (("node", "nodes"), ("device", "devices")):
            if isinstance(data.get(field_name), str):
                data[field_name] = self.resolved_profile_file(self.root / "hardware_profiles" / folder / f"{data[field_name]}.yaml")
        return data

    def resolved_profile_file(self, path: Path) -> dict[str, Any]:
        data = self.tree(path) if path.is_file() else {}
        if isinstance(data.get("device"), str):
            data["device"] = self.tree(self.root / "hardware_profiles" / "devices" / f"{data['device']}.yaml")
        return data


def pair_of(stem: str) -> tuple[str, tuple[str, ...], bool]:
    return WORKLOAD_PAIRS.get(stem, DEFAULT_PAIR)


# ---------------------------------------------------------------------------------------------
# Tree paths


Path_ = tuple[Any, ...]


def node_paths(tree: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every path below the root, containers and leaves alike."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from node_paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield (*prefix, index)
            yield from node_paths(value, (*prefix, index))


def get_at(tree: Any, path: Path_) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def set_at(tree: Any, path: Path_, value: Any) -> None:
    get_at(tree, path[:-1])[path[-1]] = value


def delete_at(tree: Any, path: Path_) -> None:
    del get_at(tree, path[:-1])[path[-1]]


def dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def dump(tree: Any) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True, width=1 << 30, default_flow_style=False)


# ---------------------------------------------------------------------------------------------
# YAML mutations: each returns (description, new file bytes)


def _pick_path(rng: Any, tree: Any, bias_key: str | None = None) -> Path_ | None:
    paths = list(node_paths(tree))
    if not paths:
        return None
    if bias_key is not None and (bias_key,) in paths and rng.random() < 0.15:
        return (bias_key,)
    return rng.choice(paths)


def _value_mutation(rng: Any, old: Any) -> tuple[str, Any]:
    """A new value for a node, chosen to fit what is there (numbers for numbers, ...) half the time."""
    if isinstance(old, bool) or rng.random() < 0.35:
        name, value = rng.choice(TYPE_CHANGES)
        return f"type->{name}", copy.deepcopy(value)
    if isinstance(old, (int, float)):
        if isinstance(old, int) and rng.random() < 0.2:
            return "fractional", old + 0.5
        value = rng.choice(NUMBERS)
        return f"number->{value!r}"[:60], value
    if isinstance(old, str):
        choice = rng.randrange(5)
        if choice == 0:
            return "enum->unknown", "not_a_" + old[:20]
        if choice == 1:
            return "enum->upper", old.upper() + "X"
        if choice == 2:
            return "str->number", rng.choice(NUMBERS)
        if choice == 3:
            return "str->padded", f" {old} "
        return "str->unicode", old + "\u00e9\u202e"
    if isinstance(old, list):
        if old and rng.random() < 0.5:
            return "list->repeated", old * 50
        return "list->empty", []
    if isinstance(old, dict):
        if rng.random() < 0.5:
            return "dict->extra_key", {**old, "fuzz_unknown_key": 1}
        return "dict->empty", {}
    value = rng.choice(NUMBERS)
    return f"number->{value!r}"[:60], value


def _inject(tree: Any, path: Path_, raw: bytes) -> bytes:
    """The file with the node at `path` replaced by raw YAML text (or bytes)."""
    tree = copy.deepcopy(tree)
    set_at(tree, path, SENTINEL)
    return dump(tree).encode("utf-8").replace(SENTINEL.encode(), raw, 1)


def _duplicate_key(rng: Any, tree: Any) -> tuple[str, bytes] | None:
    maps = [p for p in node_paths(tree) if isinstance(get_at(tree, p), dict) and get_at(tree, p)]
    maps += [()] if isinstance(tree, dict) and tree else []
    if not maps:
        return None
    where = rng.choice(maps)
    tree = copy.deepcopy(tree)
    mapping = get_at(tree, where)
    key = rng.choice(list(mapping))
    value = _value_mutation(rng, mapping[key])[1]
    mapping[SENTINEL] = value
    text = dump(tree).replace(SENTINEL, str(key), 1)
    return f"duplicate_key {dotted((*where, key))}", text.encode("utf-8")


def _file_mutation(rng: Any, text: str) -> tuple[str, bytes]:
    raw = text.encode("utf-8")
    options: list[tuple[str, Callable[[], bytes]]] = [
        ("empty_file", lambda: b""),
        ("whitespace_only", lambda: b"  \n\n"),
        ("comment_only", lambda: b"# nothing here\n"),
        ("top_level_list", lambda: b"- a\n- b\n"),
        ("top_level_scalar", lambda: b"42\n"),
        ("top_level_null", lambda: b"~\n"),
        ("truncated", lambda: raw[: rng.randrange(1, max(2, len(raw)))]),
        ("two_documents", lambda: raw + b"\n---\n" + raw),
        ("utf16", lambda: text.encode("utf-16")),
        ("latin1", lambda: ("# caf\u00e9\n" + text).encode("latin-1", errors="replace")),
        ("utf8_bom", lambda: b"\xef\xbb\xbf" + raw),
        ("nul_byte", lambda: raw[: len(raw) // 2] + b"\x00" + raw[len(raw) // 2:]),
        ("tabs", lambda: re.sub(rb"(?m)^  ", b"\t", raw)),
        ("random_bytes", lambda: bytes(rng.randrange(256) for _ in range(512))),
        ("crlf", lambda: raw.replace(b"\n", b"\r\n")),
    ]
    name, make = rng.choice(options)
    return name, make()


def mutate_yaml(rng: Any, tree: Any, text: str, bias_key: str | None = None) -> tuple[str, bytes]:
    """One mutation of a YAML document: tree-level (most), raw-text, or whole-file."""
    roll = rng.random()
    if roll < 0.12:
        return _file_mutation(rng, text)
    path = _pick_path(rng, tree, bias_key)
    if path is None:
        return _file_mutation(rng, text)
    if roll < 0.20:
        found = _duplicate_key(rng, tree)
        if found is not None:
            return found
    if roll < 0.42:
        if rng.random() < 0.85:
            name, snippet = rng.choice(RAW_VALUES)
            return f"{name} at {dotted(path)}", _inject(tree, path, snippet.encode("utf-8"))
        name, blob = rng.choice(RAW_BYTES)
        return f"{name} at {dotted(path)}", _inject(tree, path, blob)
    tree = copy.deepcopy(tree)
    if roll < 0.55:
        delete_at(tree, path)
        return f"delete {dotted(path)}", dump(tree).encode("utf-8")
    name, value = _value_mutation(rng, get_at(tree, path))
    set_at(tree, path, value)
    return f"{name} at {dotted(path)}", dump(tree).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# CSV mutations


def csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def mutate_csv(rng: Any, rows: list[list[str]]) -> tuple[str, bytes]:
    """One mutation of a CSV table (header first): a hostile cell, a ragged row, a lost header,..."""
    rows = [list(r) for r in rows]
    header, body = rows[0], rows[1:]
    column = rng.randrange(len(header))
    line = rng.randrange(len(body)) if body else 0
    roll = rng.random()
    if roll < 0.40 and body:
        value = rng.choice(CSV_CELLS)
        body[line][column] = value
        return f"cell {header[column]}@line{line + 2}={value[:20]!r}", csv_text(rows).encode()
    if roll < 0.50 and body:
        value = rng.choice(CSV_CELLS)
        for row in body:
            row[column] = value
        return f"column {header[column]}={value[:20]!r}", csv_text(rows).encode()
    options: list[tuple[str, Callable[[], bytes]]] = [
        ("empty_file", lambda: b""),
        ("header_only", lambda: csv_text([header]).encode()),
        ("no_header", lambda: csv_text(body).encode()),
        ("ragged_long", lambda: csv_text([header, *body[:line], body[line] + ["9", "x"], *body[line + 1:]]).encode()),
        ("ragged_short", lambda: csv_text([header, *body[:line], body[line][:-1], *body[line + 1:]]).encode()),
        ("ragged_one_cell", lambda: csv_text([header, *body[:line], body[line][:1], *body[line + 1:]]).encode()),
        ("drop_column", lambda: csv_text([[c for i, c in enumerate(r) if i != column] for r in rows]).encode()),
        ("duplicate_column", lambda: csv_text([r + [r[column]] for r in rows]).encode()),
        ("rename_column", lambda: csv_text([[*header[:column], header[column] + "_x", *header[column + 1:]], *body]).encode()),
        ("blank_lines", lambda: csv_text(rows).replace("\n", "\n\n", 2).encode()),
        ("non_utf8_cell", lambda: csv_text(rows).encode().replace(b"\n", b",\xff\xfe\n", 2)),
        ("nul_byte", lambda: csv_text(rows).encode().replace(b",", b",\x00", 1)),
        ("unbalanced_quote", lambda: csv_text(rows).replace("\n", '\n"', 2).encode()),
        ("utf8_bom", lambda: b"\xef\xbb\xbf" + csv_text(rows).encode()),
        ("semicolons", lambda: csv_text(rows).replace(",", ";").encode()),
        ("whitespace_only", lambda: b"\n \n"),
        ("binary", lambda: bytes(rng.randrange(256) for _ in range(300))),
        ("many_columns", lambda: csv_text([r + [str(i) for i in range(5000)] for r in rows]).encode()),
    ]
    name, make = rng.choice(options)
    return name, make()


def read_csv_rows(path: Path) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))) if row]


TRACE_ROWS = [["arrival_s", "prompt_tokens", "output_tokens", "compute_scale"],
              ["0.0", "32", "16", "1.0"], ["0.05", "64", "8", "0.5"], ["0.05", "1", "1", "2.0"],
              ["0.2", "128", "4", "1.0"], ["0.3", "16", "32", "1.5"], ["1.0", "8", "8", "1.0"]]
HISTOGRAM_ROWS = [["tokens"], *[[str(v)] for v in (900, 400, 300, 120, 60, 40, 20, 10)]]
PLACEMENT_ROWS = [["rank"], *[[str(v)] for v in (3, 1, 4, 0, 5, 2, 7, 6)]]

# ---------------------------------------------------------------------------------------------
# Case generators, one per kind


def _estimate_args(workload: str, profile: str, extra_sets: tuple[str, ...]) -> list[str]:
    args = ["estimate", workload, "-H", profile, "--format", "json", "--steps", "1", "--requests", "50"]
    for text in extra_sets:
        args += ["--set", text]
    return args


def gen_workload(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    choices = [p for p in corpus.workloads if not (fast_only and pair_of(p.stem)[2])]
    path = rng.choice(choices)
    profile, sets, _ = pair_of(path.stem)
    text = path.read_text(encoding="utf-8")
    mutation, content = mutate_yaml(rng, corpus.tree(path), text)
    name = path.name
    json_files: tuple[str, ...] = ()
    roll = rng.random()
    slow = pair_of(path.stem)[2]
    if roll < 0.15 and not fast_only:
        argv = ["compare", name, "-H", profile, "-H", SECOND_PROFILE, "--steps", "1", "--jobs", "1", "--format", "json"]
        for text_set in sets:
            argv += ["--set", text_set]
        mutation += " (compare)"
    else:
        argv = _estimate_args(name, profile, sets)
        if roll > 0.85 and not slow:  # a large run's trace is hundreds of MB by design (megatron_1t: 391 MB)
            argv += ["--trace", "timeline.json"]
            json_files = ("timeline.json",)
    return Case(ident, "workload", corpus.rel(path), mutation, argv, {name: content}, json_files=json_files)


def gen_hardware(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    path = rng.choice(corpus.profiles)
    text = path.read_text(encoding="utf-8")
    mutation, content = mutate_yaml(rng, corpus.tree(path), text, bias_key="kind")
    target = f"hw/{path.parent.name}/{path.name}"
    entry_path = rng.choice(corpus.references[path])
    entry = f"hw/{entry_path.parent.name}/{entry_path.name}"
    if entry != target:
        mutation += f" (read through {entry})"
    if path.parent.name == "measured" and entry == target and rng.random() < 0.4:
        kernels = rng.random() < 0.5
        measurements = f"{MEASURED}.{'kernels' if kernels else 'comm'}.csv"
        files = {target: content, Path(measurements).name: (corpus.root / measurements).read_bytes()}
        argv = ["validate", "--profile", target, "--measurements", Path(measurements).name, "--format", "json"]
        return Case(ident, "hardware", corpus.rel(path), mutation + " (validate)", argv, files, hardware_tree=True)
    probes = list(PROFILE_PROBES)
    probes += [w for w, (p, s, slow) in WORKLOAD_PAIRS.items() if p == entry_path.stem and not s and not slow]
    workload = rng.choice(probes)
    argv = _estimate_args(workload, entry, ())
    return Case(ident, "hardware", corpus.rel(path), mutation, argv, {target: content}, hardware_tree=True)


def _override_paths(corpus: Corpus, workload: Path, profile: str) -> list[str]:
    paths = [dotted(p) for p in node_paths(corpus.tree(workload))]
    paths += ["hardware." + dotted(p) for p in node_paths(corpus.resolved_profile(profile))]
    return paths


def _odd_path(rng: Any, paths: list[str]) -> str:
    base = rng.choice(paths)
    return rng.choice([
        base + ".fuzz", base + ".0", "model.blocks.99.repeat", "model.blocks.-1", "model..hidden",
        "model.blocks.99999999999999999999999.repeat", "fuzz_unknown", "hardware.fuzz", "hardware.",
        base.replace(".", "..", 1), base + "." + "a." * 200 + "b", "0", " ",
    ])


def gen_override(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    choices = [p for p in corpus.workloads if not (fast_only and pair_of(p.stem)[2])]
    workload = rng.choice(choices)
    profile, sets, _ = pair_of(workload.stem)
    paths = _override_paths(corpus, workload, profile)
    key = _odd_path(rng, paths) if rng.random() < 0.12 else rng.choice(paths)
    value = rng.choice(SET_VALUES)
    text = f"{key}={value}"
    count = 1
    overrides = [text]
    if rng.random() < 0.15:  # two hostile overrides at once
        overrides.append(f"{rng.choice(paths)}={rng.choice(SET_VALUES)}")
        count = 2
    argv = _estimate_args(workload.stem, profile, (*sets, *overrides))
    mutation = " ".join(f"--set {_quote(o)}" for o in overrides) + ("" if count == 1 else " (two)")
    return Case(ident, "override", corpus.rel(workload), mutation, argv)


def fixed_override_cases(prefix: str = "fixed") -> list[Case]:
    cases = []
    for index, (workload, profile, text) in enumerate(FIXED_OVERRIDES):
        argv = _estimate_args(workload, profile, (text,))
        cases.append(Case(f"{prefix}{index}", "override", f"workloads/{workload}.yaml", f"--set {text}", argv))
    return cases


def regression_cases() -> list[Case]:
    """One minimal case per root cause the long run has found (ids r-*): each failed once."""
    sweep_head = "workload: mixtral_8x7b_train_64xh100\nhardware: [dgx_h100_x8]\n"
    estimate = _estimate_args("bitpattern_tree_mlp_train", "dgx_a100_x1", ())
    placement = (f"{MOE_BLOCK}.routing.placement=file", f"{MOE_BLOCK}.routing.placement_file=experts.csv")
    wide = "\n".join(["rank," + ",".join(map(str, range(5000)))]
                     + [f"{r}," + ",".join(map(str, range(5000))) for r in (3, 1, 4, 0, 5, 2, 7, 6)]) + "\n"
    specs: list[tuple[str, str, list[str], dict[str, str]]] = [
        ("csv-int-beyond-float", "OverflowError in specs/tables.py:_check_column",
         _estimate_args("ray_tracing_mlp_serve_rpi5", "raspberry_pi_5", ()) + ["--requests-trace", "trace.csv"],
         {"trace.csv": "arrival_s,prompt_tokens,output_tokens\n0,1" + "0" * 320 + ",1\n"}),
        ("sweep-axis-cyclic", "ValueError in sweep/run.py:set_text",
         ["sweep", "s.yaml", "--format", "json", "--jobs", "1"], {"s.yaml": sweep_head + "axes: {parallelism.ep: [&a [*a], 8]}\n"}),
        ("sweep-axis-laughs", "timeout in sweep/run.py:set_text",
         ["sweep", "s.yaml", "--format", "json", "--jobs", "1"],
         {"s.yaml": sweep_head + f"axes: {{parallelism.ep: [8, {billion_laughs()}]}}\n"}),
        ("sweep-axis-nan", "NaN in sweep JSON rows",
         ["sweep", "s.yaml", "--format", "json", "--jobs", "1"], {"s.yaml": sweep_head + "axes: {parallelism.ep: [.nan, 8]}\n"}),
        ("profile-kind-laughs", "timeout in specs/loader.py:load_profile_model",
         _estimate_args("bitpattern_tree_mlp_train", "p.yaml", ()), {"p.yaml": f"kind: {billion_laughs()}\nname: x\n"}),
        ("price-overflow", "Infinity in estimate JSON (run.usd)",
         _estimate_args("bitpattern_tree_mlp_train", "v100", ("hardware.price.usd_per_device_hour=1e308",)), {}),
        ("placement-wide", "timeout in specs/tables.py:read_table (placement read per MoE layer)",
         _estimate_args(MIXTRAL, "dgx_h100_x8", placement), {"experts.csv": wide}),
        ("sweep-all-invalid", "exit 2 with a progress line before the error",
         ["sweep", "s.yaml", "--format", "json", "--jobs", "1"], {"s.yaml": sweep_head + "axes: {parallelism.pp: [3]}\n"}),
        ("surrogate-table", "UnicodeEncodeError in cli.py:estimate",
         ["estimate", MIXTRAL, "-H", "dgx_h100_x8", "--steps", "1", "--set", 'name="\\ud800"'], {}),
        ("surrogate-sweep", "UnicodeEncodeError in cli.py:sweep",
         ["sweep", "s.yaml", "--format", "json", "--jobs", "1"], {"s.yaml": sweep_head + 'axes: {parallelism.vpp: ["\\ud800", 2]}\n'}),
        ("long-name-sweep", "OSError (ENAMETOOLONG) in sweep/spec.py:_near",
         ["sweep", "s.yaml", "--format", "json", "--jobs", "1"], {"s.yaml": f"workload: {LONG_NAME}\nhardware: [dgx_h100_x8]\n"}),
        ("long-name-argument", "OSError (ENAMETOOLONG) in specs/loader.py:resolve_workload_path",
         ["estimate", LONG_NAME, "-H", "dgx_a100_x1", "--format", "json", "--steps", "1"], {}),
    ]
    cases = []
    for name, root, argv, files in specs:
        case = Case(f"r-{name}", "regression", root, name, argv, {k: v.encode() for k, v in files.items()})
        case.json_stdout = "json" in argv
        cases.append(case)
    return cases


def trimmed_sweep(tree: Any) -> Any:
    """A shipped sweep cut to at most 8 configurations, so that one case stays a few seconds."""
    tree = copy.deepcopy(tree)
    if isinstance(tree.get("hardware"), list):
        tree["hardware"] = tree["hardware"][:2]
    if isinstance(tree.get("axes"), dict):
        axes = {}
        for index, (path, values) in enumerate(tree["axes"].items()):
            axes[path] = values[: (2 if index < 2 else 1)] if isinstance(values, list) else values
        tree["axes"] = axes
    tree["steps"] = 1
    return tree


def gen_sweep(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    path = rng.choice(corpus.sweeps)
    tree = trimmed_sweep(corpus.tree(path))
    mutation, content = mutate_yaml(rng, tree, dump(tree))
    argv = ["sweep", path.name, "--format", "json", "--jobs", "2" if rng.random() < 0.2 else "1"]
    if rng.random() < 0.2:
        argv += ["--out", "results.csv"]
    return Case(ident, "sweep", corpus.rel(path) + " (trimmed)", mutation, argv, {path.name: content})


def gen_trace(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    rows = TRACE_ROWS if rng.random() < 0.7 else [r[:3] for r in TRACE_ROWS]
    mutation, content = mutate_csv(rng, rows)
    workload = rng.choice(["ray_tracing_mlp_serve_rpi5", "mixtral_8x7b_serve_edge"])
    argv = _estimate_args(workload, pair_of(workload)[0], ()) + ["--requests-trace", "trace.csv"]
    return Case(ident, "trace_csv", f"request trace for {workload}", mutation, argv, {"trace.csv": content})


def _measurement_case(rng: Any, corpus: Corpus, ident: str, kind: str) -> Case:
    source = f"{MEASURED}.{'kernels' if kind == 'kernels_csv' else 'comm'}.csv"
    mutation, content = mutate_csv(rng, read_csv_rows(corpus.root / source))
    name = Path(source).name
    if rng.random() < 0.5:
        argv = ["validate", "--profile", f"{MEASURED}.yaml", "--measurements", name, "--format", "json"]
        yaml_files: tuple[str, ...] = ()
        mutation += " (validate)"
    else:
        argv = ["calibrate", name, "--base", "cpu_host_local", "--out", "calibrated.yaml", "--format", "json"]
        yaml_files = ("calibrated.yaml",)
        mutation += " (calibrate)"
    # the shipped measured profile is named by a path relative to the repository: give it one
    files = {name: content, f"{MEASURED}.yaml": (corpus.root / f"{MEASURED}.yaml").read_bytes()}
    return Case(ident, kind, source, mutation, argv, files, yaml_files=yaml_files)


def gen_kernels(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    return _measurement_case(rng, corpus, ident, "kernels_csv")


def gen_comm(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    return _measurement_case(rng, corpus, ident, "comm_csv")


def _expert_csv_case(rng: Any, ident: str, kind: str) -> Case:
    rows, sets = ((HISTOGRAM_ROWS, (f"{MOE_BLOCK}.load.distribution=histogram", f"{MOE_BLOCK}.load.histogram=experts.csv"))
                  if kind == "histogram_csv" else
                  (PLACEMENT_ROWS, (f"{MOE_BLOCK}.routing.placement=file", f"{MOE_BLOCK}.routing.placement_file=experts.csv")))
    mutation, content = mutate_csv(rng, rows)
    argv = _estimate_args(MIXTRAL, "dgx_h100_x8", sets)
    return Case(ident, kind, f"{kind.split('_')[0]} CSV for {MIXTRAL}", mutation, argv, {"experts.csv": content})


def gen_histogram(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    return _expert_csv_case(rng, ident, "histogram_csv")


def gen_placement(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    return _expert_csv_case(rng, ident, "placement_csv")


def gen_argument(rng: Any, corpus: Corpus, ident: str, fast_only: bool = False) -> Case:
    """A hostile file name in one argument of an otherwise good command."""
    measured = f"{MEASURED}.yaml"
    kernels = Path(f"{MEASURED}.kernels.csv").name
    files = {kernels: (corpus.root / f"{MEASURED}.kernels.csv").read_bytes(), measured: (corpus.root / measured).read_bytes(),
             "trace.csv": csv_text(TRACE_ROWS).encode(), "sweep.yaml": dump(trimmed_sweep(corpus.tree(corpus.sweeps[0]))).encode()}
    estimate = _estimate_args("bitpattern_tree_mlp_train", "dgx_a100_x1", ())
    serve = _estimate_args("ray_tracing_mlp_serve_rpi5", "raspberry_pi_5", ())
    templates: list[tuple[str, list[str], int, bool]] = [  # (slot, argv, index of the slot, is an output)
        ("workload", estimate, 1, False),
        ("--hardware", estimate, 3, False),
        ("--requests-trace", serve + ["--requests-trace", "trace.csv"], len(serve) + 1, False),
        ("--trace", estimate + ["--trace", "t.json"], len(estimate) + 1, True),
        ("compare workload", ["compare", "bitpattern_tree_mlp_train", "-H", "dgx_a100_x1", "--steps", "1", "--jobs", "1",
                              "--format", "json"], 1, False),
        ("sweep file", ["sweep", "sweep.yaml", "--format", "json", "--jobs", "1"], 1, False),
        ("sweep --out", ["sweep", "sweep.yaml", "--format", "json", "--jobs", "1", "--out", "r.csv"], 7, True),
        ("calibrate table", ["calibrate", kernels, "--base", "cpu_host_local", "--out", "c.yaml", "--format", "json"], 1, False),
        ("calibrate --base", ["calibrate", kernels, "--base", "cpu_host_local", "--out", "c.yaml", "--format", "json"], 3, False),
        ("calibrate --out", ["calibrate", kernels, "--base", "cpu_host_local", "--out", "c.yaml", "--format", "json"], 5, True),
        ("validate --profile", ["validate", "--profile", measured, "--measurements", kernels, "--format", "json"], 2, False),
        ("validate --measurements", ["validate", "--profile", measured, "--measurements", kernels, "--format", "json"], 4, False),
    ]
    slot, argv, index, output = rng.choice(templates)
    value = rng.choice(OUTPUT_NAMES if output else INPUT_NAMES)
    argv = list(argv)
    argv[index] = value
    if output and value.endswith(".json") and slot == "sweep --out":
        argv[index] = value[:-5] + ".csv"
    shown = value if len(value) < 40 else f"{value[:8]}...<{len(value)} chars>"
    return Case(ident, "argument", f"{argv[0]} {slot}", f"{slot} {shown!r}", argv, files)


GENERATORS: dict[str, Callable[..., Case]] = {
    "workload": gen_workload, "hardware": gen_hardware, "override": gen_override, "sweep": gen_sweep,
    "trace_csv": gen_trace, "kernels_csv": gen_kernels, "comm_csv": gen_comm,
    "histogram_csv": gen_histogram, "placement_csv": gen_placement, "argument": gen_argument,
}


def case_rng(seed: int, index: int) -> Any:
    import random

    return random.Random(f"{seed}:{index}")


def generate(corpus: Corpus, seed: int, index: int, kind: str | None = None, fast_only: bool = False) -> Case:
    """Case `index` of the run seeded `seed`: the same case whatever else the run generates."""
    rng = case_rng(seed, index)
    if kind is None:
        kind = rng.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
    return GENERATORS[kind](rng, corpus, f"c{index:05d}", fast_only)


def baseline_cases(corpus: Corpus) -> list[Case]:
    """Every base input unmutated: these must all exit 0, else the mutations start from an error."""
    cases: list[Case] = []
    for path in corpus.workloads:
        profile, sets, _ = pair_of(path.stem)
        cases.append(Case(f"b-{path.stem}", "workload", corpus.rel(path), "none",
                          _estimate_args(path.name, profile, sets), {path.name: path.read_bytes()}))
    for path in corpus.sweeps:
        cases.append(Case(f"b-{path.stem}", "sweep", corpus.rel(path), "none (trimmed)",
                          ["sweep", path.name, "--format", "json", "--jobs", "1"],
                          {path.name: dump(trimmed_sweep(corpus.tree(path))).encode()}))
    for workload in ("ray_tracing_mlp_serve_rpi5", "mixtral_8x7b_serve_edge"):
        cases.append(Case(f"b-trace-{workload}", "trace_csv", "request trace", "none",
                          _estimate_args(workload, pair_of(workload)[0], ()) + ["--requests-trace", "trace.csv"],
                          {"trace.csv": csv_text(TRACE_ROWS).encode()}))
    for kind, rows, sets in (
            ("histogram_csv", HISTOGRAM_ROWS, (f"{MOE_BLOCK}.load.distribution=histogram", f"{MOE_BLOCK}.load.histogram=experts.csv")),
            ("placement_csv", PLACEMENT_ROWS, (f"{MOE_BLOCK}.routing.placement=file", f"{MOE_BLOCK}.routing.placement_file=experts.csv"))):
        cases.append(Case(f"b-{kind}", kind, kind, "none", _estimate_args(MIXTRAL, "dgx_h100_x8", sets),
                          {"experts.csv": csv_text(rows).encode()}))
    for table in ("kernels", "comm"):
        name = f"{Path(MEASURED).name}.{table}.csv"
        files = {name: (corpus.root / f"{MEASURED}.{table}.csv").read_bytes(),
                 f"{MEASURED}.yaml": (corpus.root / f"{MEASURED}.yaml").read_bytes()}
        cases.append(Case(f"b-validate-{table}", f"{table}_csv", f"{MEASURED}.{table}.csv", "none",
                          ["validate", "--profile", f"{MEASURED}.yaml", "--measurements", name, "--format", "json"], files))
        cases.append(Case(f"b-calibrate-{table}", f"{table}_csv", f"{MEASURED}.{table}.csv", "none",
                          ["calibrate", name, "--base", "cpu_host_local", "--out", "calibrated.yaml", "--format", "json"],
                          files, yaml_files=("calibrated.yaml",)))
    for path in corpus.profiles:
        entry = f"hw/{path.parent.name}/{path.name}"
        cases.append(Case(f"b-hw-{path.parent.name}-{path.stem}", "hardware", corpus.rel(path), "none",
                          _estimate_args(PROFILE_PROBES[0], entry, ()), hardware_tree=True))
    return cases


# ---------------------------------------------------------------------------------------------
# Running one case


def materialize(case: Case, folder: Path, source_root: Path = ROOT) -> None:
    """Write the case's files (and the profile tree it needs) into `folder`."""
    if case.hardware_tree:
        shutil.copytree(source_root / "hardware_profiles", folder / "hw", dirs_exist_ok=True)
    for name, content in case.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def child_env(source_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_", "SIMCC_"))}
    env["PYTHONPATH"] = str(source_root)  # the tree under test, whatever is installed
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT on timeout, or a segfault, dumps the Python stack
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # One BLAS thread: runs go in parallel, and each idle thread reserves address space.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    env["COLUMNS"] = "200"
    return env


def _limits(memory_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_FILE_LIMIT, OUTPUT_FILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_case(case: Case, source_root: Path = ROOT, python: str = sys.executable,
             timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> Outcome:
    """Run one case in a fresh temporary folder and classify it."""
    with tempfile.TemporaryDirectory(prefix="simcc-fuzz-") as tmp:
        folder = Path(tmp) / "case"
        folder.mkdir()
        materialize(case, folder, source_root)
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        started = time.monotonic()
        timed_out = False
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen([python, "-m", "simcc", *case.argv], cwd=folder, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env=child_env(source_root),
                                    preexec_fn=_limits(memory_bytes), start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    proc.send_signal(signal.SIGABRT)  # faulthandler prints where it was stuck
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid, signal.SIGKILL)
                    proc.wait()
            finally:
                _kill_group(proc.pid, signal.SIGKILL)  # pool workers of compare/sweep
        seconds = time.monotonic() - started
        stdout = _read_head(out_path, 64 << 20)
        stderr = _read_ends(err_path, 8 << 20)
        outcome, root, detail = classify(case, folder, proc.returncode, stdout, stderr, timed_out)
    warnings = len(re.findall(r"RuntimeWarning|overflow encountered|invalid value encountered", stderr))
    # Lines cut to 300 characters: an error that quotes a megabyte of input stays readable.
    compact = "\n".join(line if len(line) <= 300 else line[:300] + f"...<{len(line)} chars>"
                         for line in stderr.splitlines())
    return Outcome(case.ident, case.kind, case.base, case.mutation, case.shell(), outcome, proc.returncode,
                   round(seconds, 2), root, detail[:500], compact[-6000:], stdout[:2000], warnings)


def _read_head(path: Path, limit: int) -> str:
    with path.open("rb") as handle:
        return handle.read(limit).decode("utf-8", errors="replace")


def _read_ends(path: Path, limit: int) -> str:
    """The whole file if under `limit`, else its first and last halves of `limit` (a traceback
    starts at the head; its exception line is at the tail)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= limit:
            return handle.read().decode("utf-8", errors="replace")
        head = handle.read(limit // 2)
        handle.seek(size - limit // 2)
        tail = handle.read()
    return (head + b"\n...<cut>...\n" + tail).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Classifying


def classify(case: Case, folder: Path, rc: int | None, stdout: str, stderr: str, timed_out: bool) -> tuple[str, str, str]:
    """(outcome, root-cause key, detail) of one finished run."""
    command = case.argv[0]
    if timed_out:
        return TIMEOUT, f"timeout in {_stuck_frame(stderr)}", _last_line(stderr)
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        if "MemoryError" in stderr or "memory" in stderr.lower():
            return MEMORY, f"memory ({name}) in {_stuck_frame(stderr)}", _last_line(stderr)
        return CRASH, f"{name} in {_stuck_frame(stderr)}", _last_line(stderr)
    if "Traceback (most recent call last)" in stderr and rc != 0:
        exc_type, frame, message = parse_traceback(stderr)
        kind = MEMORY if "MemoryError" in exc_type else TRACEBACK
        return kind, f"{exc_type} in {frame}", message[:300]
    if rc == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        if len(lines) == 1 and lines[0].startswith("error: "):
            return CLEAN_ERROR, "", lines[0][:500]
        first = lines[0] if lines else "(no stderr)"
        return BAD_ERROR, f"exit 2, {len(lines)} stderr lines: {_shape(first)}", "\n".join(lines[:5])[:500]
    if rc != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        return BAD_ERROR, f"exit {rc}: {_shape(lines[-1] if lines else '(no stderr)')}", "\n".join(lines[-5:])[:500]
    problems = []
    if case.json_stdout:
        problems.append(check_json(stdout, f"{command} stdout"))
    for name in case.json_files:
        target = folder / name
        problems.append(check_json(target.read_text(encoding="utf-8", errors="replace"), name)
                        if target.is_file() else (BAD_JSON, f"{name} not written"))
    for name in case.yaml_files:
        target = folder / name
        if target.is_file():
            text = target.read_text(encoding="utf-8", errors="replace")
            found = re.search(r"(?im):\s*[-+]?\.(inf|nan)\b", text)
            if found:
                problems.append((NONFINITE_JSON, f"{name} holds {found.group(0).strip()!r}"))
    for problem in problems:
        if problem is not None:
            return problem[0], f"{problem[0]} {command}: {problem[1]}", problem[1]
    return OK, "", ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"bare {name}")


def check_json(text: str, what: str) -> tuple[str, str] | None:
    """None for strict JSON with finite numbers; else (outcome, where the first problem is)."""
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        if "bare " in str(exc):
            found = re.search(r"^(.*?)(-?Infinity|NaN)", text, re.M)
            key = re.findall(r'"([^"]+)"\s*:', found.group(1))[-1:] if found else []
            return NONFINITE_JSON, f"{what}: {exc} (key {key[0] if key else '?'})"
        return BAD_JSON, f"{what}: {str(exc)[:120]}"
    bad = _first_nonfinite(data, "")
    if bad is not None:
        return NONFINITE_JSON, f"{what}: {bad} overflows to a non-finite float"
    return None


def _first_nonfinite(data: Any, where: str) -> str | None:
    if isinstance(data, float) and not math.isfinite(data):
        return where or "(top)"
    if isinstance(data, dict):
        for key, value in data.items():
            found = _first_nonfinite(value, f"{where}.{key}" if where else str(key))
            if found:
                return found
    if isinstance(data, list):
        for value in data:
            found = _first_nonfinite(value, f"{where}[]")
            if found:
                return found
    return None


_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+),? in (\S+)', re.M)


def _simcc_location(path: str, function: str) -> str | None:
    marker = path.rfind("/simcc/")
    if marker < 0 or "site-packages" in path[:marker]:
        return None
    return f"simcc/{path[marker + len('/simcc/'):]}:{function}"


def parse_traceback(stderr: str) -> tuple[str, str, str]:
    """(exception type, innermost simcc frame, message) of the exception that ended the run.
    A worker's traceback (concurrent.futures' _RemoteTraceback) is the one that counts."""
    text = stderr
    remote = re.search(r'_RemoteTraceback: \n"""\n(.*?)\n"""', stderr, re.S)
    if remote:
        text = remote.group(1)
    block = text[text.rfind("Traceback (most recent call last)"):]
    frames = [_simcc_location(path, func) for path, _, func in _FRAME.findall(block)]
    frames = [f for f in frames if f]
    frame = frames[-1] if frames else "(no simcc frame)"
    last = ""
    for line in block.splitlines():
        if line and not line.startswith((" ", "Traceback")):
            last = line
    exc_type, _, message = last.partition(":")
    return exc_type.strip() or "?", frame, message.strip()


def _stuck_frame(stderr: str) -> str:
    """The innermost simcc frame of a faulthandler dump (most recent call first)."""
    for path, _, func in re.findall(r'File "([^"]+)", line (\d+) in (\S+)', stderr):
        location = _simcc_location(path, func)
        if location:
            return location
    return "(no simcc frame)"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _shape(line: str) -> str:
    """An error line with its numbers and quoted names blurred, to group the same message."""
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    return re.sub(r"\d+(\.\d+)?", "N", line)[:100]


# ---------------------------------------------------------------------------------------------
# Running many


def run_many(cases: list[Case], jobs: int, source_root: Path = ROOT, python: str = sys.executable,
             timeout_s: float = DEFAULT_TIMEOUT_S, memory_bytes: int = DEFAULT_MEMORY_BYTES,
             progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every case, `jobs` subprocesses at a time (threads only wait on them); results in case order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case: Case) -> Outcome:
        outcome = run_case(case, source_root, python, timeout_s, memory_bytes)
        if progress is not None:
            progress(outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, cases))


def save_failure(case: Case, outcome: Outcome, folder: Path, source_root: Path = ROOT) -> Path:
    """Everything needed to replay a failing case: its files, the command, what it printed."""
    target = folder / outcome.outcome / case.ident
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    materialize(case, target, source_root)
    (target / "command.sh").write_text(
        "#!/bin/bash\n# run from this folder; PYTHONPATH selects the simcc tree under test\n"
        f"cd \"$(dirname \"$0\")\" && PYTHONPATH=\"${{PYTHONPATH:-{source_root}}}\" "
        f"{sys.executable} -m simcc {' '.join(_shell_arg(a) for a in case.argv)}\n")
    (target / "stderr.txt").write_text(outcome.stderr_tail)
    (target / "stdout_head.txt").write_text(outcome.stdout_head)
    meta = outcome.as_dict()
    meta.pop("stderr_tail")
    meta.pop("stdout_head")
    (target / "case.json").write_text(json.dumps(meta, indent=2))
    return target


def _shell_arg(text: str) -> str:
    """A shell word for `text`; control characters and bytes that are not UTF-8 (surrogate-escaped
    by Python) as bash $'\\xNN' escapes, so that the command prints and replays exactly."""
    if re.fullmatch(r"[\w./=:,+-]+", text) and text.isascii():
        return text
    try:
        text.encode("utf-8")
        plain = not any(ord(c) < 32 or ord(c) == 127 for c in text)
    except UnicodeEncodeError:
        plain = False
    if plain:
        return "'" + text.replace("'", "'\\''") + "'"
    raw = os.fsencode(text)
    return "$'" + "".join(chr(b) if 32 <= b < 127 and b not in (39, 92) else f"\\x{b:02x}" for b in raw) + "'"
