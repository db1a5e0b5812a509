"""The guest ABI, read from guests/include/pykvm_abi.h so VMM and guests share one source of truth.

Every `#define PYKVM_*` in the header becomes an attribute of this module and
the structs are available through `ffi` (e.g. ffi.sizeof("struct pykvm_boot_info")).
The header is parsed once per content (ffigen caches the parsed types), not per run.
"""

from __future__ import annotations

from .startup import ffigen
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
    return ffi, {n: getattr(lib, n) for n in define_names(text) if not n.endswith("_H")}


def define_names(text: str) -> list[str]:
    """The names re.findall(r"^\\s*#\\s*define\\s+(PYKVM_\\w+)\\s+\\S", text, re.M) gives, without `re`."""
    # Every run reads the header, and `re` costs ~1.4 ms to import. This is that pattern's scan,
    # step by step (tests/test_header_scan.py holds it to the pattern): each match starts
    # at a '#' with only whitespace before it on its line, and the next starts after the match's
    # last character (the value's first, which may be lines further on).
    names = []
    pos, end = 0, len(text)
    while (hash_at := text.find("#", pos)) >= 0:
        pos = hash_at + 1
        if hash_at and text[hash_at - 1] != "\n":
            line_start = text.rfind("\n", 0, hash_at) + 1
            if not text[line_start:hash_at].isspace():
                continue
        i = pos if text.startswith("define", pos) else _skip_space(text, pos)
        if not text.startswith("define", i) or not text[i + 6:i + 7].isspace():
            continue
        i = i + 7 if text.startswith("P", i + 7) else _skip_space(text, i + 6)
        if not text.startswith("PYKVM_", i):
            continue
        line_end = text.find("\n", i)
        name = text[i:end if line_end < 0 else line_end].split(None, 1)[0]
        j = i + len(name)                                  # the first whitespace after the name, if any
        if j == end or len(name) == 6 or not name[6:].replace("_", "a").isalnum():
            continue
        value_at = j + 1 if j + 1 < end and not text[j + 1].isspace() else _skip_space(text, j)
        if value_at == end:
            break
        names.append(name)
        pos = value_at + 1
    return names


def _skip_space(text: str, i: int) -> int:
    end = len(text)
    while i < end and text[i].isspace():
        i += 1
    return i


ffi, constants = _load()
globals().update(constants)
