"""Issue 21: no module of ``distill`` over 400 lines and no function over 60 (from ``def`` to its
last line, docstring included), read with ``ast``; a failure lists every offender."""

from __future__ import annotations

import ast
from pathlib import Path

import distill

ROOT = Path(distill.__file__).parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def offenders(name: str, source: str) -> list[str]:
    """``name: N lines`` when the module is too long, ``name:LINE function: N lines`` for each
    function or method that is (nested ones too)."""
    lines = len(source.splitlines())
    found = [f"{name}: {lines} lines"] if lines > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_the_check_finds_long_modules_functions_and_methods():
    def function(name: str, lines: int, indent: str = "") -> str:
        return f"{indent}def {name}():\n" + f"{indent}    x = 1\n" * (lines - 1)

    assert offenders("m.py", function("short", 60)) == []
    assert offenders("m.py", function("long", 61)) == ["m.py:1 long: 61 lines"]
    assert offenders("m.py", "class A:\n" + function("method", 61, "    ")) == ["m.py:2 method: 61 lines"]
    assert offenders("m.py", "x = 1\n" * 400) == []
    assert offenders("m.py", "x = 1\n" * 401) == ["m.py: 401 lines"]


def test_no_module_over_400_lines_and_no_function_over_60():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        name = path.relative_to(ROOT.parent).as_posix()
        found += offenders(name, path.read_text(encoding="utf-8"))
    assert not found, "too long, split them: " + "; ".join(found)

