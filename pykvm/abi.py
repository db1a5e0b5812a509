"""The guest ABI, read from guests/include/pykvm_abi.h so VMM and guests share one source of truth.

Every `#define PYKVM_*` in the header becomes an attribute of this module and
the structs are available through `ffi` (e.g. ffi.sizeof("struct pykvm_boot_info")).
The header is parsed once per content (ffigen caches the parsed types), not per run.
"""

from __future__ import annotations

import re

from . import ffigen
from .paths import ABI_HEADER


def _load():
    try:
        with open(ABI_HEADER) as f:   # paths are str: a run never imports pathlib
            text = f.read()
    except OSError as e:
        raise RuntimeError(f"cannot read the guest ABI header {ABI_HEADER}: {e.strerror}; "
                           "reinstall pykvm (the header ships inside the package)") from e
    ffi = ffigen.load("abi", ffigen.header_cdef(text))
    lib = ffi.dlopen(None)
    names = re.findall(r"^\s*#\s*define\s+(PYKVM_\w+)\s+\S", text, re.M)
    return ffi, {n: getattr(lib, n) for n in names if not n.endswith("_H")}


ffi, constants = _load()
globals().update(constants)
