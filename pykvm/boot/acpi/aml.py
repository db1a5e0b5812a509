"""Just enough AML to write a DSDT by hand: names bound to integers and packages of integers."""

from __future__ import annotations

import struct

from .sdt import sdt
from .topology import Platform

DSDT_REVISION = 2            # 2: integers are 64-bit

NAME_OP = 0x08
PACKAGE_OP = 0x12
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E
# A name segment is [A-Z_][A-Z0-9_]{3} (ACPI 6.5, 20.2.2); checked without `re`, which a run does not load
_LEAD_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_SEG_CHARS = _LEAD_CHARS + b"0123456789"
MAX_PKG_LENGTH = (1 << 28) - 1

# Sleep types written to PM1_CNT.SLP_TYP: QEMU's values, which pykvm's PM1a control port follows
SLP_TYP_S3 = 1
SLP_TYP_S5 = 0


def pkg_length(body_len: int) -> bytes:
    """The PkgLength encoding of a package whose contents (after the PkgLength) are body_len bytes."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def integer(value: int) -> bytes:
    """The shortest AML encoding of an unsigned integer."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if 0 <= value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value} is out of range")


def package(values: list[int]) -> bytes:
    """Package(n) { integers }."""
    if len(values) > 255:
        raise ValueError("AML package with more than 255 elements")
    body = bytes([len(values)]) + b"".join(integer(v) for v in values)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def is_name_seg(seg: bytes) -> bool:
    """Whether seg is a four-character AML name segment ([A-Z_][A-Z0-9_]{3})."""
    return len(seg) == 4 and seg[0] in _LEAD_CHARS and not bytes(seg).translate(None, _SEG_CHARS)


def name(seg: bytes, value: bytes) -> bytes:
    """Name(SEG, value) for a four-character name segment."""
    if not is_name_seg(seg):
        raise ValueError(f"bad AML name segment {seg!r}")
    return bytes([NAME_OP]) + seg + value


def dsdt(p: Platform) -> bytes:
    """A DSDT declaring the sleep states the platform supports: \\_S5 always, \\_S3 when asked."""
    aml = b""
    if p.s3:
        aml += name(b"_S3_", package([SLP_TYP_S3, SLP_TYP_S3, 0, 0]))
    aml += name(b"_S5_", package([SLP_TYP_S5, SLP_TYP_S5, 0, 0]))
    return sdt(b"DSDT", DSDT_REVISION, aml)
