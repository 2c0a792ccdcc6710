"""Data flows one way through simcc: specs -> routing -> model -> layout -> costs -> plan -> sim ->
estimate -> report, with the tools (profile, calibrate, validation, sweep) and the CLI on top.
This test reads every module's imports (function-level ones too) and fails on an import that
points up a layer or on any import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import simcc

PACKAGE = Path(simcc.__file__).parent

# Lowest first. The model's MoE blocks consume routed expert loads, so routing sits below the
# model; the typed results are a schema with no dependencies, shared by phases, estimate and report.
LAYERS: list[tuple[str, ...]] = [
    ("simcc.errors", "simcc.io", "simcc.results", "simcc.isotonic", "simcc.memo"),
    ("simcc.specs",),
    ("simcc.routing",),
    ("simcc.model",),
    ("simcc.layout",),
    ("simcc.costs",),
    ("simcc.plan", "simcc.phases"),
    ("simcc.sim",),
    ("simcc.estimate",),
    ("simcc.report",),
    ("simcc.profile", "simcc.calibrate", "simcc.validation", "simcc.sweep", "simcc.search"),
    ("simcc.cli", "simcc.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simcc"):
            found.add(node.module)
            # `from simcc.model import blocks` imports the submodule
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("simcc"))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no declared layer: add it to LAYERS")


def test_every_module_has_a_layer():
    for module in import_graph():
        if module != "simcc":
            layer_of(module)


def test_no_import_points_up():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() if module != "simcc"
              for target in targets if layer_of(target) > layer_of(module)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules, or None (iterative depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in graph:
        if state.get(root):
            continue
        path, iterators = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while iterators:
            step = next(iterators[-1], None)
            if step is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(step) == 1:
                return path[path.index(step):] + [step]
            elif not state.get(step):
                state[step] = 1
                path.append(step)
                iterators.append(iter(sorted(graph[step])))
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_what_they_guard():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert layer_of("simcc.specs.workload") < layer_of("simcc.model.graph") < layer_of("simcc.sim.training")
