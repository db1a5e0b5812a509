"""The guest ABI, read from guests/include/pykvm_abi.h so VMM and guests share one source of truth.

Every `#define PYKVM_*` in the header becomes an attribute of this module and
the structs are available through `ffi` (e.g. ffi.sizeof("struct pykvm_boot_info")).
"""

from __future__ import annotations

import re

import cffi

from .paths import ABI_HEADER

_DIRECTIVE = re.compile(r"^\s*#\s*(if|ifdef|ifndef|else|elif|endif|include|error|pragma)\b")
_GUARD = re.compile(r"^\s*#\s*define\s+\w+_H\s*$")


def _cdef_source(text: str) -> str:
    """Drop preprocessor lines cffi cannot parse (guards, includes, conditionals)."""
    return "\n".join("" if _DIRECTIVE.match(line) or _GUARD.match(line) else line for line in text.splitlines())


def _load():
    try:
        text = ABI_HEADER.read_text()
    except OSError as e:
        raise RuntimeError(f"cannot read the guest ABI header {ABI_HEADER}: {e.strerror}; "
                           "pykvm must run from its source tree (pip install -e .)") from e
    ffi = cffi.FFI()
    ffi.cdef(_cdef_source(text))
    lib = ffi.dlopen(None)
    names = re.findall(r"^\s*#\s*define\s+(PYKVM_\w+)\s+\S", text, re.M)
    return ffi, {n: getattr(lib, n) for n in names if not n.endswith("_H")}


ffi, constants = _load()
globals().update(constants)
