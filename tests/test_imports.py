"""The package reads top-down: no import cycle among lizard_jax and pallas_kernels modules.

The graph is built from the source with `ast`, so imports inside functions (the usual way to dodge a cycle at
import time) count as edges too, and so does `importlib.import_module("literal")`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lizard_jax", "pallas_kernels")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of PACKAGES (a package is named by its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name imported anywhere in `tree` (`from a import b` gives both `a.b` and `a`)."""
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules whose code importing it runs.

    Importing `a.b.c` also runs the `__init__` of `a` and `a.b`; those edges are kept except for the importer's
    own ancestors (already running when it is imported), so a package's `__init__` importing its own children
    is not a cycle, but `x` importing `a.b.c` while `a.b`'s `__init__` imports `x` is.
    """
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        own = module.split(".")
        ancestors = {".".join(own[:i]) for i in range(1, len(own) + 1)}
        edges = set()
        for name in _imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in files and target not in ancestors:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component with more than one
    module or a self-import; Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    scc.add(member)
                    if member == node:
                        break
                if len(scc) > 1 or node in graph[node]:
                    sccs.append(scc)
    return [_cycle_in(graph, scc) for scc in sccs]


def _cycle_in(graph: dict[str, set[str]], scc: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search inside the component)."""
    start = min(scc)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & scc):
                if child == start:
                    path = [node]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{sorted(scc)} is not strongly connected")


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (each line: a module importing the next):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_checker_finds_function_level_and_package_cycles(tmp_path):
    """The checker itself can fail: a cycle through a function-level import, one through a package's
    `__init__`, and one through importlib are each found; a package importing its own children is not a cycle."""
    files = {
        "lizard_jax/__init__.py": "from lizard_jax.a import f\n",
        "lizard_jax/a.py": "def f():\n    from lizard_jax import b\n",
        "lizard_jax/b.py": "import lizard_jax.a\n",
        "lizard_jax/pkg/__init__.py": "from lizard_jax.pkg.child import g\nfrom lizard_jax import c\n",
        "lizard_jax/pkg/child.py": "from . import sibling\n",
        "lizard_jax/pkg/sibling.py": "",
        "lizard_jax/c.py": "from lizard_jax.pkg.sibling import x\n",
        "pallas_kernels/__init__.py": "",
        "pallas_kernels/k.py": "import importlib\nimportlib.import_module('pallas_kernels.m')\n",
        "pallas_kernels/m.py": "from pallas_kernels import k\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert "lizard_jax.pkg" not in graph["lizard_jax.pkg.child"]  # its own package: already running
    cycles = sorted(find_cycles(graph))
    assert cycles == [["lizard_jax.a", "lizard_jax.b", "lizard_jax.a"],
                      ["lizard_jax.c", "lizard_jax.pkg", "lizard_jax.c"],
                      ["pallas_kernels.k", "pallas_kernels.m", "pallas_kernels.k"]], cycles
