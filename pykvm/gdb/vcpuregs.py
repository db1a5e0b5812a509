"""gdb's g/G/p/P packets on a stopped vCPU: KVM's register structures through registers.py's map.

After a crash caught by the firmware stubs, the crashed vCPU shows the faulting instruction's
frame (what the guest was doing), not the stub that caught it. Once the VM is over, registers
are read-only (E01).
"""

from __future__ import annotations

from ..kvm import KvmError
from . import registers, rsp
from .rsp import EFAULT, EINVAL, EPERM


def _state(v):
    """(regs, sregs, fpu or None) of a stopped vCPU; some hosts cannot read the FPU."""
    try:
        fpu = v.get_fpu()
    except KvmError:
        fpu = None
    return v.get_regs(), v.get_sregs(), fpu


def _store(v, changed, regs, sregs, fpu) -> None:
    if "regs" in changed:
        v.set_regs(regs)
    if "sregs" in changed:
        v.set_sregs(sregs)
    if "fpu" in changed and fpu is not None:
        v.set_fpu(fpu)


class VcpuRegisters:
    """Register reads and writes for gdb; `stops.ended` tells whether the VM is over (and how)."""

    def __init__(self, machine, stops):
        self.m = machine
        self.stops = stops

    def read(self, index: int) -> list[bytes]:
        """Every register of vCPU `index`, in gdb's order, as little-endian bytes."""
        v = self.m.vcpus[index]
        values = registers.read_values(*_state(v))
        out = self.stops.ended
        frame = out.details.get("frame") if out is not None and out.kind == "crash" else None
        if frame is not None and (out.vcpu or 0) == index:
            # a crash caught by the firmware stubs: show the faulting instruction, not the stub
            for name in registers.GPRS + ("rip",):
                values[registers.INDEX[name]] = (frame[name] & rsp.U64).to_bytes(8, "little")
            values[registers.INDEX["eflags"]] = (frame["rflags"] & 0xFFFFFFFF).to_bytes(4, "little")
            for name in ("cs", "ss"):
                values[registers.INDEX[name]] = (frame[name] & 0xFFFF).to_bytes(4, "little")
        return values

    def read_one(self, index: int, reg: int) -> bytes:
        """p: one register, or E0e for a number gdb's target description does not have."""
        if reg >= len(registers.REGS):
            return EFAULT
        return self.read(index)[reg].hex().encode()

    def write_all(self, index: int, raw: bytes) -> bytes:
        """G: every register; only those that differ from the vCPU's are stored."""
        if self.stops.ended is not None:
            return EPERM
        if len(raw) != registers.G_SIZE:
            return EINVAL
        v = self.m.vcpus[index]
        regs, sregs, fpu = _state(v)
        changed = set()
        pos = 0
        current = b"".join(registers.read_values(regs, sregs, fpu))
        for i, size in enumerate(registers.REG_SIZES):
            part = raw[pos:pos + size]
            if part != current[pos:pos + size]:
                changed.add(registers.write_value(i, part, regs, sregs, fpu))
            pos += size
        _store(v, changed, regs, sregs, fpu)
        return b"OK"

    def write_one(self, index: int, reg: int, raw: bytes) -> bytes:
        """P: one register."""
        if self.stops.ended is not None:
            return EPERM
        if reg >= len(registers.REGS) or len(raw) != registers.REG_SIZES[reg]:
            return EINVAL
        v = self.m.vcpus[index]
        regs, sregs, fpu = _state(v)
        _store(v, {registers.write_value(reg, raw, regs, sregs, fpu)}, regs, sregs, fpu)
        return b"OK"
