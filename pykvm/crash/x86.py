"""x86 facts the core writer and the inspector share: vectors, signals, segment flags, CPU modes."""

from __future__ import annotations

import signal

from ..boot.trapframe import EXCEPTIONS, exception_name
from ..memory.pagewalk import CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, EFER_LMA

# One table of exception names for the whole VMM; it lives with the firmware trap frames.
VECTORS = EXCEPTIONS

# What Linux would deliver to a process for the same fault; gdb prints it.
_VECTOR_SIGNALS = {
    0: signal.SIGFPE, 16: signal.SIGFPE, 19: signal.SIGFPE,
    6: signal.SIGILL,
    1: signal.SIGTRAP, 3: signal.SIGTRAP,
    17: signal.SIGBUS, 18: signal.SIGBUS,
}
# Deaths without an exception vector.
_TRIGGER_SIGNALS = {
    "pvpanic": signal.SIGABRT,
    "system-event-crash": signal.SIGABRT,
    "timeout": signal.SIGALRM,
    "watchdog": signal.SIGALRM,
    "host-request": signal.SIGQUIT,
}

# QEMU SegmentCache.flags: the attribute bits of a descriptor's high dword.
_SEG_FIELDS = (("type", 8, 0xF), ("s", 12, 1), ("dpl", 13, 3), ("present", 15, 1),
               ("avl", 20, 1), ("l", 21, 1), ("db", 22, 1), ("g", 23, 1))

PF_ERROR_BITS = ((0, "present", "not-present"), (1, "write", "read"), (2, "user", "supervisor"),
                 (3, "reserved-bit", None), (4, "instruction-fetch", None),
                 (5, "protection-key", None), (6, "shadow-stack", None), (15, "sgx", None))

RFLAGS_IF = 1 << 9
RFLAGS_VM = 1 << 17


def vector_name(vector: int | None) -> str | None:
    """'#PF page fault' style name, or None."""
    return None if vector is None else exception_name(vector)


def signal_for(trigger: str, vector: int | None) -> int:
    """The signal number recorded as pr_cursig for the crashing vCPU."""
    if trigger == "exception" and vector is not None:
        return int(_VECTOR_SIGNALS.get(vector, signal.SIGSEGV))
    return int(_TRIGGER_SIGNALS.get(trigger, signal.SIGSEGV))


def pf_error_text(code: int) -> str:
    """Decode a #PF error code into words."""
    words = []
    for bit, on, off in PF_ERROR_BITS:
        if code >> bit & 1:
            words.append(on)
        elif off:
            words.append(off)
    return ", ".join(words)


def seg_flags(seg: dict) -> int:
    """Pack a KVM segment dict's attributes into QEMU's flags word."""
    flags = 0
    for key, shift, mask in _SEG_FIELDS:
        flags |= (int(seg.get(key, 0)) & mask) << shift
    return flags


def seg_attrs(flags: int) -> dict:
    """Unpack QEMU's flags word into segment attribute fields."""
    return {key: (flags >> shift) & mask for key, shift, mask in _SEG_FIELDS}


def cpu_mode(cr0: int, cr4: int, efer: int, rflags: int, cs_l: int, cs_db: int) -> dict:
    """Decode the execution mode: name, code bitness, paging, PAE, interrupts."""
    if not cr0 & CR0_PE:
        name, bits = "real", 16
    elif efer & EFER_LMA:
        name, bits = ("long", 64) if cs_l else ("compatibility", 32 if cs_db else 16)
    elif rflags & RFLAGS_VM:
        name, bits = "virtual-8086", 16
    else:
        name, bits = "protected", 32 if cs_db else 16
    paging = bool(cr0 & CR0_PG and cr0 & CR0_PE)
    if not paging:
        levels = 0
    elif efer & EFER_LMA:
        levels = 5 if cr4 & CR4_LA57 else 4
    else:
        levels = 3 if cr4 & CR4_PAE else 2
    return {
        "name": name,
        "bits": bits,
        "paging": paging,
        "paging_levels": levels,
        "pae": bool(cr4 & CR4_PAE),
        "interrupts": bool(rflags & RFLAGS_IF),
    }
