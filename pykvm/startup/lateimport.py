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
imported by hold() itself, since loading one opens a file.

What a held module imports when it runs is held with it: hold() reads the import statements
its module body (and class bodies) execute from its bytecode, and holds each of those that is
not loaded, recursively. So the held set does not depend on what this interpreter happened to
import before (site's .pth files import collections.abc, say, in one environment and not in
another). Imports made inside functions are not followed: the caller names the modules its
late paths import that way (tests/test_lateimport.py runs them from `python -S`). Conditional
imports are followed too; one that cannot be found is skipped (its ImportError comes later,
where the module expects it).

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

    __slots__ = ("origin", "cached", "package_path", "data", "is_bytecode", "code")

    def __init__(self, origin, cached, package_path, data, is_bytecode):
        self.origin = origin
        self.cached = cached
        self.package_path = package_path     # a package's __path__, None for a plain module
        self.data = data
        self.is_bytecode = is_bytecode
        self.code = None                     # once read for its imports, kept: it is not unmarshalled twice


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
        exec(held.code if held.code is not None else _code(name, held), module.__dict__)


_finder = _MemoryFinder()


def hold(names) -> None:
    """Read every named module not yet loaded (and its unloaded parent packages and what their bodies import) into
    memory; import extensions now."""
    todo = []
    for name in names:
        _hold(name, todo)
    while todo:                   # what the held modules import when they run
        name = todo.pop()
        try:
            _hold(name, todo)
        except ImportError:
            pass                  # absent here (an optional accelerator, another platform's module)


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


def _hold(name: str, todo: list) -> None:
    if name in sys.modules or name in _finder.held:
        return
    parent, _, _ = name.rpartition(".")
    search = None
    if parent:
        _hold(parent, todo)
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
    held = _Held(spec.origin, spec.cached, spec.submodule_search_locations, data, is_bytecode)
    _finder.held[name] = held
    try:
        held.code = _code(name, held)
    except ImportError:
        return                              # fails when imported, with this message
    held.data = None
    package = name if held.package_path is not None else parent
    todo.extend(imported_by(held.code, package))


def imported_by(code, package: str):
    """Absolute names of the modules a module body imports (with `package`, its package, for relative ones).

    Follows the body and class bodies (they run at import); not functions, whose imports run only when called.
    `from m import n` yields m.n too: n may be a submodule (one that is not fails to be found, and is skipped).
    """
    from opcode import EXTENDED_ARG, opmap

    import_name, load_const = opmap["IMPORT_NAME"], opmap["LOAD_CONST"]
    load_small_int = opmap.get("LOAD_SMALL_INT")      # 3.14: the level of `import` is a small int
    cache = opmap.get("CACHE", -1)
    marker = bytes([import_name])
    stack = [code]
    while stack:
        co = stack.pop()
        stack.extend(c for c in co.co_consts if isinstance(c, CodeType) and not c.co_flags & _CO_NEWLOCALS)
        raw = co.co_code
        at = raw.find(marker)
        while at >= 0:
            if at % 2 == 0:     # an opcode, not an argument byte
                arg, first = _arg(raw, at, EXTENDED_ARG)
                fop, farg, first = _before(raw, first, cache, EXTENDED_ARG)
                lop, larg, _ = _before(raw, first, cache, EXTENDED_ARG)
                level = co.co_consts[larg] if lop == load_const else larg if lop == load_small_int else None
                fromlist = co.co_consts[farg] if fop == load_const else None
                base = _resolve(co.co_names[arg], package, level) if isinstance(level, int) else None
                if base is not None:
                    if base:
                        yield base
                    for sub in fromlist if isinstance(fromlist, tuple) else ():
                        if sub != "*":
                            yield f"{base}.{sub}" if base else sub
            at = raw.find(marker, at + 1)


def _arg(raw: bytes, at: int, extended: int) -> tuple[int, int]:
    """(argument, offset of the first EXTENDED_ARG prefix or of the instruction) of the instruction at `at`."""
    arg, shift, first = raw[at + 1], 8, at
    while first >= 2 and raw[first - 2] == extended:
        first -= 2
        arg |= raw[first + 1] << shift
        shift += 8
    return arg, first


def _before(raw: bytes, end: int, cache: int, extended: int) -> tuple[int, int, int]:
    """(opcode, argument, start) of the instruction ending at `end`, past its inline caches; (-1, 0, 0) at the start."""
    at = end - 2
    while at >= 0 and raw[at] == cache:
        at -= 2
    if at < 0:
        return -1, 0, 0
    arg, first = _arg(raw, at, extended)
    return raw[at], arg, first


_CO_NEWLOCALS = 0x2            # a function's code (class bodies and module bodies lack it)


def _resolve(name: str, package: str, level: int) -> str | None:
    """importlib's name resolution: the absolute module name, or None when it climbs above the top package."""
    if level == 0:
        return name
    parts = package.split(".") if package else []
    if level - 1 > len(parts) - 1 or not parts:
        return None
    base = ".".join(parts[:len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


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
