"""cffi type tables compiled once from C declarations and cached, so no run parses C.

cffi's out-of-line ABI mode turns declarations into a small Python module holding the
already-parsed types; importing it needs only _cffi_backend, not pycparser. The module
is named by a hash of the declarations and of cffi's major version, so an edited header
or a new cffi simply selects a new module. A wheel ships the modules prebuilt (setup.py
calls generate()); a source tree generates them into the cache on first use.
"""

from __future__ import annotations

import os
import sys

import _cffi_backend

from .. import paths
from . import digest

_DIRECTIVES = ("if", "ifdef", "ifndef", "else", "elif", "endif", "include", "error", "pragma")


def header_cdef(text: str) -> str:
    """A C header as cdef text: drop the preprocessor lines cffi cannot parse (guards, includes, conditionals)."""
    return "\n".join("" if _dropped(line) else line for line in text.splitlines())


def _is_word(text: str) -> bool:
    # what a str regex's \w+ matches: letters, digits (Unicode) and '_'
    return text.replace("_", "a").isalnum()


def _dropped(line: str) -> bool:
    # Every run hashes the ABI header's cdef, so this is plain string work, not `re` (~1.4 ms to
    # import). It drops exactly the lines r"\s*#\s*(if|ifdef|ifndef|else|elif|endif|include|error|pragma)\b"
    # or r"\s*#\s*define\s+\w+_H\s*$" match (tests/test_header_scan.py holds it to those patterns).
    stripped = line.lstrip()
    if not stripped.startswith("#"):
        return False
    rest = stripped[1:].lstrip()
    if rest.startswith("define") and rest[6:7].isspace():
        guard = rest[6:].strip()
        return len(guard) > 2 and guard.endswith("_H") and _is_word(guard)
    for word in _DIRECTIVES:
        if rest.startswith(word) and not _is_word(rest[len(word):len(word) + 1]):
            return True
    return False


def module_name(name: str, cdef: str) -> str:
    """Name of the generated module for these declarations (hash of them and of cffi's major version)."""
    # The generated format is stable within a major version (the module carries its own
    # format number, which _cffi_backend checks), so a wheel built with cffi 2.0 serves 2.1.
    major = _cffi_backend.__version__.split(".")[0]
    key = digest.hexdigest(f"{major}\0{cdef}".encode())[:20]
    return f"_pykvm_{name}_{key}"


def generate(name: str, cdef: str, outdir) -> str:
    """Parse the declarations (the one slow step) and write the module into outdir; return its path."""
    import cffi
    from cffi.recompiler import make_py_source

    ffi = cffi.FFI()
    ffi.cdef(cdef)
    mod = module_name(name, cdef)
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    tmp = os.path.join(outdir, f".{mod}.{os.getpid()}.tmp")
    make_py_source(ffi, mod, tmp)
    final = os.path.join(outdir, f"{mod}.py")
    os.replace(tmp, final)  # atomic: a concurrent run sees the whole module or none
    return final


def load(name: str, cdef: str):
    """The FFI for these declarations: shipped prebuilt, cached, or generated now and cached."""
    mod = module_name(name, cdef)
    if mod in sys.modules:
        return sys.modules[mod].ffi
    for where in (os.path.join(paths.PREBUILT, "ffi"), os.path.join(paths.cache_root(), "ffi")):
        path = os.path.join(where, f"{mod}.py")
        if os.path.isfile(path):
            return _import(mod, path).ffi
    try:
        path = generate(name, cdef, os.path.join(paths.cache_root(), "ffi"))
    except OSError:  # an unwritable cache costs speed, not correctness
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(cdef)
        return ffi
    return _import(mod, path).ffi


def _import(mod: str, path: str):
    # importlib.machinery is loaded with the interpreter; importlib.util (spec_from_file_location)
    # would bring contextlib and importlib._abc to every run for this one call
    from importlib.machinery import ModuleSpec, SourceFileLoader

    loader = SourceFileLoader(mod, path)
    spec = ModuleSpec(mod, loader, origin=path)
    spec.has_location = True            # so __file__ is set and the bytecode is cached beside it
    module = type(sys)(mod)
    module.__spec__, module.__loader__, module.__file__ = spec, loader, path
    loader.exec_module(module)
    sys.modules[mod] = module
    return module
