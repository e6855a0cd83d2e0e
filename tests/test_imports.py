"""The package's import graph: one way, and no module reaching into another's private names.

Every ``import`` counts, at module level or inside a function (a lazy import closes a cycle as
surely as an eager one). Walked with ``ast``, without importing anything. The registry's
loading of a built-in backend by name (``patterngen.backends.get_backend``) is the one lookup
that is not an import statement: backends are found through it, never imported by the layers
below them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: source folder of each package (pyproject.toml's package-dir)
PACKAGES = {"patterngen": "patterngen", "patterngen.distributed": "patterngen/distributed",
            "patterngen.backends": "backends", "patterngen.backends.numba": "backends/numba",
            "patterngen.backends.sdpa": "backends/sdpa",
            "patterngen.backends.planned": "backends/planned"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


MODULES = _modules()


def _package_of(module: str) -> str:
    return module if module in PACKAGES else module.rsplit(".", 1)[0]


def _base(module: str, node: ast.ImportFrom) -> str:
    """The module a ``from ... import`` reads from, relative levels resolved."""
    if not node.level:
        return node.module or ""
    parts = _package_of(module).split(".")
    parts = parts[:len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(module: str, tree) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` of every package import in ``tree``;
    ``from m import x`` where ``m.x`` is a module gives that module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in MODULES
                           else (base, alias.name, node.lineno))
    return [(target, name, line) for target, name, line in out
            if target.split(".")[0] == "patterngen"]


def _aliases(module: str, tree) -> dict[str, str]:
    """Local names bound to a package module by an import (``from . import ops``)."""
    bound = {}
    for node in ast.walk(tree):
        for alias in node.names if isinstance(node, (ast.Import, ast.ImportFrom)) else ():
            if isinstance(node, ast.ImportFrom):
                target = f"{_base(module, node)}.{alias.name}"
            elif alias.asname:
                target = alias.name
            else:
                continue
            if target in MODULES:
                bound[alias.asname or alias.name] = target
    return bound


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _violations_in(module: str, tree, where: str) -> list[str]:
    found = []
    for target, name, line in _imports(module, tree):
        if name is not None and _private(name) and target != module:
            found.append(f"{where}:{line} imports {target}.{name}")
        last = target.rsplit(".", 1)[-1]
        if name is None and _private(last) and _package_of(target) != _package_of(module):
            found.append(f"{where}:{line} imports the private module {target}")
    aliases = _aliases(module, tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            found.append(f"{where}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return found


def _violations() -> list[str]:
    return [v for module, path in MODULES.items()
            for v in _violations_in(module, ast.parse(path.read_text(), str(path)),
                                    str(path.relative_to(ROOT)))]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {t for t, _, _ in _imports(module, tree) if t in MODULES and t != module}
    return graph


def _cycles(graph) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_walk_sees_every_package():
    folders = {str(p.parent.relative_to(ROOT)) for top in ("patterngen", "backends")
               for p in (ROOT / top).rglob("__init__.py")}
    assert folders == set(PACKAGES.values())


def test_the_walk_sees_every_module_and_lazy_imports():
    assert {"patterngen.plan", "patterngen.backends.planned", "patterngen.backends.numba",
            "patterngen.distributed.attention"} <= set(MODULES)
    tree = ast.parse("def f():\n    from .backends import sdpa\n    from . import ir as _ir\n")
    assert [t for t, _, _ in _imports("patterngen.plan", tree)] == [
        "patterngen.backends.sdpa", "patterngen.ir"]


def test_the_checks_catch_a_cycle_and_a_private_name():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from .sdpa import _choose_layout\nfrom . import planned\n"
                     "def f():\n    return planned._Runner\n")
    assert _violations_in("patterngen.backends.ops", tree, "ops.py") == [
        "ops.py:1 imports patterngen.backends.sdpa._choose_layout",
        "ops.py:4 reads patterngen.backends.planned._Runner"]


def test_no_module_imports_another_modules_private_names():
    assert _violations() == []


def test_no_import_cycle():
    assert _cycles(_graph()) == []

