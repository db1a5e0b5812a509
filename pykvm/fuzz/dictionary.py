"""Dictionary tokens a guest kernel declares for the fuzzer, handed to afl-fuzz as AFL++'s autodictionary.

A guest lists the strings its parser compares input against (keywords, magic values) in the ELF
section .pykvm_fuzz_dict (guests/runtime/rt.h: FUZZ_TOKEN): records of one length byte (1 to
PYKVM_FUZZ_TOKEN_MAX) and that many bytes, with zero bytes between records taken as padding. A
fuzzer that must guess such a string byte by byte finds it only by chance, however much
coverage guides it; with the token in its dictionary AFL++ inserts it whole.

The section comes from the kernel file, so it is checked like any input: at most
PYKVM_FUZZ_TOKENS_MAX records, each inside the section; anything else is a bad image.
"""

from __future__ import annotations

import struct

from .. import abi
from ..errors import BadImageError

SECTION = ".pykvm_fuzz_dict"
MAX_TOKEN = abi.PYKVM_FUZZ_TOKEN_MAX
MAX_TOKENS = abi.PYKVM_FUZZ_TOKENS_MAX
MAX_SECTION = MAX_TOKENS * (1 + MAX_TOKEN) * 2      # records, and as much padding again
_LEN = struct.Struct("<I")


class DictionaryError(BadImageError):
    """The kernel's .pykvm_fuzz_dict section is malformed."""


def parse(raw: bytes) -> list[bytes]:
    """The tokens of a .pykvm_fuzz_dict section's bytes, in order, duplicates dropped."""
    if len(raw) > MAX_SECTION:
        raise DictionaryError(f"{SECTION} is {len(raw)} bytes; at most {MAX_SECTION}")
    tokens: list[bytes] = []
    seen = set()
    at = 0
    while at < len(raw):
        n = raw[at]
        if n == 0:                       # padding between records
            at += 1
            continue
        if n > MAX_TOKEN:
            raise DictionaryError(f"{SECTION}: the record at offset {at} says {n} bytes; at most {MAX_TOKEN}")
        if at + 1 + n > len(raw):
            raise DictionaryError(f"{SECTION}: the record at offset {at} ({n} bytes) runs past the section's end")
        token = bytes(raw[at + 1:at + 1 + n])
        at += 1 + n
        if token in seen:
            continue
        if len(tokens) == MAX_TOKENS:
            raise DictionaryError(f"{SECTION} holds more than {MAX_TOKENS} tokens")
        seen.add(token)
        tokens.append(token)
    return tokens


def read(path) -> list[bytes]:
    """The tokens a kernel file declares ([] for a file with no such section, or not ELF)."""
    from ..boot import elf

    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise DictionaryError(f"{path}: {e.strerror}") from None
    if not elf.is_elf(blob):
        return []
    try:
        raw = elf.section(blob, SECTION)
    except (elf.ElfError, struct.error) as e:
        raise DictionaryError(f"{path}: {e}") from None
    return [] if raw is None else parse(raw)


def wire(tokens: list[bytes]) -> bytes:
    """The autodictionary as the forkserver sends it: its length (32-bit), then [length byte][bytes] records."""
    body = b"".join(bytes((len(t),)) + t for t in tokens)
    return _LEN.pack(len(body)) + body
