"""Imports after the sandbox: modules read into memory during set-up, executed only when first imported.

Once the seccomp filter is installed the VMM cannot open files, so a module that a rare
path needs later (a crash core, a state save, a traceback) must be in hand before. Importing
all of them up front would make every run pay for paths it almost never takes. Instead
hold() reads each one's bytecode (or, without a valid cache, its source) into memory, which
costs a read, and serve() puts a finder in front of the path-based ones that executes a held
module on its first import. A module nobody imports is never executed.

After serve() this process imports only modules already loaded, built-in or frozen ones, and
held ones: anything else is refused at once with a ModuleNotFoundError that names the module
and this mechanism (a pykvm bug: it belongs in the caller's list). Extension modules are
imported by hold() itself, since loading one opens a file; pure-Python dependencies of a held
module must be listed too (tests/test_lateimport.py checks the sandbox's lists).

What is read is our own installed files, but it is still checked: a cached bytecode file whose
header does not match this interpreter and its source is not used (the source is held
instead), and one that is damaged beyond its header fails its import with an ImportError
naming the file, never anything worse.
"""

from __future__ import annotations

import marshal
import os
import sys
from importlib.machinery import ModuleSpec, SourceFileLoader, SourcelessFileLoader
try:    # what importlib.util.MAGIC_NUMBER re-exports, without importing importlib.util (and contextlib) every run
    from _frozen_importlib_external import MAGIC_NUMBER
except ImportError:
    from importlib.util import MAGIC_NUMBER
from types import CodeType

_HEADER = 16                  # magic, flags, then mtime and source size (or a source hash)
_U32 = 0xFFFFFFFF


class _Held:
    """One module in memory: what to execute and where it came from."""

    __slots__ = ("origin", "cached", "package_path", "data", "is_bytecode")

    def __init__(self, origin, cached, package_path, data, is_bytecode):
        self.origin = origin
        self.cached = cached
        self.package_path = package_path     # a package's __path__, None for a plain module
        self.data = data
        self.is_bytecode = is_bytecode


class _MemoryFinder:
    """Finds held modules and refuses every other module that would need a file."""

    def __init__(self):
        self.held: dict[str, _Held] = {}

    def find_spec(self, name, path=None, target=None):
        """A spec for a held module; ModuleNotFoundError for anything a later finder would look for on disk."""
        held = self.held.get(name)
        if held is None:
            raise ModuleNotFoundError(f"No module named {name!r}: pykvm did not read it before its sandbox was "
                                      "installed (a pykvm bug: add it to the late modules in pykvm/sandbox.py)",
                                      name=name)
        spec = ModuleSpec(name, self, origin=held.origin, is_package=held.package_path is not None)
        if held.package_path is not None:
            spec.submodule_search_locations = list(held.package_path)
        spec.cached = held.cached
        spec.has_location = True
        return spec

    def create_module(self, spec):
        """The default module object."""
        return None

    def exec_module(self, module):
        """Run the held code in the module's namespace."""
        name = module.__spec__.name
        held = self.held[name]
        exec(_code(name, held), module.__dict__)


_finder = _MemoryFinder()


def hold(names) -> None:
    """Read every named module not yet loaded (and its unloaded parent packages) into memory; import extensions now."""
    for name in names:
        _hold(name)


def serve() -> None:
    """From now on import held modules from memory and refuse any other that is not loaded, built in or frozen."""
    if _finder in sys.meta_path:
        return
    from importlib.machinery import PathFinder

    at = next((i for i, f in enumerate(sys.meta_path) if f is PathFinder), len(sys.meta_path))
    sys.meta_path.insert(at, _finder)


def held() -> frozenset:
    """Names of the modules held in memory (for tests and diagnostics)."""
    return frozenset(_finder.held)


def _hold(name: str) -> None:
    if name in sys.modules or name in _finder.held:
        return
    parent, _, _ = name.rpartition(".")
    search = None
    if parent:
        _hold(parent)
        search = _package_path(parent)
        if search is None:
            raise ImportError(f"cannot hold {name}: {parent} is not a package", name=name)
    spec = _find(name, search)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = spec.loader
    if spec.origin in ("built-in", "frozen"):
        return                              # importable later without a file
    if isinstance(loader, SourceFileLoader):
        data, is_bytecode = _read_source_module(spec.origin, spec.cached)
    elif isinstance(loader, SourcelessFileLoader):
        data, is_bytecode = _read_bytecode(spec.origin, None), True
        if data is None:
            raise ImportError(f"cannot hold {name}: {spec.origin} is not bytecode for this Python", name=name)
    else:
        # an extension module (loading it opens the file), a namespace package or an unusual loader
        __import__(name)
        return
    _finder.held[name] = _Held(spec.origin, spec.cached, spec.submodule_search_locations, data, is_bytecode)


def _package_path(name: str):
    mod = sys.modules.get(name)
    if mod is not None:
        return getattr(mod, "__path__", None)
    held = _finder.held.get(name)
    return held.package_path if held is not None else None


def _find(name: str, search):
    for finder in sys.meta_path:
        if finder is _finder:
            continue
        find = getattr(finder, "find_spec", None)
        spec = find(name, search) if find is not None else None
        if spec is not None:
            return spec
    return None


def _read_source_module(origin: str, cached: str | None) -> tuple[bytes, bool]:
    """(data, is_bytecode): the cached bytecode when its header matches the source, else the source."""
    st = os.stat(origin)
    if cached is not None:
        data = _read_bytecode(cached, st)
        if data is not None:
            return data, True
    with open(origin, "rb") as f:
        return f.read(), False


def _read_bytecode(path: str, source_stat) -> bytes | None:
    """The marshalled code in a .pyc file after checking its header; None when it is absent or does not match."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) <= _HEADER or data[:4] != MAGIC_NUMBER:
        return None
    flags = int.from_bytes(data[4:8], "little")
    if flags not in (0, 1, 3):
        return None
    if source_stat is not None:
        if flags == 3:                   # hash-based and checked: the source would have to be hashed; use it
            return None
        if flags == 0 and (int.from_bytes(data[8:12], "little") != int(source_stat.st_mtime) & _U32
                           or int.from_bytes(data[12:16], "little") != source_stat.st_size & _U32):
            return None                  # stale: the source changed since it was compiled
    return data[_HEADER:]


def _code(name: str, held: _Held):
    """The module's code object; ImportError naming the file when what was read cannot be used."""
    if held.is_bytecode:
        try:
            code = marshal.loads(held.data)
        except (ValueError, EOFError, TypeError) as e:
            raise ImportError(f"cannot import {name}: its bytecode {held.cached or held.origin} is damaged ({e})",
                              name=name) from None
        if not isinstance(code, CodeType):
            raise ImportError(f"cannot import {name}: {held.cached or held.origin} holds no module code", name=name)
        return code
    try:
        return compile(held.data, held.origin, "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        raise ImportError(f"cannot import {name}: {held.origin} does not compile ({e})", name=name) from None
