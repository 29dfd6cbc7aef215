"""The package's import graph: no cycle, and function-level imports of phiclip's own modules only
where they are needed, each saying why.

Both rules read the source with :mod:`ast`, so an import hidden inside a function counts like one at
module top: a cycle that only a function-level import closes is still a cycle (a reader cannot follow it,
and it breaks as soon as someone moves the import up).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import phiclip

SRC = Path(phiclip.__file__).resolve().parent
#: The comment that must explain a function-level import of one of phiclip's own modules.
LAZY_MARK = "# lazy:"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = ["phiclip", *p.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _targets(mods: dict[str, Path], module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            if not is_pkg:
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for n in names:
        # importing phiclip.a.b runs phiclip.a's __init__ too
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[:i])
            if cand in mods and cand != "phiclip":
                out.append(cand)
    return out


def _walk(node: ast.AST, in_function: bool, found: list[tuple[ast.Import | ast.ImportFrom, bool]]) -> None:
    """Every executed import under ``node`` with whether it sits inside a function."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue  # annotations only: never executed
        if isinstance(child, ast.Import | ast.ImportFrom):
            found.append((child, in_function))
        _walk(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef), found)


def _comment_block(lines: list[str], lineno: int) -> str:
    """The import's line and the lines above it up to the start of its block of imports (a ``# lazy:``
    comment above a group of function-level imports covers the group)."""
    first = lineno - 1
    while first > 0 and lines[first - 1].strip().startswith(("from ", "import ", "#")):
        first -= 1
    return "\n".join(lines[first:lineno])


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str, str]]]:
    mods = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    lazy: list[tuple[str, int, str, str]] = []
    for module, path in mods.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        _walk(ast.parse(source), False, found)
        for node, in_function in found:
            for target in _targets(mods, module, path.name == "__init__.py", node):
                if target == module or module.startswith(target + "."):
                    continue  # a package's own __init__ is already running when its module loads
                edges[module].add(target)
                if in_function:
                    lazy.append((module, node.lineno, target, _comment_block(lines, node.lineno)))
    return edges, lazy


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle():
    edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_function_level_imports_of_phiclip_say_why():
    _, lazy = _graph()
    unexplained = sorted({f"{m}:{line} imports {t}" for m, line, t, text in lazy if LAZY_MARK not in text})
    assert not unexplained, (
        f"function-level imports of phiclip modules without a '{LAZY_MARK} <why>' comment on the line or the "
        "line above (move them to module top, or say why they must wait: an optional dependency, CLI start-up):\n"
        + "\n".join(unexplained))


def test_the_checker_sees_a_cycle_closed_inside_a_function():
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
