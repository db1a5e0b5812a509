"""The import graph of pykvm/, read from every module's AST, has no cycles and no lower->higher edge.

Every import counts wherever it is written: at module level, inside a function (the lazy
imports that keep `pykvm run` fast), under `if TYPE_CHECKING`; absolute (`pykvm.x`) and
relative (`from ..x import y`) alike. `from P import name` is an edge to the submodule P.name
when there is one, else to the package P itself, that is to its __init__.py, whose own
imports (its re-exports) are edges from P to its submodules: importing a package runs them.
So a module that takes a name from its own package's __init__ while that __init__ imports the
module is a cycle, as it is for Python (a partly initialized package).

The root package `pykvm` (pykvm/__init__.py) is the API's front door (`pykvm.VM` re-exports
api.py on first use), so it sits in the top layer: no module of pykvm may import it (the
version everyone reads lives in the leaf pykvm/version.py).
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pykvm")

# lowest first; a module may import its own layer and the ones below it (pykvm.X.Y is in X's layer)
LAYERS = [
    ("errors", "paths", "units", "record", "version", "hostsock"),   # leaves: import nothing of pykvm's but each other
    ("startup",),         # cffi modules, caches, lateimport, the seccomp program
    ("abi",),             # the guest ABI header, parsed through startup.ffigen's cache
    ("kvm",), ("memory",), ("boot",), ("devices",), ("bus",), ("crash",), ("partitions",), ("sandbox", "landlock"),
    ("machine",),
    ("gdb", "control", "snapshot"),
    ("api",),
    ("fuzz", "pytest_plugin", "runcmd", "cli", "vmproc", "__main__", ""),   # "": the root package
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py under pykvm/ (a package is its __init__.py)."""
    out = {}
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _edges(name: str, path: str, modules: dict[str, str] = MODULES) -> set[tuple[str, int]]:
    """(imported pykvm module, line) for every import in the module's source."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update((a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "pykvm")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "pykvm":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add((sub if sub in modules else target, node.lineno))
    return out


GRAPH = {name: _edges(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1] if len(parts) > 1 else ""]


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if (m.split(".") + [""])[1] not in RANK)
    assert not unplaced, f"modules in no layer (add them to LAYERS here and to DESIGN.md's map): {unplaced}"


def test_every_import_names_a_module_that_exists():
    missing = sorted(f"{m} line {line}: {t}" for m, es in GRAPH.items() for t, line in es if t not in MODULES)
    assert not missing, missing


def test_no_import_goes_up_a_layer():
    up = sorted(f"{MODULES[m]}:{line}: {m} imports {t}" for m, es in GRAPH.items() for t, line in es
                if t in MODULES and _layer(t) > _layer(m))
    assert not up, "lower layers import higher ones:\n" + "\n".join(up)


def _cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    succ = {m: sorted({t for t, _ in es if t in graph and t != m}) for m, es in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, iter(succ[start]))]     # iterative: no recursion limit to meet
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    detail = [" <-> ".join(c) + "\n    " + "\n    ".join(f"{m} -> {t} (line {line})" for m in c
                                                         for t, line in sorted(GRAPH[m]) if t in c)
              for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


@pytest.mark.parametrize("source, expected", [
    ("from . import b\n", {("pykvm.pkg.b", 1)}),
    ("from . import name_in_init\n", {("pykvm.pkg", 1)}),
    ("from .. import errors\n", {("pykvm.errors", 1)}),
    ("from ..kvm import KvmError\n", {("pykvm.kvm", 1)}),
    ("def f():\n    from .b import g\n", {("pykvm.pkg.b", 2)}),
    ("import pykvm.kvm.vm\n", {("pykvm.kvm.vm", 1)}),
    ("import os\nfrom collections import deque\n", set()),
])
def test_edges_read_relative_absolute_and_function_level_imports(tmp_path, source, expected):
    path = tmp_path / "a.py"
    path.write_text(source)
    modules = {"pykvm.pkg": "", "pykvm.pkg.a": str(path), "pykvm.pkg.b": "", "pykvm.errors": "", "pykvm.kvm.vm": ""}
    assert _edges("pykvm.pkg.a", str(path), modules) == expected


def test_the_cycle_finder_finds_a_cycle_through_a_package_init():
    graph = {"pykvm.p": {("pykvm.p.a", 1)}, "pykvm.p.a": {("pykvm.p.b", 1)}, "pykvm.p.b": {("pykvm.p", 3)},
             "pykvm.q": {("pykvm.p", 1)}}
    assert _cycles(graph) == [["pykvm.p", "pykvm.p.a", "pykvm.p.b"]]
    del graph["pykvm.p.b"]
    assert _cycles(graph) == []
