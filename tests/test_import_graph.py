"""The package's import graph has no circles (issue 16).

A small AST scan: every `import` / `from ... import` anywhere in a module (at module
level, inside functions, under `if TYPE_CHECKING:`) is an edge from that module to the
archer_mcore module it names. `from pkg import name` points at `pkg.name` when that is a
module of the package, else at `pkg` itself. Importing `a.b.c` also runs `a/__init__` and
`a/b/__init__`, but those implicit edges are left out (as grimp does): a package's
`__init__` that re-exports its submodules would otherwise be a circle with each of them.
`kernels/` installs as `archer_mcore.kernels` (setup.py) and is scanned under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"archer_mcore": REPO / "archer_mcore", "archer_mcore.kernels": REPO / "kernels" / "src"}


def _module_files(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the roots."""
    modules: dict[str, Path] = {}
    for prefix, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([prefix, *parts])] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` (source at `path`) imports anywhere."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()

    def deepest(dotted: str) -> str | None:
        """The longest prefix of `dotted` that is a module of the package."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in modules:
                return candidate
        return None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = deepest(alias.name)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = deepest(f"{source}.{alias.name}") or deepest(source)
                if target:
                    found.add(target)
    found.discard(name)
    return found


def import_graph(roots: dict[str, Path] = ROOTS) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = _module_files(roots)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle_through(graph: dict[str, set[str]], scc: set[str]) -> list[str]:
    """One shortest circle inside a strongly connected component, as a path a -> ... -> a."""
    start = min(scc)
    parent: dict[str, str] = {}
    frontier, seen = [start], {start}
    while frontier:
        nxt: list[str] = []
        for node in frontier:
            for succ in sorted(graph[node] & scc):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if succ not in seen:
                    seen.add(succ)
                    parent[succ] = node
                    nxt.append(succ)
        frontier = nxt
    raise AssertionError(f"{sorted(scc)} is not strongly connected")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~150)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc: set[str] = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted((_cycle_through(graph, s) for s in sccs), key=lambda c: c[0])


# ------------------------------------------------------------------ the scanner itself
def test_the_scanner_sees_every_kind_of_import(tmp_path: Path) -> None:
    # A hand-built package with one circle of each kind the scan must see: a relative
    # import at module level, a function-level absolute import, an import under
    # TYPE_CHECKING, and `from pkg import submodule`. Each edge was derived by hand.
    pkg = tmp_path / "archer_mcore"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from .b import f\n",
        "b.py": "def f():\n    import archer_mcore.a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from archer_mcore.sub import d\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import c\nimport os, json\n",
        "e.py": "from archer_mcore.sub.d import thing\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph({"archer_mcore": pkg})
    assert graph == {
        "archer_mcore": set(),
        "archer_mcore.a": {"archer_mcore.b"},
        "archer_mcore.b": {"archer_mcore.a"},
        "archer_mcore.c": {"archer_mcore.sub.d"},
        "archer_mcore.sub": set(),
        "archer_mcore.sub.d": {"archer_mcore.c"},
        "archer_mcore.e": {"archer_mcore.sub.d"},
    }
    assert find_cycles(graph) == [
        ["archer_mcore.a", "archer_mcore.b", "archer_mcore.a"],
        ["archer_mcore.c", "archer_mcore.sub.d", "archer_mcore.c"],
    ]


def test_a_longer_circle_is_reported_as_its_path() -> None:
    graph = {"x": {"y"}, "y": {"z"}, "z": {"x", "w"}, "w": set()}
    assert find_cycles(graph) == [["x", "y", "z", "x"]]
    assert find_cycles({"x": {"y"}, "y": set()}) == []


# ------------------------------------------------------------------ the package
def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert "archer_mcore.config" in graph and len(graph) > 50  # the scan found the package
    cycles = find_cycles(graph)
    assert not cycles, "import circles in archer_mcore:\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles
    )
