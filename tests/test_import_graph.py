"""The package's import graph, drawn from the source with ``ast``, has no cycle.

Every way one module of ``lightning_optim`` can import another counts: ``import a.b`` and ``from a import b``
at module level, inside functions or under ``if TYPE_CHECKING``, relative imports, and
``importlib.import_module("a.b")`` with a literal name. ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when there is one, else to ``pkg`` (``name`` is then an attribute of the package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_optim

PACKAGE_DIR = Path(lightning_optim.__file__).parent


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.AST, package: str, modules: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called == "import_module" and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every ``.py`` file under ``package_dir``."""
    files = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {
            t for node in ast.walk(tree) for t in _targets(node, package, modules) if t in modules and t != name
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or ``None`` when the graph is acyclic (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_finder_sees_each_kind_of_import(tmp_path):
    pkg = tmp_path / "lightning_optim"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from lightning_optim.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import importlib\nimportlib.import_module('lightning_optim.c')\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(pkg)
    assert graph["lightning_optim.a"] == {"lightning_optim.sub.b"}
    assert graph["lightning_optim.sub.b"] == {"lightning_optim.c"}
    assert graph["lightning_optim.c"] == {"lightning_optim.a"}
    assert find_cycle(graph) == ["lightning_optim.a", "lightning_optim.sub.b", "lightning_optim.c", "lightning_optim.a"]
    (pkg / "c.py").write_text("")
    assert find_cycle(import_graph(pkg)) is None


def test_lightning_optim_imports_form_no_cycle():
    graph = import_graph()
    assert "lightning_optim.registry" in graph and "lightning_optim.builtins" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_algorithm_modules_do_not_import_the_registry():
    """The table (:mod:`lightning_optim.builtins`) imports the algorithms, never the other way round."""
    graph = import_graph()
    algorithms = [m for m in graph if m.startswith("lightning_optim.optim")]
    assert len(algorithms) > 10
    offenders = {m: sorted(graph[m] & {"lightning_optim.registry", "lightning_optim.builtins"}) for m in algorithms}
    assert not any(offenders.values()), {m: v for m, v in offenders.items() if v}
