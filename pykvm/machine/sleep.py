"""ACPI S3 for one machine: the sleeping vCPU waits for a wake event, then restarts in real mode at the FACS waking vector."""

from __future__ import annotations

import struct

from .. import errors
from ..boot import cpu as cpu_setup
from .outcome import Outcome

FACS_WAKING_VECTOR = 12          # 32-bit firmware waking vector (real-mode CS:IP = vector >> 4 : vector & 0xf)
POLL = 0.05                      # seconds between checks for a stop or a pause request while asleep


def facs_address(machine) -> int | None:
    """Where the FACS the guest was given lies, or None without ACPI tables."""
    tables = getattr(machine.plan, "acpi", None)
    if tables is None:
        return None
    return next((addr for addr, sig, _data in tables.tables if sig == b"FACS"), None)


def sleep_and_resume(machine, vcpu, ev) -> None:
    """Block this vCPU until `ev.wake` fires (or the VM stops), then jump to the guest's waking vector."""
    m = machine
    while not m.stopping and not ev.wake.wait(POLL):
        if m.pauser.pausing:
            m.pauser.park(vcpu)
    if m.stopping:
        return
    facs = facs_address(m)
    vector = struct.unpack("<I", m.memory.read(facs + FACS_WAKING_VECTOR, 4))[0] if facs is not None else 0
    if vector == 0 or vector >= 0x100000:
        m.finish(Outcome(errors.EXIT_OK, "poweroff", f"guest woke from S3 with no usable waking vector ({vector:#x}); "
                         "stopped", vcpu=vcpu.index))
        return
    cpu_setup.real_mode_reset(vcpu, vector)
