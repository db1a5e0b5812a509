"""Python modules generated from pykvm's own declarations (cffi types, device description data): where they live, how they load.

Importing such a module runs it, so it may come only from where pykvm's code itself comes
from. An installed package ships them prebuilt under pykvm/_data/prebuilt (setup.py runs
startup/prebuild.py) and never writes or reads any elsewhere: a module it lacks is
rebuilt in memory on every run instead. A source tree generates them on first use into its
own build/generated directory, next to the code they are derived from, checked like the
cache (startup/safedir.py: no other user can write it). The cache directory, which holds
only guest and firmware builds, is never a place code is loaded from.
"""

from __future__ import annotations

import os
import sys

from .. import paths
from . import safedir

TREE_DIR = os.path.join(paths.SOURCE_ROOT, "build", "generated")   # in a source tree only
_where: list = []


def directory() -> str | None:
    """The directory generated modules are read from: the wheel's prebuilt one, or the tree's (made and checked); None if neither can be had."""
    if paths.INSTALLED:
        return paths.PREBUILT
    if not _where:
        # the tree's owner may differ from the user running it (who then trusts that owner's code anyway)
        owner = os.stat(paths.PACKAGE).st_uid
        _where.append(safedir.ensure(TREE_DIR, "generated-code directory", owners=(owner,), optional=True))
    return _where[0]


def writable() -> str | None:
    """Where a module generated now may be written: the tree's directory, never an installed package's."""
    return None if paths.INSTALLED else directory()


def find(subdir: str, module: str) -> str | None:
    """The path of generated module `module` in `subdir` ("" for the top), or None."""
    top = directory()
    if top is None:
        return None
    if subdir and not paths.INSTALLED:
        if not os.path.lexists(os.path.join(top, subdir)):
            return None
        top = safedir.subdir(top, subdir, "generated-code directory")
        subdir = ""
    path = os.path.join(top, subdir, f"{module}.py")
    return path if os.path.isfile(path) else None


def write(subdir: str, module: str, text: str) -> str:
    """Write a generated module atomically under the writable directory; its path. OSError when there is none."""
    top = writable()
    if top is None:
        raise PermissionError("no writable directory for generated modules")
    out = safedir.subdir(top, subdir, "generated-code directory") if subdir else top
    final = os.path.join(out, f"{module}.py")
    tmp = os.path.join(out, f".{module}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, final)   # atomic: a concurrent run sees the whole module or none
    return final


def load(module: str, path: str):
    """Import the generated module at path under the name `module` (once per process)."""
    if module in sys.modules:
        return sys.modules[module]
    # importlib.machinery is loaded with the interpreter; importlib.util (spec_from_file_location)
    # would bring contextlib and importlib._abc to every run for this one call
    from importlib.machinery import ModuleSpec, SourceFileLoader

    loader = SourceFileLoader(module, path)
    spec = ModuleSpec(module, loader, origin=path)
    spec.has_location = True            # so __file__ is set and the bytecode is cached beside it
    mod = type(sys)(module)
    mod.__spec__, mod.__loader__, mod.__file__ = spec, loader, path
    loader.exec_module(mod)
    sys.modules[module] = mod
    return mod
