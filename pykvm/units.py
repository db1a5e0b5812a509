"""Sizes as people write them ('128M', '1G'), parsed once for the CLI and the Python API."""

from __future__ import annotations

import re

from .errors import MemorySizeError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.I)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'128M', '1G', '65536K' -> bytes; a bare number means MiB (as QEMU's -m)."""
    m = _SIZE.match(text)
    if not m:
        raise MemorySizeError(f"--mem {text!r}: expected a size like 128M, 1G or 65536K")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]
