"""gdb's breakpoints and watchpoints (Z/z packets): int3 in guest memory, DR0-DR3, or checked after steps.

Every table is bounded, whatever gdb sends: software breakpoints up to MAX_SW_BREAKS, the four
debug registers, MAX_SOFT_WATCHES software-checked watchpoints of at most MAX_SOFT_WATCH bytes,
and the last MAX_NOTES console notes. A request past a bound is answered with an error (E1c).
"""

from __future__ import annotations

import collections

from ..kvm import constants as C
from ..memory import GuestMemoryError
from . import hwdebug
from .rsp import EFAULT, EINVAL, ENOSPC

MAX_SW_BREAKS = 1024           # int3 breakpoints at once (gdb's rbreak on a large kernel stays well below)
MAX_SOFT_WATCHES = 16          # watchpoints checked after single steps
MAX_SOFT_WATCH = 64            # bytes one such watchpoint may cover
MAX_NOTES = 16                 # console notes kept for gdb until the next resume


class Breakpoints:
    """The breakpoints and watchpoints of one VM, and how they reach KVM (KVM_SET_GUEST_DEBUG)."""

    def __init__(self, machine, host, memory_access, log):
        self.m = machine
        self.host = host                   # hwdebug.probe(): what this host's KVM can do
        self.mem = memory_access           # physical(addr) and spans(addr, length) under gdb's vCPU
        self.log = log
        self.dregs = hwdebug.DebugRegs()
        self.sw_breaks: dict[int, tuple[int, bytes]] = {}    # linear address -> (physical, original byte)
        self.soft_watches: dict[tuple[int, int], list] = {}  # (addr, len) -> [[(phys, n), ...], last bytes]
        self.notes: collections.deque[str] = collections.deque(maxlen=MAX_NOTES)
        self._said = set()                 # notes already given once

    # ---- Z and z
    def insert(self, ztype: int, addr: int, kind: int) -> bytes:
        """Z: set a breakpoint (0 software, 1 hardware) or watchpoint (2 write, 3 read, 4 access)."""
        if ztype == 0 and self.host.int3:
            return self._insert_sw(addr)
        if ztype in (0, 1):
            if ztype == 0:
                self._note_once("int3", "pykvm: this host's KVM cannot take int3; breakpoints use the 4 hardware "
                                "debug registers instead", stderr=False)   # stderr heard it at start-up
            if self.dregs.add(hwdebug.Slot(addr, hwdebug.RW_EXEC, 1, 1)):
                return b"OK"
            self._note_once("slots", f"pykvm: no free hardware debug register for the breakpoint at {addr:#x} "
                            f"({hwdebug.SLOTS} in use)")
            return ENOSPC
        if ztype == 2 and not self.host.data_watch:
            return self._insert_soft_watch(addr, kind)
        if not self.host.data_watch:
            return b""                     # read/access watchpoints need working data breakpoints
        if not hwdebug.watch_ok(addr, kind):
            return EINVAL
        rw = hwdebug.RW_WRITE if ztype == 2 else hwdebug.RW_ACCESS
        return b"OK" if self.dregs.add(hwdebug.Slot(addr, rw, kind, ztype)) else ENOSPC

    def remove(self, ztype: int, addr: int, kind: int) -> bytes:
        """z: remove what insert() set."""
        if ztype == 0 and self.host.int3:
            return b"OK" if self.remove_sw(addr) else EINVAL
        if ztype in (0, 1):
            return b"OK" if self.dregs.remove(hwdebug.Slot(addr, hwdebug.RW_EXEC, 1, 1)) else EINVAL
        if ztype == 2 and not self.host.data_watch:
            return b"OK" if self.soft_watches.pop((addr, kind), None) is not None else EINVAL
        rw = hwdebug.RW_WRITE if ztype == 2 else hwdebug.RW_ACCESS
        return b"OK" if self.dregs.remove(hwdebug.Slot(addr, rw, kind, ztype)) else EINVAL

    def _insert_sw(self, addr: int) -> bytes:
        if addr in self.sw_breaks:
            return b"OK"
        if len(self.sw_breaks) >= MAX_SW_BREAKS:
            self._note_once("sw", f"pykvm: at most {MAX_SW_BREAKS} software breakpoints at once")
            return ENOSPC
        phys = self.mem.physical(addr)
        if phys is None:
            return EFAULT
        memory = self.m.memory
        self.sw_breaks[addr] = (phys, memory.read(phys, 1))
        memory.write(phys, b"\xcc")
        return b"OK"

    def remove_sw(self, addr: int) -> bool:
        """Put back the byte an int3 replaced; False when there was none at addr."""
        entry = self.sw_breaks.pop(addr, None)
        if entry is None:
            return False
        self.m.memory.write(entry[0], entry[1])
        return True

    def _insert_soft_watch(self, addr: int, length: int) -> bytes:
        if not 0 < length <= MAX_SOFT_WATCH:
            return EINVAL
        if (addr, length) in self.soft_watches:
            return b"OK"
        if len(self.soft_watches) >= MAX_SOFT_WATCHES:
            self._note_once("watches", f"pykvm: at most {MAX_SOFT_WATCHES} software-checked watchpoints at once")
            return ENOSPC
        spans = self.mem.spans(addr, length)
        if sum(n for _, n in spans) != length:
            return EFAULT
        self._note_once("softwatch", "pykvm: data breakpoints do not fire on this host's KVM; the watchpoint is "
                        "checked after every single-stepped instruction instead (slow)", stderr=False)
        self.soft_watches[(addr, length)] = [spans, b""]
        return b"OK"

    # ---- what the guest sees
    def apply(self, step_vcpu: int | None) -> None:
        """Program every vCPU's guest debugging for the next resume (step_vcpu single-steps)."""
        base = 0
        if self.dregs.any():
            base |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_HW_BP
        if self.sw_breaks:
            base |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_SW_BP
        if self.soft_watches:
            base |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP
        dr = self.dregs.values() if base & C.KVM_GUESTDBG_USE_HW_BP else None
        for v in self.m.vcpus:
            control = base
            if v.index == step_vcpu:
                control |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP
                if self.host.blockirq and not self.soft_watches:
                    control |= C.KVM_GUESTDBG_BLOCKIRQ
            v.set_guest_debug(control, dr)

    def clear(self) -> None:
        """Remove every breakpoint and watchpoint (gdb detached or went away)."""
        for addr in list(self.sw_breaks):
            self.remove_sw(addr)
        self.dregs.clear()
        self.soft_watches.clear()
        self._said.clear()                 # the next gdb hears the notes again

    def snapshot_watches(self) -> None:
        """Remember the watched bytes before the guest runs (the software check compares against them)."""
        mem = self.m.memory
        for entry in self.soft_watches.values():
            entry[1] = b"".join(mem.read(p, n) for p, n in entry[0])

    def soft_watch_hit(self) -> int | None:
        """The first software-checked watchpoint whose bytes changed since the last check, or None."""
        mem = self.m.memory
        for (addr, _n), entry in self.soft_watches.items():
            try:
                now = b"".join(mem.read(p, n) for p, n in entry[0])
            except GuestMemoryError:
                continue
            if now != entry[1]:
                entry[1] = now
                return addr
        return None

    # ---- console notes
    def note(self, text: str, stderr: bool = True) -> None:
        """Say something on gdb's console (at the next resume, when O packets are allowed) and on stderr."""
        self.notes.append(text)
        if stderr:
            print(text, file=self.log)

    def _note_once(self, key: str, text: str, stderr: bool = True) -> None:
        if key not in self._said:
            self._said.add(key)
            self.note(text, stderr)
