"""No import cycles inside ``distill``: every import statement (module level or inside a function)
is an edge of a graph over distill's modules, read with ``ast``; a cycle fails with its path."""

from __future__ import annotations

import ast
from pathlib import Path

import distill

ROOT = Path(distill.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: distill modules it imports}``; ``from pkg import sub`` counts as importing ``pkg.sub``."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: distill uses absolute imports only"
                subs = {f"{node.module}.{alias.name}" for alias in node.names}
                edges.update(subs & modules.keys() or {node.module})
        graph[name] = {m for m in edges if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "distill.models.registry" in graph["distill.models.file"]  # from distill.models.registry import ...
    assert "distill.models.file" in graph["distill.models"]  # package __init__
    assert "distill.run" in graph["distill.cli"]  # import inside a function


def test_no_import_cycles_in_distill():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_data_imports_nothing_from_losses():
    graph = import_graph()
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}
    data = [m for m in graph if m == "distill.data" or m.startswith("distill.data.")]
    assert "distill.data.importance" in data
    # distill.data.prepare reads the run's Config, whose checks look up the loss names it is given (a lazy
    # import of distill.losses.task in distill.config_load): that edge is the config's, not the data's
    without_config = {m: deps - {"distill.config", "distill.config_load"} for m, deps in graph.items()}
    assert "distill.config_load" in graph["distill.data.prepare"] and "distill.losses.task" in graph["distill.config_load"]
    leaks = {m: sorted(d for d in reachable(without_config, m) if d.startswith("distill.losses")) for m in data}
    leaks = {m: d for m, d in leaks.items() if d}
    assert not leaks, f"distill.data reaches distill.losses: {leaks}"


def test_models_and_teachers_know_no_data_set():
    """Networks and frozen teachers take images, not data sets: only acquiring a teacher for a run
    (``teachers.acquire``, ``teachers.gate``) reads the run's data."""
    graph = import_graph()
    run_side = {"distill.teachers.acquire", "distill.teachers.gate"}
    low = [m for m in graph if m.startswith(("distill.models", "distill.teachers")) and m not in run_side]
    assert "distill.teachers.cache" in low and "distill.teachers.finished" in low
    leaks = {m: sorted(d for d in reachable(graph, m) if d.startswith("distill.data")) for m in low}
    leaks = {m: d for m, d in leaks.items() if d}
    assert not leaks, f"models/teachers reach distill.data: {leaks}"


# Layers, lowest first: a module imports only from its own layer or lower ones.
LAYERS = [
    ("distill.errors", "distill.atomic", "distill.models", "distill.multiscale", "distill.embedding",
     "distill.selection", "distill.checkpoint", "distill.timing", "distill.outdir", "distill.headlines",
     "distill.resume", "distill.console", "distill.arithmetic"),
    ("distill.config", "distill.config_load", "distill.data", "distill.losses", "distill.students.registry",
     "distill.students.weights", "distill.students",
     "distill.teachers.frozen", "distill.teachers.finished", "distill.teachers.layers", "distill.teachers.cache",
     "distill.teachers", "distill.parallel", "distill.export", "distill.bench"),
    ("distill.engine", "distill.evaluate", "distill.objective"),
    ("distill.protocols", "distill.data.prepare", "distill.training", "distill.balance", "distill.report"),
    ("distill.teachers.acquire", "distill.teachers.gate"),
    ("distill.students.train",),
    ("distill.rows", "distill.run"),
    ("distill.study", "distill.study_stats", "distill.study_output", "distill.study_workers"),
    ("distill.cli", "distill.cli_help", "distill.cli_reference"),
]


def layer_of(module: str) -> int:
    """The layer of ``module``: that of the longest listed name it is or lies under."""
    best = max((name for layer in LAYERS for name in layer if module == name or module.startswith(name + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_imports_go_down_the_layers():
    graph = import_graph()
    assert layer_of("distill.data.prepare") == 3 and layer_of("distill.data.base") == 1  # the longest name decides
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert not upward, "imports up the layers: " + ", ".join(upward)
