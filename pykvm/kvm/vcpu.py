"""A KVM vCPU file descriptor, its shared kvm_run area and the KVM_RUN fast path."""

import errno
import mmap
import os

from ..startup import ffigen
from . import constants as C
from . import ioctls
from ._sys import FdOwner, ioctl
from .abi import cdata_to_python, ffi, field_offsets, lib
from .errors import KvmError

# Byte offsets of every kvm_run field ("exit_reason", "io.port", "mmio.data", ...) for
# hot loops that read the mmap with struct.unpack_from instead of going through cffi.
RUN_OFFSETS = field_offsets("struct kvm_run")
RUN_SIZE = ffi.sizeof("struct kvm_run")

_run_ffi = ffigen.load("kvmrun", "int ioctl(int fd, unsigned long request, unsigned long arg);")
_run_lib = _run_ffi.dlopen(None)

_plain_ioctl = lib.ioctl
_SYNC_SIZE = ffi.sizeof("struct kvm_sync_regs")
SYNC_ALL = C.KVM_SYNC_X86_REGS | C.KVM_SYNC_X86_SREGS | C.KVM_SYNC_X86_EVENTS   # what a reset stages
_EINTR = errno.EINTR
_EAGAIN = errno.EAGAIN


def regs_to_dict(regs):
    """A 'struct kvm_regs' cdata as {"rax": ..., "rip": ..., "rflags": ...}."""
    return cdata_to_python(regs[0] if ffi.typeof(regs).kind == "pointer" else regs)


def sregs_to_dict(sregs):
    """A 'struct kvm_sregs' cdata as nested dicts (segments, gdt/idt, control registers)."""
    return cdata_to_python(sregs[0] if ffi.typeof(sregs).kind == "pointer" else sregs)


def _closed_run():
    raise KvmError(errno.EBADF, "KVM_RUN", "vCPU is closed")


class Vcpu(FdOwner):
    """A vCPU: ``run()`` enters the guest once; get/set methods move register state.

    ``run`` is a per-instance closure (built by _bind_run) rather than a method, so
    the hot loop pays for no attribute lookups. ``run_mmap`` is the mmap of the vCPU
    fd (kvm_run, then the PIO data page and the coalesced MMIO ring); ``run_ptr`` is
    a 'struct kvm_run *' over the same memory.
    """

    RUN_OFFSETS = RUN_OFFSETS

    def __init__(self, vm, fd, index, mmap_size):
        self.vm = vm
        self.fd = fd
        self.index = index
        self.run_mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        # from_buffer keeps a buffer export on run_mmap until released in close().
        self.run_ptr = ffi.from_buffer("struct kvm_run *", self.run_mmap)
        self.run = self._bind_run()
        self.cpuid = None             # the 'struct kvm_cpuid2 *' set_cpuid2 gave KVM
        self.sync_fields = 0          # KVM_SYNC_X86_* KVM_RUN loads from kvm_run (set by the VM: KVM_CAP_SYNC_REGS)

    def _bind_run(self):
        # A closure over pre-bound locals: no attribute lookups, no allocation per call.
        # cffi drops the GIL around the ioctl, so each vCPU thread runs in parallel.
        # It calls ioctl through a fixed three-argument prototype: cffi rebuilds the call
        # descriptor of a variadic function on every call (~300 ns, a few % of an exit).
        # On x86-64 SysV integer arguments travel in the same registers either way.
        ioctl_ = _run_lib.ioctl
        fd = self.fd
        request = ioctls.KVM_RUN
        zero = 0
        ffi_ = _run_ffi

        def run():
            """One KVM_RUN: 0 on an exit to read from run_ptr, or EINTR/EAGAIN; raises otherwise."""
            if ioctl_(fd, request, zero) == 0:
                return 0
            err = ffi_.errno
            if err == _EINTR or err == _EAGAIN:
                return err
            raise KvmError(err, "KVM_RUN")

        return run

    # ---- registers staged in kvm_run's sync area (KVM_CAP_SYNC_REGS) ----
    def stage_sync(self, sync) -> None:
        """Put regs, sregs and events (a 'struct kvm_sync_regs *') in kvm_run's sync area for KVM to load
        at the next KVM_RUN: no ioctl now (the caller checked sync_fields). Any other ioctl on this vCPU
        loads what is staged first, so a reader never sees the state from before."""
        run = self.run_ptr
        ffi.memmove(ffi.addressof(run.s, "regs"), sync, _SYNC_SIZE)
        run.kvm_dirty_regs |= SYNC_ALL

    def report_sregs(self, on: bool = True) -> bool:
        """Have KVM write the special registers into kvm_run's sync area at every exit (kvm_valid_regs), so
        sregs_now() costs no ioctl; False where KVM has no sync area."""
        if not self.sync_fields:
            return False
        run = self.run_ptr
        run.kvm_valid_regs = (run.kvm_valid_regs | C.KVM_SYNC_X86_SREGS) if on else \
            (run.kvm_valid_regs & ~C.KVM_SYNC_X86_SREGS)
        return True

    def sregs_now(self):
        """The special registers as the next KVM_RUN will run with them: from the sync area when KVM reports
        them there (report_sregs) or they are staged, else by KVM_GET_SREGS."""
        run = self.run_ptr
        if (run.kvm_valid_regs | run.kvm_dirty_regs) & C.KVM_SYNC_X86_SREGS:
            return run.s.regs.sregs
        return self.get_sregs()

    def _load_staged(self):
        """KVM_SET_* what stage_sync() left for KVM_RUN (a getter must not see the older state)."""
        run = self.run_ptr
        dirty = run.kvm_dirty_regs
        run.kvm_dirty_regs = 0
        area = run.s.regs
        # KVM_RUN's order: regs, sregs, events
        if dirty & C.KVM_SYNC_X86_REGS:
            ioctl(self.fd, ioctls.KVM_SET_REGS, ffi.addressof(area, "regs"), "KVM_SET_REGS")
        if dirty & C.KVM_SYNC_X86_SREGS:
            ioctl(self.fd, ioctls.KVM_SET_SREGS, ffi.addressof(area, "sregs"), "KVM_SET_SREGS")
        if dirty & C.KVM_SYNC_X86_EVENTS:
            ioctl(self.fd, ioctls.KVM_SET_VCPU_EVENTS, ffi.addressof(area, "events"), "KVM_SET_VCPU_EVENTS")

    def ioctl_plan(self, plan) -> list[int]:
        """Issue prebuilt (request, cdata pointer, name) ioctls in order, returning their results: one
        call for a sequence a caller repeats (a reset), without a wrapper per ioctl."""
        self.load_staged()
        fd = self.fd
        raw = _plain_ioctl
        out = []
        for request, arg, name in plan:
            ret = raw(fd, request, arg)
            if ret < 0:
                ret = ioctl(fd, request, arg, name)      # retries EINTR, raises KvmError otherwise
            out.append(ret)
        return out

    def load_staged(self) -> None:
        """Load now, by ioctls, what stage_sync() left for the next KVM_RUN (nothing when none is)."""
        if self.run_ptr.kvm_dirty_regs:
            self._load_staged()

    def _ioctl(self, request, arg, name):
        if self.run_ptr is not None and self.run_ptr.kvm_dirty_regs:
            self._load_staged()
        return ioctl(self.fd, request, arg, name)

    def close(self):
        """Unmap kvm_run and close the vCPU fd (idempotent)."""
        if self.fd < 0:
            return
        self.run = _closed_run  # the old closure would keep using a recycled fd number
        ffi.release(self.run_ptr)
        self.run_ptr = None
        self.run_mmap.close()
        os.close(self.fd)
        self.fd = -1

    def __repr__(self):
        return f"<Vcpu {self.index} fd={self.fd}>"

    @property
    def immediate_exit(self):
        """kvm_run.immediate_exit: when set, KVM_RUN returns EINTR before entering the guest."""
        return self.run_ptr.immediate_exit

    @immediate_exit.setter
    def immediate_exit(self, value):
        self.run_ptr.immediate_exit = 1 if value else 0

    @property
    def exit_reason(self):
        """kvm_run.exit_reason of the last KVM_RUN."""
        return self.run_ptr.exit_reason

    # ---- generic get/set of one struct ----
    def _get(self, ctype, request, name):
        out = ffi.new(ctype)
        self._ioctl(request, out, name)
        return out

    def _set(self, ctype, request, name, value):
        # Accept a pointer (what the getters return) or a struct value.
        if ffi.typeof(value).kind != "pointer":
            value = ffi.new(ctype, value)
        self._ioctl(request, value, name)

    def get_regs(self):
        """KVM_GET_REGS as a 'struct kvm_regs *'."""
        return self._get("struct kvm_regs *", ioctls.KVM_GET_REGS, "KVM_GET_REGS")

    def set_regs(self, regs):
        """KVM_SET_REGS from a 'struct kvm_regs' cdata."""
        self._set("struct kvm_regs *", ioctls.KVM_SET_REGS, "KVM_SET_REGS", regs)

    def get_sregs(self):
        """KVM_GET_SREGS as a 'struct kvm_sregs *'."""
        return self._get("struct kvm_sregs *", ioctls.KVM_GET_SREGS, "KVM_GET_SREGS")

    def set_sregs(self, sregs):
        """KVM_SET_SREGS from a 'struct kvm_sregs' cdata."""
        self._set("struct kvm_sregs *", ioctls.KVM_SET_SREGS, "KVM_SET_SREGS", sregs)

    def get_fpu(self):
        """KVM_GET_FPU as a 'struct kvm_fpu *'."""
        return self._get("struct kvm_fpu *", ioctls.KVM_GET_FPU, "KVM_GET_FPU")

    def set_fpu(self, fpu):
        """KVM_SET_FPU from a 'struct kvm_fpu' cdata."""
        self._set("struct kvm_fpu *", ioctls.KVM_SET_FPU, "KVM_SET_FPU", fpu)

    def get_vcpu_events(self):
        """KVM_GET_VCPU_EVENTS as a 'struct kvm_vcpu_events *' (pending exceptions, NMI, SMI)."""
        return self._get("struct kvm_vcpu_events *", ioctls.KVM_GET_VCPU_EVENTS,
                         "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events):
        """KVM_SET_VCPU_EVENTS from a 'struct kvm_vcpu_events' cdata."""
        self._set("struct kvm_vcpu_events *", ioctls.KVM_SET_VCPU_EVENTS,
                  "KVM_SET_VCPU_EVENTS", events)

    def get_lapic(self):
        """KVM_GET_LAPIC as a 'struct kvm_lapic_state *' (1 KiB register page)."""
        return self._get("struct kvm_lapic_state *", ioctls.KVM_GET_LAPIC, "KVM_GET_LAPIC")

    def set_lapic(self, lapic):
        """KVM_SET_LAPIC from a 'struct kvm_lapic_state' cdata."""
        self._set("struct kvm_lapic_state *", ioctls.KVM_SET_LAPIC, "KVM_SET_LAPIC", lapic)

    def get_xcrs(self):
        """KVM_GET_XCRS as a 'struct kvm_xcrs *'."""
        return self._get("struct kvm_xcrs *", ioctls.KVM_GET_XCRS, "KVM_GET_XCRS")

    def set_xcrs(self, xcrs):
        """KVM_SET_XCRS from a 'struct kvm_xcrs' cdata."""
        self._set("struct kvm_xcrs *", ioctls.KVM_SET_XCRS, "KVM_SET_XCRS", xcrs)

    def get_xsave(self):
        """KVM_GET_XSAVE as a 'struct kvm_xsave *' (x87, SSE and AVX state in XSAVE layout)."""
        return self._get("struct kvm_xsave *", ioctls.KVM_GET_XSAVE, "KVM_GET_XSAVE")

    def set_xsave(self, xsave):
        """KVM_SET_XSAVE from a 'struct kvm_xsave' cdata."""
        self._set("struct kvm_xsave *", ioctls.KVM_SET_XSAVE, "KVM_SET_XSAVE", xsave)

    def get_mp_state(self):
        """KVM_GET_MP_STATE as an int (KVM_MP_STATE_*)."""
        return self._get("struct kvm_mp_state *", ioctls.KVM_GET_MP_STATE,
                         "KVM_GET_MP_STATE").mp_state

    def interrupt(self, vector):
        """KVM_INTERRUPT: hand the in-kernel LAPIC an ExtINT vector (from a userspace PIC); EEXIST while one waits."""
        self._ioctl(ioctls.KVM_INTERRUPT, ffi.new("struct kvm_interrupt *", {"irq": vector}), "KVM_INTERRUPT")

    def set_mp_state(self, state):
        """KVM_SET_MP_STATE to a KVM_MP_STATE_* value."""
        self._ioctl(ioctls.KVM_SET_MP_STATE,
              ffi.new("struct kvm_mp_state *", {"mp_state": state}), "KVM_SET_MP_STATE")

    def set_cpuid2(self, cpuid):
        """KVM_SET_CPUID2 from a 'struct kvm_cpuid2 *' (e.g. Kvm.supported_cpuid(), edited)."""
        self._ioctl(ioctls.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")
        self.cpuid = cpuid

    def cpuid_bit(self, function: int, index: int, register: str, bit: int) -> bool | None:
        """Whether the CPUID this vCPU was given (set_cpuid2) has the bit; None before set_cpuid2."""
        cpuid = self.cpuid
        if cpuid is None:
            return None
        e = C.cpuid_entry(cpuid.entries[0:cpuid.nent], function, index)
        return e is not None and bool(getattr(e, register) >> bit & 1)

    def _msr_batch(self, request, name, items):
        """One KVM_GET/SET_MSRS over [(index, value)]; returns (entries, how many KVM processed)."""
        n = len(items)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for entry, (index, data) in zip(msrs.entries, items):
            entry.index = index
            entry.data = data
        # KVM stops at the first MSR it refuses and returns how many it did. The entries are
        # copied out: a cdata field does not keep the struct ffi.new() owns alive.
        done = self._ioctl(request, msrs, name)
        return [(e.index, e.data) for e in msrs.entries[0:n]], done

    def get_msrs(self, indices, skip_unreadable=False):
        """KVM_GET_MSRS: {index: value}; an MSR KVM refuses raises KvmError(EINVAL), or is skipped."""
        todo = [(index, 0) for index in indices]
        out = {}
        while todo:
            entries, done = self._msr_batch(ioctls.KVM_GET_MSRS, "KVM_GET_MSRS", todo)
            out.update(entries[0:done])
            if done < len(todo) and not skip_unreadable:
                raise KvmError(errno.EINVAL, "KVM_GET_MSRS", f"MSR {todo[done][0]:#x} not readable")
            todo = todo[done + 1:]
        return out

    def set_msrs(self, values, skip_refused=False):
        """KVM_SET_MSRS from {index: value}; a refused MSR raises KvmError(EINVAL), or with
        skip_refused is left out; returns the refused indices."""
        todo = list(values.items())
        refused = []
        while todo:
            _entries, done = self._msr_batch(ioctls.KVM_SET_MSRS, "KVM_SET_MSRS", todo)
            if done < len(todo):
                if not skip_refused:
                    raise KvmError(errno.EINVAL, "KVM_SET_MSRS", f"MSR {todo[done][0]:#x} not writable")
                refused.append(todo[done][0])
            todo = todo[done + 1:]
        return refused

    def msr_block(self, values):
        """A prebuilt 'struct kvm_msrs *' of {index: value}, for set_msr_block (a reset loads the same
        MSRs every time: building the array once saves most of the cost)."""
        items = list(values.items())
        block = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for entry, (index, data) in zip(block.entries, items):
            entry.index = index
            entry.data = data
        return block

    def set_msr_block(self, block):
        """KVM_SET_MSRS of a msr_block(); returns how many KVM set (it stops at the first it refuses)."""
        return self._ioctl(ioctls.KVM_SET_MSRS, block, "KVM_SET_MSRS")

    def translate(self, linear_addr):
        """KVM_TRANSLATE a linear address with the vCPU's paging: (gpa, valid, writeable)."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear_addr})
        self._ioctl(ioctls.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr.physical_address, bool(tr.valid), bool(tr.writeable)

    def set_guest_debug(self, control, debugreg=None):
        """KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_* flags and optionally DR0-DR7 values."""
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        if debugreg is not None:
            if len(debugreg) > 8:
                raise ValueError("at most 8 debug registers (DR0-DR7)")
            dbg.arch.debugreg[0:len(debugreg)] = list(debugreg)
        self._ioctl(ioctls.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")
