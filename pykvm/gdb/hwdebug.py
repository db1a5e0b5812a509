"""x86 debug registers for gdb's breakpoints and watchpoints, and what this host's KVM can do with them.

Four address slots (DR0-DR3) enabled through DR7 serve hardware breakpoints, watchpoints and,
on hosts whose KVM cannot take int3, software breakpoints too. probe() runs two tiny real-mode
guests in a scratch VM at start-up: one executes int3 with KVM_GUESTDBG_USE_SW_BP, one writes
under a DR0 write watchpoint. Nested or software-assisted KVM (this project's development
host) fails the first with an emulation error and never fires the second, and the stub then
falls back to hardware breakpoints and to watchpoints checked after single steps.
"""

from __future__ import annotations

from typing import NamedTuple

from ..kvm import KvmError
from ..kvm import constants as C
from ..record import record

SLOTS = 4
RW_EXEC, RW_WRITE, RW_ACCESS = 0, 1, 3        # DR7 R/W field values (2 is I/O, unused)
_LEN_FIELD = {1: 0, 2: 1, 4: 3, 8: 2}          # DR7 LEN field for 1, 2, 4, 8 bytes
DR6_BS = 1 << 14                               # single step
DR7_FIXED = 1 << 10                            # reads as one on every CPU
KVM_CAP_SET_GUEST_DEBUG2 = 195                 # the KVM_GUESTDBG_* flags this KVM supports


class Slot(NamedTuple):
    """One debug register in use: linear address, R/W kind, length in bytes, and who asked (gdb's Z type)."""

    addr: int
    rw: int
    length: int
    ztype: int


class DebugRegs:
    """DR0-DR3 and the DR7 that enables them."""

    def __init__(self):
        self.slots: list[Slot | None] = [None] * SLOTS

    def free(self) -> int:
        """How many slots are unused."""
        return self.slots.count(None)

    def add(self, slot: Slot) -> bool:
        """Take a free slot; False when all four are in use."""
        if slot in self.slots:
            return True
        for i, s in enumerate(self.slots):
            if s is None:
                self.slots[i] = slot
                return True
        return False

    def remove(self, slot: Slot) -> bool:
        """Free the slot holding exactly this; False when none does."""
        for i, s in enumerate(self.slots):
            if s == slot:
                self.slots[i] = None
                return True
        return False

    def clear(self) -> None:
        """Free every slot."""
        self.slots = [None] * SLOTS

    def dr7(self) -> int:
        """DR7 with a global-enable bit, R/W and LEN for each used slot."""
        value = DR7_FIXED
        for i, s in enumerate(self.slots):
            if s is not None:
                length = 0 if s.rw == RW_EXEC else _LEN_FIELD[s.length]
                value |= (2 << (2 * i)) | (s.rw << (16 + 4 * i)) | (length << (18 + 4 * i))
        return value

    def values(self) -> list[int]:
        """kvm_guest_debug.arch.debugreg: DR0-DR3, two unused, DR7."""
        return [s.addr if s else 0 for s in self.slots] + [0, 0, 0, self.dr7()]

    def hit(self, dr6: int) -> Slot | None:
        """The slot DR6 says fired (the lowest when several did)."""
        for i, s in enumerate(self.slots):
            if dr6 >> i & 1 and s is not None:
                return s
        return None

    def any(self) -> bool:
        """Whether any slot is in use."""
        return any(s is not None for s in self.slots)


def watch_ok(addr: int, length: int) -> bool:
    """Whether one debug register can watch [addr, addr+length): 1, 2, 4 or 8 bytes, naturally aligned."""
    return length in _LEN_FIELD and addr % length == 0


@record
class HostDebug:
    """What this host's KVM can do for a debugger."""

    int3: bool = False          # KVM_GUESTDBG_USE_SW_BP catches int3 (else: emulation error)
    data_watch: bool = False    # data breakpoints in DR7 fire
    blockirq: bool = False      # KVM_GUESTDBG_BLOCKIRQ keeps a single step out of interrupt handlers


_CODE_AT = 0x1000
_INT3 = b"\xcc\xf4"                              # int3; hlt
_STORE = b"\xa2\x00\x20\xf4"                     # mov [0x2000], al; hlt   (16-bit code)


_HLT_AT = 0x1800


def _ivt() -> bytes:
    """A real-mode interrupt vector table sending all 256 vectors to 0000:_HLT_AT."""
    return (_HLT_AT.to_bytes(2, "little") + b"\0\0") * 256


def probe(kvm) -> HostDebug:
    """Try int3 and a data watchpoint in a throwaway VM (run before the sandbox: it creates a VM)."""
    flags = kvm.check_extension(KVM_CAP_SET_GUEST_DEBUG2) or 0
    out = HostDebug(blockirq=bool(flags & C.KVM_GUESTDBG_BLOCKIRQ))
    try:
        out.int3 = _trial(kvm, _INT3, C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_SW_BP, None, 3)
        watch = DebugRegs()
        watch.add(Slot(0x2000, RW_WRITE, 1, 2))
        out.data_watch = _trial(kvm, _STORE, C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_HW_BP, watch.values(), 1)
    except (KvmError, OSError):
        pass  # a host that cannot even run the probe gets the most conservative choices
    return out


def _trial(kvm, code: bytes, control: int, debugreg, exception: int) -> bool:
    """Run code in real mode at 0x1000; True when it ends in KVM_EXIT_DEBUG for `exception`."""
    from ..memory.region import MemoryRegion

    vm = kvm.create_vm()
    region = vcpu = None
    try:
        region = MemoryRegion(0, 0x10000, name="gdb-probe")
        vm.set_user_memory_region(0, 0, region.size, region.host_addr)
        vm.set_tss_addr(0xFFFBD000)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        sregs.ds.base, sregs.ds.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags, regs.rax = _CODE_AT, 2, 0x55
        vcpu.set_regs(regs)
        # Every byte a hlt and every interrupt vector pointing at one: whatever this KVM does with
        # the probe's instruction (deliver the exception to the guest, mis-emulate it), it halts at once.
        region.view[:] = b"\xf4" * region.size
        region.view[:1024] = _ivt()
        region.view[_CODE_AT:_CODE_AT + len(code)] = code
        vcpu.set_guest_debug(control, debugreg)
        if vcpu.run():
            return False
        run = vcpu.run_ptr
        return run.exit_reason == C.KVM_EXIT_DEBUG and run.debug.arch.exception == exception
    finally:
        if vcpu is not None:
            vcpu.close()
        vm.close()
        if region is not None:
            region.close()
