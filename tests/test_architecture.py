"""docs/architecture.md's layer table is true: every module of phiclip is in one layer, and no module imports
a module of a lower layer (a higher number). Reads the table from the page, so the page and the code change
together."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import phiclip

SRC = Path(phiclip.__file__).resolve().parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _layers() -> list[tuple[int, list[str]]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|[^|]*\|(.*)\|\s*$", line)
        if m:
            rows.append((int(m.group(1)), re.findall(r"`([^`]+)`", m.group(2))))
    return rows


def _module_paths() -> list[str]:
    """Every module as a path under src/phiclip without .py (a package is its folder name; the root is __init__)."""
    out = []
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC).with_suffix("").as_posix()
        out.append(rel[: -len("/__init__")] if rel.endswith("/__init__") else rel)
    return sorted(out)


def _layer_of(path: str, layers: list[tuple[int, list[str]]]) -> int | None:
    """The layer whose most specific pattern matches ``path`` (an exact name beats a ``*`` pattern)."""
    exact = [n for n, pats in layers if path in pats]
    if exact:
        return exact[0]
    wild = [n for n, pats in layers if any("*" in pat and fnmatch.fnmatch(path, pat) and
                                           pat.count("/") == path.count("/") for pat in pats)]
    return wild[0] if wild else None


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, module path) of every phiclip import in a module: the module named, not its parent packages."""
    file = SRC / (path + ".py") if (SRC / (path + ".py")).exists() else SRC / path / "__init__.py"
    is_pkg = file.name == "__init__.py"
    here = "phiclip" if path == "__init__" else "phiclip." + path.replace("/", ".")
    out = []
    for node in _executed_imports(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = here.split(".") if is_pkg else here.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names = [f"{base}.{a.name}" if _exists(f"{base}.{a.name}") else base for a in node.names]
        for name in names:
            if not name.startswith("phiclip"):
                continue
            rel = name.split(".")[1:]
            while rel and not _exists(".".join(["phiclip", *rel])):
                rel = rel[:-1]
            target = "/".join(rel) if rel else "__init__"
            if target != path:
                out.append((node.lineno, target))
    return out


def _exists(dotted: str) -> bool:
    rel = dotted.split(".")[1:]
    return bool(rel) and ((SRC / Path(*rel)).with_suffix(".py").exists() or (SRC / Path(*rel)).is_dir())


def _executed_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (``if TYPE_CHECKING:`` blocks left out: annotations only)."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            todo.append(child)
    return found


def test_the_page_has_the_layer_table():
    layers = _layers()
    assert [n for n, _ in layers] == list(range(1, len(layers) + 1)) and len(layers) >= 8


def test_every_module_is_in_one_layer():
    layers = _layers()
    missing = [p for p in _module_paths() if _layer_of(p, layers) is None]
    assert not missing, f"modules in no layer of {DOC.name} (add them to the table): {missing}"


def test_no_module_imports_a_lower_layer():
    layers = _layers()
    wrong = []
    for path in _module_paths():
        mine = _layer_of(path, layers)
        for line, target in _imports(path):
            theirs = _layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{path}:{line} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, f"imports against the layers of {DOC.name}:\n" + "\n".join(sorted(set(wrong)))


def test_the_checker_sees_a_wrong_direction(tmp_path, monkeypatch):
    layers = [(1, ["a"]), (2, ["b", "b/*"])]
    assert _layer_of("b/x", layers) == 2 and _layer_of("a", layers) == 1 and _layer_of("c", layers) is None
