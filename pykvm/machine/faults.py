"""Turning a guest's death into words: device events, exceptions caught by the firmware stubs, RIP and code bytes."""

from __future__ import annotations

from .. import errors
from ..boot import trapframe
from ..devices import FirmwareTrap, GuestCrash, GuestExit, VmEvent
from ..devices.events import SleepRequest
from ..kvm import KvmError
from ..kvm import constants as C
from ..memory import GuestMemoryError
from ..memory.pagewalk import EFER_LMA, code_bits, linear_address
from .outcome import Outcome
from .sleep import sleep_and_resume


class Faults:
    """Builds the Outcome of a crash or exit from the vCPU that saw it."""

    def __init__(self, machine):
        self.machine = machine

    def handle_event(self, vcpu, ev: VmEvent) -> None:
        """A device's VmEvent; vcpu is None for one raised off the vCPU threads (a drained coalesced write)."""
        m = self.machine
        m.serial.flush()
        if isinstance(ev, GuestExit):
            kind = {"power-off": "poweroff", "reset": "reset"}.get(ev.how, "exit")
            text = (f"guest requested a reset ({getattr(ev, 'detail', ev.how)}); pykvm stops instead of rebooting"
                    if kind == "reset" else f"guest exited: {ev.how}")
            m.finish(Outcome(ev.status, kind, text, vcpu=vcpu.index if vcpu else None))
        elif isinstance(ev, SleepRequest) and vcpu is not None:
            sleep_and_resume(m, vcpu, ev)
        elif vcpu is None:  # no vCPU context to read RIP from
            trigger = ev.trigger if isinstance(ev, GuestCrash) else "strict-io"
            m.finish(Outcome(errors.EXIT_GUEST_CRASH, "crash", f"guest crashed: {ev}", trigger=trigger))
        elif isinstance(ev, FirmwareTrap):
            self.firmware_trap(vcpu)
        elif isinstance(ev, GuestCrash):
            self.crash(vcpu, ev.trigger, ev.reason)
        else:  # StrictIoViolation and any other policy stop
            self.crash(vcpu, "strict-io", str(ev))

    def rip_text(self, vcpu) -> str:
        """'RIP 0x... (bytes ..)' for messages, or why it is unavailable."""
        try:
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
            rip = regs.rip
            text = f"RIP {rip:#x}"
            code = self.code_bytes(vcpu, linear_address(sregs.cs.base, rip, _bits(sregs)))
            if code:
                text += f" (bytes {code.hex(' ')})"
            return text
        except KvmError:
            return "RIP unavailable"

    def code_bytes(self, vcpu, linear: int, n: int = 16) -> bytes:
        """Up to n instruction bytes at a linear address, via the vCPU's own translation; b'' if unmapped."""
        memory = self.machine.memory
        try:
            phys, valid, _w = vcpu.translate(linear)
            if not valid:
                return b""
            r = memory.region_of(phys)
            if r is None:
                return b""
            # stop at the page's end: the next linear page may map anywhere (or nowhere)
            return memory.read(phys, min(n, r.end - phys, 0x1000 - (linear & 0xFFF)))
        except (KvmError, GuestMemoryError):
            return b""

    def crash(self, vcpu, trigger: str, reason: str, **details) -> None:
        """End the VM as crashed on `vcpu`."""
        details.setdefault("exit_reason", C.EXIT_REASON_NAMES.get(vcpu.run_ptr.exit_reason))
        where = self.rip_text(vcpu)
        self.machine.finish(Outcome(errors.EXIT_GUEST_CRASH, "crash",
                                    f"guest crashed on vCPU {vcpu.index}: {reason}; {where}",
                                    vcpu=vcpu.index, trigger=trigger, details=details))

    def firmware_trap(self, vcpu) -> None:
        """Read the stub's trap frame and report the exception at the faulting instruction."""
        m = self.machine
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        long_mode = bool(sregs.efer & EFER_LMA)
        size = trapframe.frame_size(long_mode)
        bits = _bits(sregs)
        rsp = regs.rsp if bits == 64 else regs.rsp & 0xFFFFFFFF
        try:
            phys, valid, _w = vcpu.translate(linear_address(sregs.ss.base, rsp, 64 if bits == 64 else 32))
            raw = m.memory.read(phys, size) if valid else None
        except (KvmError, GuestMemoryError):
            raw = None
        if raw is None:
            self.crash(vcpu, "exception", f"firmware stub reported an exception but its trap frame at "
                       f"RSP {rsp:#x} is unreadable")
            return
        frame = trapframe.parse(raw, long_mode, rsp)
        vec, err = frame["vector"], frame["error_code"]
        name = trapframe.exception_name(vec)
        text = f"exception {name} (vector {vec}, error code {err:#x}) at RIP {frame['rip']:#x}"
        if vec == 14:
            text += f", CR2 {sregs.cr2:#x}"
        code = self.code_bytes(vcpu, linear_address(sregs.cs.base, frame["rip"], bits))
        if code:
            text += f" (bytes {code.hex(' ')})"
        m.finish(Outcome(errors.EXIT_GUEST_CRASH, "crash", f"guest crashed on vCPU {vcpu.index}: {text}",
                         vcpu=vcpu.index, trigger="exception",
                         details={"vector": vec, "error_code": err, "frame": frame, "cr2": sregs.cr2}))


def _bits(sregs) -> int:
    """The width of the code the vCPU is running (16, 32, 64)."""
    return code_bits(sregs.cr0, sregs.efer, sregs.cs.l, sregs.cs.db)
