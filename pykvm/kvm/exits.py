"""kvm_run's exit fields as struct layouts, derived from the cffi offsets of linux/kvm.h.

The vCPU loop reads the shared kvm_run page with struct.unpack_from (no cffi attribute walk,
no allocation but the result tuple) on every exit; the layouts here put each field at the
offset the kernel header gives it (RUN_OFFSETS), with padding computed between fields, so no
loop carries a literal offset. A field whose size disagrees with its format code fails at import.
"""

from __future__ import annotations

import struct

from .abi import ffi
from .vcpu import RUN_OFFSETS


def _field_size(path: str) -> int:
    t = ffi.typeof("struct kvm_run")
    for name in path.split("."):
        t = dict(t.fields)[name].type
    return ffi.sizeof(t)


def layout(*fields: tuple[str, str]) -> tuple[int, struct.Struct]:
    """(offset of the first field, a little-endian Struct reading `fields` ((path, code), ...) in offset order)."""
    start = at = RUN_OFFSETS[fields[0][0]]
    fmt = "<"
    for path, code in fields:
        off = RUN_OFFSETS[path]
        size = struct.calcsize("<" + code)
        if off < at or size != _field_size(path):
            raise ImportError(f"kvm_run.{path}: at {off} with {_field_size(path)} bytes, not a {code!r} after {at}")
        fmt += f"{off - at}x{code}" if off > at else code
        at = off + size
    return start, struct.Struct(fmt)


# the exit reason and the port I/O fields in one read: the hot loop's only decode per exit
EXIT_AT, EXIT_IO = layout(("exit_reason", "I"), ("io.direction", "B"), ("io.size", "B"), ("io.port", "H"),
                          ("io.count", "I"), ("io.data_offset", "Q"))
IO_AT, IO = layout(("io.direction", "B"), ("io.size", "B"), ("io.port", "H"), ("io.count", "I"),
                   ("io.data_offset", "Q"))
MMIO_AT, MMIO = layout(("mmio.phys_addr", "Q"), ("mmio.data", "8s"), ("mmio.len", "I"), ("mmio.is_write", "B"))
MMIO_DATA = RUN_OFFSETS["mmio.data"]          # where a read's answer goes: 8 bytes
