"""Read YAML specs safely, resolve device/node names, apply `--set` overrides, and turn every
validation failure into one line that names the file, the field and what was expected."""

from __future__ import annotations

import copy
import decimal
import difflib
import functools
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from simcc.errors import InputError
from simcc.io import note_input, read_user_text
from simcc.specs.hardware import PROFILE_KINDS, System, system_from
from simcc.specs.workload import MoEFFNBlock, Workload

M = TypeVar("M", bound=BaseModel)

SHIPPED_ROOT = Path(__file__).resolve().parents[2]
HARDWARE_DIR_ENV = "SIMCC_HARDWARE_PROFILES"
PROFILE_FOLDERS = ("clusters", "edge", "nodes", "devices", "measured")


def shipped_hardware_dir() -> Path:
    return Path(os.environ.get(HARDWARE_DIR_ENV, SHIPPED_ROOT / "hardware_profiles"))


def shipped_workload_dir() -> Path:
    return SHIPPED_ROOT / "workloads"


def read_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping, parsed once per content (a sweep reads the same profiles for every
    configuration); callers get their own copy to change."""
    source = str(path)
    return _unshared(_parse_yaml(source, read_user_text(path, MAX_SPEC_BYTES, "a spec file")), source, frozenset())


def _unshared(value: Any, source: str, ancestors: frozenset[int]) -> Any:
    """A copy in which every YAML alias is its own object: `--set` on one block must not change
    the blocks that share its anchor (copy.deepcopy keeps aliases shared). Bounded: parsing already
    refused more than MAX_VALUES values after alias expansion and more than MAX_NESTING levels; an
    alias inside its own anchor (a cycle) is refused here."""
    if not isinstance(value, (dict, list)):
        return value
    if id(value) in ancestors:
        raise InputError(source, "YAML", "an alias refers to the mapping or list that contains it; expected a tree")
    inner = ancestors | {id(value)}
    if isinstance(value, dict):
        return {key: _unshared(item, source, inner) for key, item in value.items()}
    return [_unshared(item, source, inner) for item in value]


MAX_SPEC_BYTES = 16 << 20  # a workload or profile is a few kB; this bounds parsing time and memory
MAX_NESTING = 64  # levels of mappings and lists; real specs use fewer than ten
MAX_VALUES = 1_000_000  # values after expanding YAML aliases (a billion-laughs file expands to 10^9)


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build objects) that refuses a key given twice in one
    mapping, which plain YAML loading would silently resolve to the last value, and nesting that
    would exhaust the recursion limit."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key (a mapping or list used as a key)
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                        key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_NESTING} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _SpecLoader.construct_mapping)


def parse_yaml_text(text: str, source: str) -> Any:
    """YAML text to Python values, every parse failure as one line naming the file and line."""
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputError(source, where, f"not valid YAML ({problem})") from None
    except RecursionError:
        raise InputError(source, "YAML", f"nested deeper than {MAX_NESTING} levels") from None


@functools.lru_cache(maxsize=256)
def _parse_yaml(source: str, text: str) -> dict[str, Any]:
    data = parse_yaml_text(text, source)
    if not isinstance(data, dict):
        raise InputError(source, "", "expected a YAML mapping at the top level")
    check_values(data, source)
    return data


def check_values(data: Any, source: str) -> None:
    """Refuse parsed YAML that expands, through its aliases, past MAX_VALUES values (counted
    without expanding: an object reached twice is counted once per reference, a recursive alias
    once), or that holds a string no UTF-8 output can carry (a lone surrogate, "\\ud800")."""
    sizes: dict[int, int] = {}

    def size(value: Any) -> int:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(source, "YAML", f"text {value[:20]!r} is not valid Unicode (a lone surrogate)") from None
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key not in sizes:
            sizes[key] = 1  # a cycle (a recursive alias) counts once
            if isinstance(value, dict):
                for name in value:  # keys are plain values: checked, not counted
                    size(name)
            children = value.values() if isinstance(value, dict) else value
            sizes[key] = 1 + sum(size(child) for child in children)
        return sizes[key]

    expanded = size(data)
    if expanded > MAX_VALUES:
        raise InputError(source, "YAML", f"aliases expand to {expanded:,} values; a spec has at most {MAX_VALUES:,}")


# ---------------------------------------------------------------- overrides (--set key.path=value)

def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.0.c=value` -> (['a','b',0,'c'], parsed value). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise InputError(f"--set {text}", "", "expected key.path=value")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise InputError(f"--set {text}", "", "expected key.path=value")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    value = _override_value(raw) if raw.strip() else ""
    if isinstance(value, (list, dict)):
        value = copy.deepcopy(value)  # the cached parse is shared; the spec it lands in is not
    check_values(value, f"--set {text}")
    return path, value


@functools.lru_cache(maxsize=4096)
def _override_value(raw: str) -> Any:
    """A --set value as a YAML scalar (the raw text if it is not YAML). Cached: a sweep parses the
    same few values for every configuration, and the YAML parser is half of loading one."""
    try:
        return yaml.load(raw, Loader=_SpecLoader)  # noqa: S506
    except (yaml.YAMLError, RecursionError):
        return raw


def apply_override(data: dict[str, Any], path: list[str | int], value: Any, label: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise InputError(label, _dotted(path[: depth + 1]), f"no list item {part}")
            node = node[part]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        else:
            raise InputError(label, _dotted(path[: depth + 1]), "is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise InputError(label, _dotted(path), f"no list item {last}")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise InputError(label, _dotted(path[:-1]), "is a value, not a section")


def _dotted(loc: typing.Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc)


# ---------------------------------------------------------------- validation errors -> one line

def _unwrap(annotation: Any) -> list[Any]:
    """The model classes a field annotation can hold (through Optional, list, dict, Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        found: list[Any] = []
        for arg in typing.get_args(annotation):
            found.extend(_unwrap(arg))
        return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _model_at(root: type[BaseModel], loc: typing.Sequence[Any]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = root
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue  # list index: same item model
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        candidates = _unwrap(field.annotation)
        current = candidates[0] if candidates else None
    return current


def _nearest(word: str, valid: list[str]) -> list[str]:
    """The closest valid name: a prefix match first (zero -> zero_stage), then by similarity."""
    prefixed = [v for v in valid if v.startswith(word) or word.startswith(v)]
    return prefixed[:1] or difflib.get_close_matches(word, valid, n=1, cutoff=0.5)


def _explain(error: dict[str, Any], root: type[BaseModel]) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        close = _nearest(str(loc[-1]), valid)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; valid keys: {', '.join(valid)}" if valid else "")
        return f"unknown key{hint}"
    if kind == "missing":
        return "required field is missing"
    message = str(error["msg"])
    message = message.replace("Input should be", "expected").replace("Value error, ", "")
    for bound in (error.get("ctx") or {}).values():  # a limit as written (1e-18, not 0.000000000000000001)
        if isinstance(bound, float) and (0 < abs(bound) < 1e-6 or abs(bound) >= 1e15):
            message = message.replace(format(decimal.Decimal(repr(bound)), "f"), f"{bound:g}")
    if kind not in ("value_error", "assertion_error") and "input" in error:
        shown = error["input"]
        if not isinstance(shown, (dict, list)):
            text = repr(shown)
            message += f", got {text if len(text) <= 40 else text[:37] + '...'}"
    return message


def validate(model: type[M], data: dict[str, Any], source: str, overrides: dict[str, str] | None = None) -> M:
    """Validate `data`; on failure raise InputError naming the first bad field.

    `overrides` maps a dotted path to the `--set` text that produced it, so that an error in an
    overridden field names the override rather than the file."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # A typo'd key also makes its intended field "missing": report the typo, the cause.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        field = _dotted(first["loc"]) or "(top level)"
        where = source
        for path, label in (overrides or {}).items():
            # the override set this field, a section holding it, or something inside this section
            if field == path or field.startswith(path + ".") or path.startswith(field + "."):
                where = f"{label} (in {source})"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InputError(where, field, _explain(first, model) + more) from None


# ---------------------------------------------------------------- hardware

def _library_root(profile_path: Path) -> Path:
    """The hardware_profiles folder a profile belongs to: its nearest ancestor with devices/."""
    for parent in profile_path.resolve().parents:
        if (parent / "devices").is_dir():
            return parent
    return shipped_hardware_dir()


def _find_named(kind: str, name: str, roots: list[Path]) -> Path | None:
    folder = {"device": "devices", "node": "nodes"}[kind]
    for root in roots:
        candidate = root / folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def _known_names(kind: str, roots: list[Path]) -> list[str]:
    folder = {"device": "devices", "node": "nodes"}[kind]
    return sorted({p.stem for root in roots for p in (root / folder).glob("*.yaml")})


def _resolve_reference(data: dict[str, Any], field: str, kind: str, roots: list[Path], source: str) -> None:
    """Replace `field: name` by the validated contents of the named device/node file."""
    ref = data.get(field)
    if not isinstance(ref, str):
        if isinstance(ref, dict) and kind == "node":
            _resolve_reference(ref, "device", "device", roots, source)
        return
    path = _find_named(kind, ref, roots)
    if path is None:
        close = _nearest(ref, _known_names(kind, roots))
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(source, field, f"no {kind} named '{ref}' in {', '.join(str(r) for r in roots)}{hint}")
    referenced = read_yaml(path)
    if kind == "node":
        _resolve_reference(referenced, "device", "device", roots, str(path))
    referenced.setdefault("kind", kind)
    validate(PROFILE_KINDS[kind], referenced, str(path))  # errors name the referenced file
    referenced.pop("kind", None)
    data[field] = referenced


def resolve_profile_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the bare name of a shipped profile (e.g. dgx_h100_x8)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    root = shipped_hardware_dir()
    for folder in PROFILE_FOLDERS:  # a whole system before the bare device of the same name
        candidate = root / folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    return path  # read_yaml reports it as not found


def load_hardware(name_or_path: str, overrides: list[str] | None = None) -> System:
    profile, source = load_profile_model(name_or_path, overrides)
    return system_from(profile, source)  # type: ignore[arg-type]


def load_profile_model(name_or_path: str, overrides: list[str] | None = None):
    """The validated profile (Device, Node, Cluster or Edge) with every name resolved, and its path."""
    path = resolve_profile_path(name_or_path)
    source = str(path)
    data = read_yaml(path)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in PROFILE_KINDS:
        shown = repr(kind) if isinstance(kind, str) or kind is None else f"a {type(kind).__name__}"
        raise InputError(source, "kind", f"expected one of {', '.join(PROFILE_KINDS)}, got {shown[:40]}")
    roots = [_library_root(path)]
    if shipped_hardware_dir() not in roots:
        roots.append(shipped_hardware_dir())
    if kind in ("node", "edge"):
        _resolve_reference(data, "device", "device", roots, source)
    if kind == "cluster":
        _resolve_reference(data, "node", "node", roots, source)
    labels = _apply_all(data, overrides or [])
    return validate(PROFILE_KINDS[kind], data, source, labels), source


# ---------------------------------------------------------------- workloads

def _apply_all(data: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        label = f"--set {text}"
        apply_override(data, path, value, label)
        labels[_dotted(path)] = label
    return labels


SWEEP_FOLDER = "sweeps"  # sweep files live beside the workloads they sweep, but are not workloads
SUITE_SUFFIX = "_suite"  # nor are validation suites (workloads/validation/published_suite.yaml)


def shipped_workload_files(stem: str = "*") -> list[Path]:
    return [p for p in sorted(shipped_workload_dir().glob(f"**/{stem}.yaml"))
            if SWEEP_FOLDER not in p.relative_to(shipped_workload_dir()).parts and not p.stem.endswith(SUITE_SUFFIX)]


def resolve_workload_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    for candidate in shipped_workload_files(name_or_path):
        return candidate
    return path


def load_workload(name_or_path: str, overrides: list[str] | None = None) -> tuple[Workload, str]:
    path = resolve_workload_path(name_or_path)
    data = read_yaml(path)
    labels = _apply_all(data, overrides or [])
    workload = validate(Workload, data, str(path), labels)
    for referenced in referenced_files(workload.model.blocks):
        note_input(referenced)
    return workload, str(path)


def referenced_files(items: list[Any]) -> list[str]:
    """The files a model's blocks name (expert-load histograms, expert placements): inputs the
    run reads later, which no output of the same run may replace."""
    found: list[str] = []
    for item in items:
        if item.blocks is not None:
            found += referenced_files(item.blocks)
        elif isinstance(item.spec, MoEFFNBlock):
            found += [f for f in (item.spec.load.histogram, item.spec.routing.placement_file) if f]
    return found


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--set hardware.x=1` goes to the hardware profile; everything else to the workload."""
    hardware = [o.removeprefix("hardware.") for o in overrides if o.startswith("hardware.")]
    workload = [o for o in overrides if not o.startswith("hardware.")]
    return workload, hardware
