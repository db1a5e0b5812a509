"""cffi type tables compiled once from C declarations, so no run parses C.

cffi's out-of-line ABI mode turns declarations into a small Python module holding the
already-parsed types; importing it needs only _cffi_backend, not pycparser. The module
is named by a hash of the declarations and of cffi's major version, so an edited header
or a new cffi simply selects a new module. Such a module is code, so it is loaded only from
where pykvm's own code comes from (startup/generated.py): a wheel ships every binding
prebuilt (startup/prebuild.py finds each ffigen.load call in the package); a source tree
generates them into its build/generated on first use; never the cache. An installed
package lacking one (a cffi of another major version) parses the declarations in memory.
"""

from __future__ import annotations

import os
import sys

import _cffi_backend

from . import digest, generated, safedir

declared: set[tuple[str, str]] = set()   # (name, declarations) of every binding this process loaded: prebuild.py
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
    tmp = os.path.join(outdir, f".{mod}.{os.getpid()}.tmp")
    make_py_source(ffi, mod, tmp)
    final = os.path.join(outdir, f"{mod}.py")
    os.replace(tmp, final)  # atomic: a concurrent run sees the whole module or none
    return final


def load(name: str, cdef: str):
    """The FFI for these declarations: shipped prebuilt, generated in the source tree, or parsed now."""
    declared.add((name, cdef))
    mod = module_name(name, cdef)
    if mod in sys.modules:
        return sys.modules[mod].ffi
    path = generated.find("ffi", mod)
    if path is None and generated.writable() is not None:
        try:
            path = generate(name, cdef, safedir.subdir(generated.writable(), "ffi", "generated-code directory"))
            _prune(os.path.dirname(path), name, mod)
        except OSError:   # a read-only tree costs speed, not correctness
            path = None
    if path is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(cdef)
        return ffi
    return generated.load(mod, path).ffi


def _prune(directory: str, name: str, keep: str) -> None:
    """Remove the modules earlier declarations of `name` generated (a source tree keeps only the current one)."""
    prefix = f"_pykvm_{name}_"
    for entry in os.listdir(directory):
        stem = entry[:-3]
        if entry.endswith(".py") and stem.startswith(prefix) and stem != keep and len(stem) == len(keep):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass
