"""Descriptor tables the firmware area holds at boot: GDT, 64-bit TSS, and the 64/32-bit IDTs."""

from __future__ import annotations

import struct

from .. import abi

IST_VECTORS = (2, 8, 18)  # NMI, #DF, #MC: run on a known-good stack so a stack overflow still reports
GATE_INTERRUPT = 0x8E     # present, DPL 0, interrupt gate (IF cleared on entry)
TSS_SIZE = 0x68


def _segment(base: int, limit: int, access: int, flags: int) -> bytes:
    return struct.pack("<HHBBBB", limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, access,
                       (flags << 4) | ((limit >> 16) & 0xF), (base >> 24) & 0xFF)


def gdt() -> bytes:
    """Null, 64-bit code, flat data, 32-bit code and a 16-byte TSS descriptor, at the ABI's selectors."""
    entries = {
        abi.PYKVM_SEL_CODE64: _segment(0, 0xFFFFF, 0x9B, 0xA),   # G, L
        abi.PYKVM_SEL_DATA: _segment(0, 0xFFFFF, 0x93, 0xC),     # G, D/B
        abi.PYKVM_SEL_CODE32: _segment(0, 0xFFFFF, 0x9B, 0xC),   # G, D/B
    }
    table = bytearray(abi.PYKVM_SEL_TSS + 16)
    for sel, desc in entries.items():
        table[sel:sel + 8] = desc
    tss = abi.PYKVM_TSS_ADDR
    table[abi.PYKVM_SEL_TSS:abi.PYKVM_SEL_TSS + 16] = (
        _segment(tss, TSS_SIZE - 1, 0x89, 0x0) + struct.pack("<II", tss >> 32, 0))
    return bytes(table)


def tss64() -> bytes:
    """A 64-bit TSS whose IST1 points at the firmware's spare stack; no I/O bitmap."""
    t = bytearray(TSS_SIZE)
    struct.pack_into("<Q", t, 0x04, abi.PYKVM_BOOT_STACK_TOP)   # RSP0
    struct.pack_into("<Q", t, 0x24, abi.PYKVM_IST_STACK_TOP)    # IST1
    struct.pack_into("<H", t, 0x66, TSS_SIZE)                   # I/O map base past the limit: none
    return bytes(t)


def idt64(stubs64: int) -> bytes:
    """256 16-byte gates; vectors 0-31 point at the firmware stubs, the rest are not present."""
    out = bytearray(256 * 16)
    for v in range(32):
        off = stubs64 + v * abi.PYKVM_STUB_STRIDE
        ist = 1 if v in IST_VECTORS else 0
        struct.pack_into("<HHBBHII", out, v * 16, off & 0xFFFF, abi.PYKVM_SEL_CODE64, ist,
                         GATE_INTERRUPT, (off >> 16) & 0xFFFF, off >> 32, 0)
    return bytes(out)


def idt32(stubs32: int) -> bytes:
    """256 8-byte gates for protected-mode guests; vectors 0-31 point at the 32-bit stubs."""
    out = bytearray(256 * 8)
    for v in range(32):
        off = stubs32 + v * abi.PYKVM_STUB_STRIDE
        struct.pack_into("<HHBBH", out, v * 8, off & 0xFFFF, abi.PYKVM_SEL_CODE32, 0,
                         GATE_INTERRUPT, off >> 16)
    return bytes(out)
