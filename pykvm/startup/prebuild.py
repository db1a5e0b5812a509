"""Every cffi binding in the package, generated for a wheel to ship prebuilt.

    python -m pykvm.startup.prebuild OUTDIR      (setup.py runs it on the built package)

Every binding is found, not listed: each `ffigen.load("name", declarations)` call in the
package is located in the source, its module imported (which loads module-level bindings),
and the declarations of the others evaluated in their module's namespace, so a binding
loaded inside a function ships too. One whose declarations are not module-level fails the
build, naming the call: an installed package never loads a binding from anywhere but
itself, and one missing there would be parsed from C on every run.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys

from .. import paths
from . import ffigen


def ffigen_calls(package_dir: str = paths.PACKAGE) -> list[tuple[str, str, ast.expr, int]]:
    """(module, binding name, declarations expression, line) of every ffigen.load call in the package's sources."""
    found = []
    root = os.path.dirname(package_dir)
    for dirpath, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "_data"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if "ffigen" not in text:
                continue
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            for node in ast.walk(ast.parse(text, path)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "ffigen"):
                    if len(node.args) != 2 or not isinstance(node.args[0], ast.Constant) \
                            or not isinstance(node.args[0].value, str):
                        raise SystemExit(f"{path}:{node.lineno}: ffigen.load needs a literal name and the "
                                         "declarations as its two arguments")
                    found.append((module, node.args[0].value, node.args[1], node.lineno))
    return found


def bindings(package_dir: str = paths.PACKAGE) -> set[tuple[str, str]]:
    """(name, declarations) of every binding the package's ffigen.load calls make."""
    calls = ffigen_calls(package_dir)
    for module in sorted({c[0] for c in calls}):
        importlib.import_module(module)
    out = set(ffigen.declared)           # what importing loaded (module-level calls, whatever their arguments)
    for module, name, expr, line in calls:
        try:
            cdef = eval(compile(ast.Expression(expr), module, "eval"), vars(sys.modules[module]))  # our own source
        except Exception as e:
            if any(n == name for n, _ in out):
                continue                 # a module-level call: what it loaded is recorded above
            raise SystemExit(f"{module} line {line}: cannot find the declarations of binding {name!r} without "
                             f"running the program ({type(e).__name__}: {e}); make them a module-level constant "
                             "so the wheel can ship the binding prebuilt") from None
        out.add((name, cdef))
    return out


def build(outdir: str, package_dir: str = paths.PACKAGE) -> list[str]:
    """Write every binding's module into outdir; the paths written."""
    os.makedirs(outdir, exist_ok=True)
    return [ffigen.generate(name, cdef, outdir) for name, cdef in sorted(bindings(package_dir))]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m pykvm.startup.prebuild OUTDIR")
    for p in build(sys.argv[1]):
        print(p)
