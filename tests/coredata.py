"""Small synthetic pykvm cores, built byte by byte, for tests that feed `inspect` hostile input."""

from __future__ import annotations

import json
import struct

from pykvm.crash import notes as N
from pykvm.crash.x86 import seg_flags

LOAD_ADDR = 0x100000
PAGE = 4096


def info_doc(**overrides) -> dict:
    """A pykvm note like core.py writes for one long-mode vCPU and one RAM page, with overrides."""
    doc = {
        "format": 1, "trigger": "exception", "reason": "unhandled #UD", "vector": 6, "vector_name": "#UD",
        "error_code": 0, "exit_reason": "io", "crashing_vcpu": 0, "signal": 4, "serial_tail": "hi\n",
        "config": {"mem": 1 << 20}, "pykvm_version": "0", "created": "now",
        "vcpus": [{"index": 0, "mode": "long", "efer": 0x500, "cr8": 0, "apic_base": 0xFEE00900, "fpu": False}],
        "prstatus_order": [0], "qemu_note_order": [0],
        "memory": {"regions": [{"gpa": LOAD_ADDR, "size": PAGE, "name": "ram", "node": 0, "phdr": 1}]},
        "address_spaces": [{"vcpus": [0], "phdr_first": 2, "phdr_count": 0}],
        "dropped_segments": 0,
    }
    doc.update(overrides)
    return doc


def core_bytes(doc=None, *, pykvm_note: bytes | None = None, extra_notes: bytes = b"",
               code: bytes = b"\x0f\x0b" + b"\x90" * 30) -> bytes:
    """ELF header, PT_NOTE and one PT_LOAD page holding `code` at LOAD_ADDR, where RIP points."""
    if pykvm_note is None:
        pykvm_note = N.note(N.NAME_PYKVM, N.NT_PYKVM, json.dumps(info_doc() if doc is None else doc).encode())
    regs = {"rip": LOAD_ADDR, "rsp": LOAD_ADDR + PAGE - 64, "rbp": 0, "eflags": 2, "cs": 8, "ss": 16}
    cs = seg_flags({"type": 0xB, "s": 1, "present": 1, "l": 1, "g": 1})
    qemu = N.pack_qemu_cpustate(dict(regs, rflags=2), {"cs": (8, 0xFFFFFFFF, cs, 0)},
                                (0x80000011, 0, 0, 0, 0x20))   # long mode: PE|ET|PG, PAE
    notes = (N.note(N.NAME_CORE, N.NT_PRSTATUS, N.pack_prstatus(1, 4, regs, False))
             + N.note(N.NAME_QEMU, N.NT_QEMU, qemu) + extra_notes + pykvm_note)
    phoff, nph = 64, 2
    notes_off = phoff + 56 * nph
    load_off = (notes_off + len(notes) + PAGE - 1) // PAGE * PAGE
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, 56, nph, 0, 0, 0)
    phdrs = (struct.pack("<IIQQQQQQ", 4, 0, notes_off, 0, 0, len(notes), 0, 4)
             + struct.pack("<IIQQQQQQ", 1, 7, load_off, LOAD_ADDR, LOAD_ADDR, PAGE, PAGE, PAGE))
    head = ehdr + phdrs + notes
    page = code + bytes(PAGE - len(code))
    return head + bytes(load_off - len(head)) + page
