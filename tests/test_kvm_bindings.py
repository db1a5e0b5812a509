"""Tests of pykvm.kvm: encoding and error handling without KVM, then real guests on /dev/kvm."""

import errno
import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from pykvm.kvm import (Kvm, KvmError, KvmUnavailable, RUN_OFFSETS, ffi, irqchip_route,
                       msi_route, regs_to_dict, sregs_to_dict)
from pykvm.kvm import constants as C
from pykvm.kvm import ioctls
from pykvm.kvm import system as kvm_system
from pykvm.kvm.abi import field_offsets
from pykvm.memory.region import buffer_address
from pykvm.kvm.vcpu import RUN_SIZE
from pykvm.kvm.routing import as_route as _as_route

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# ---------------------------------------------------------------- without KVM


def test_ioc_encoding_from_struct_sizes():
    size = ffi.sizeof("struct kvm_userspace_memory_region")
    assert size == 32
    assert ioctls._IOW(0xAE, 0x46, "struct kvm_userspace_memory_region") == \
        (1 << 30) | (size << 16) | (0xAE << 8) | 0x46
    assert ioctls._IOW(0xAE, 0x46, size) == ioctls.KVM_SET_USER_MEMORY_REGION
    # Reference values from the kernel documentation / strace output.
    assert ioctls.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert ioctls.KVM_RUN == 0xAE80
    assert ioctls.KVM_CREATE_VM == 0xAE01
    assert ioctls.KVM_GET_REGS == 0x8090AE81
    assert ioctls.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert ioctls._IOR(0xAE, 1, 4) == (2 << 30) | (4 << 16) | 0xAE01
    assert ioctls._IOWR(0xAE, 1, 4) == (3 << 30) | (4 << 16) | 0xAE01


def test_ioc_rejects_oversized_argument():
    with pytest.raises(ValueError):
        ioctls._IOW(0xAE, 1, 1 << 14)


def test_ioctl_names_table():
    assert ioctls.IOCTL_NAMES[ioctls.KVM_RUN] == "KVM_RUN"
    assert ioctls.IOCTL_NAMES[ioctls.KVM_SET_CPUID2] == "KVM_SET_CPUID2"


def test_flexible_array_structs_count_only_their_header():
    assert ffi.sizeof("struct kvm_cpuid2") == 8
    assert ffi.sizeof("struct kvm_msrs") == 8
    assert ffi.sizeof("struct kvm_msr_list") == 4
    assert ffi.sizeof("struct kvm_irq_routing") == 8
    assert ffi.sizeof("struct kvm_coalesced_mmio_ring") == 8
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": 3, "entries": 3})
    assert len(cpuid.entries) == 3
    assert ffi.sizeof(cpuid[0]) == 8 + 3 * ffi.sizeof("struct kvm_cpuid_entry2")


def test_kvm_run_layout_and_offsets():
    # The exit union is padded to 256 bytes and the sync-regs union to 2048.
    assert RUN_OFFSETS["io.port"] == 34
    assert RUN_OFFSETS["kvm_valid_regs"] == 32 + 256
    assert RUN_OFFSETS["s"] == 32 + 256 + 16
    assert RUN_SIZE == 32 + 256 + 16 + 2048
    for key in ("exit_reason", "immediate_exit", "io.direction", "io.size", "io.count",
                "io.data_offset", "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
                "internal.suberror", "internal.ndata", "internal.data",
                "fail_entry.hardware_entry_failure_reason", "system_event.type",
                "ex.exception", "debug.arch.pc", "msr.index", "eoi.vector"):
        assert key in RUN_OFFSETS
    assert field_offsets("struct kvm_irq_level") == {"irq": 0, "status": 0, "level": 4}


def test_exit_layouts_decode_what_cffi_wrote():
    from pykvm.kvm import exits

    buf = bytearray(RUN_SIZE)
    run = ffi.from_buffer("struct kvm_run *", buf)
    run.exit_reason = C.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = 1, 2, 0x3F8, 3, 4096
    assert exits.EXIT_IO.unpack_from(buf, exits.EXIT_AT) == (C.KVM_EXIT_IO, 1, 2, 0x3F8, 3, 4096)
    assert exits.IO.unpack_from(buf, exits.IO_AT) == (1, 2, 0x3F8, 3, 4096)
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFED00000, 4, 1
    run.mmio.data[0:8] = list(range(1, 9))
    assert exits.MMIO.unpack_from(buf, exits.MMIO_AT) == (0xFED00000, bytes(range(1, 9)), 4, 1)
    buf[exits.MMIO_DATA:exits.MMIO_DATA + 8] = b"\xff" * 8
    assert list(run.mmio.data) == [0xFF] * 8
    ffi.release(run)
    with pytest.raises(ImportError, match="io.port"):
        exits.layout(("io.port", "I"))     # a 2-byte field read as 4


def test_constants_name_tables():
    assert C.EXIT_REASON_NAMES[C.KVM_EXIT_IO] == "KVM_EXIT_IO"
    assert C.EXIT_REASON_NAMES[C.KVM_EXIT_IO_OUT] == "KVM_EXIT_EXCEPTION"  # 1, not IO_OUT
    assert C.exit_reason_name(999) == "KVM_EXIT_999"
    assert C.CAPABILITY_NAMES[0] == "KVM_CAP_IRQCHIP"
    assert C.capability_name(C.KVM_CAP_SPLIT_IRQCHIP) == "KVM_CAP_SPLIT_IRQCHIP"
    assert C.INTERNAL_ERROR_NAMES[1] == "KVM_INTERNAL_ERROR_EMULATION"
    assert C.SYSTEM_EVENT_NAMES[3] == "KVM_SYSTEM_EVENT_CRASH"


def test_kvm_error_message_and_type():
    e = KvmError(errno.EPERM, "KVM_CREATE_VM")
    assert str(e) == "KVM_CREATE_VM failed: Operation not permitted"
    assert isinstance(e, OSError) and e.errno == errno.EPERM and e.ioctl == "KVM_CREATE_VM"
    e = KvmError(errno.EINVAL, "KVM_GET_MSRS", "MSR 0x10 not readable")
    assert str(e) == "KVM_GET_MSRS failed: Invalid argument (MSR 0x10 not readable)"
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.errno == errno.EINVAL


def test_unavailable_missing_path(tmp_path):
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open(str(tmp_path / "kvm"))
    assert info.value.reason == "missing"
    assert "does not exist" in str(info.value)
    assert "kvm_intel" in str(info.value) and "nested virtualization" in str(info.value)


def test_unavailable_regular_file(tmp_path):
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open(str(path))
    assert info.value.reason == "not-a-device"
    assert "not a character device" in str(info.value)


def test_unavailable_directory(tmp_path):
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open(str(tmp_path))
    assert info.value.reason == "not-a-device"


def test_unavailable_char_device_that_is_not_kvm():
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open("/dev/null")
    assert info.value.reason == "not-kvm"


def test_unavailable_permission_denied(monkeypatch):
    # Tests may run as root, where a real EACCES cannot happen: simulate it.
    def deny(path, flags, *args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(kvm_system.os, "open", deny)
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open("/dev/kvm")
    message = str(info.value)
    assert info.value.reason == "permission"
    assert "permission denied" in message
    assert "kvm group" in message and "setfacl -m u:$USER:rw /dev/kvm" in message


def test_unavailable_no_driver(monkeypatch):
    def enxio(path, flags, *args):
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), path)

    monkeypatch.setattr(kvm_system.os, "open", enxio)
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open("/dev/kvm")
    assert info.value.reason == "no-module" and "modprobe" in str(info.value)


def test_unavailable_wrong_api_version(monkeypatch):
    monkeypatch.setattr(Kvm, "api_version", lambda self: 11)
    with pytest.raises(KvmUnavailable) as info:
        Kvm.open("/dev/null")  # a character device, so only the version check can fail
    assert info.value.reason == "api-version"
    assert "KVM API version 11, expected 12" in str(info.value)


def test_gsi_route_spellings():
    assert _as_route(("irqchip", 5, C.KVM_IRQCHIP_IOAPIC, 5)) == irqchip_route(5, 2, 5)
    assert _as_route(("msi", 24, 0xFEE00000, 0x41)) == msi_route(24, 0xFEE00000, 0x41)
    assert _as_route(msi_route(1, 2, 3, devid=4))["devid"] == 4
    with pytest.raises(ValueError):
        _as_route(("adapter", 1))


def test_regs_to_dict_and_sregs_to_dict():
    regs = ffi.new("struct kvm_regs *", {"rax": 1, "rip": 0x1000, "rflags": 2})
    d = regs_to_dict(regs)
    assert d["rax"] == 1 and d["rip"] == 0x1000 and d["rflags"] == 2 and len(d) == 18
    sregs = ffi.new("struct kvm_sregs *")
    sregs.cs.selector = 0x10
    sregs.cr0 = 0x11
    s = sregs_to_dict(sregs[0])
    assert s["cs"]["selector"] == 0x10 and s["cr0"] == 0x11
    assert s["gdt"] == {"base": 0, "limit": 0, "padding": [0, 0, 0]}
    assert s["interrupt_bitmap"] == [0, 0, 0, 0]


def test_import_is_light():
    code = ("import sys, pykvm.kvm; "
            "heavy = [m for m in ('elftools', 'capstone', 'click', 'pycparser.ply.yacc_x') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- with /dev/kvm


def _require_kvm():
    """Skip when /dev/kvm is absent locally; in CI (CI=true) that is a failure."""
    if not os.path.exists("/dev/kvm"):
        reason = "/dev/kvm not present"
        if IN_CI:
            pytest.fail(reason + " (CI=true: KVM tests must run)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def kvm():
    _require_kvm()
    with Kvm.open() as k:
        yield k


GUEST_MEM = 0x10000
CODE_GPA = 0x1000


class RealModeGuest:
    """A VM with 64 KiB of RAM at GPA 0 and one vCPU starting in real mode at CODE_GPA."""

    def __init__(self, kvm, code, irqchip=False):
        self.vm = kvm.create_vm()
        self.vm.set_tss_addr(0xFFFBD000)  # needed by Intel VMX for real mode
        if irqchip:
            self.vm.create_irqchip()
        self.mem = mmap.mmap(-1, GUEST_MEM)
        self.mem[CODE_GPA:CODE_GPA + len(code)] = code
        self.vm.set_user_memory_region(0, 0, GUEST_MEM, buffer_address(self.mem))
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        self.vcpu.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *", {"rip": CODE_GPA, "rflags": 2})
        self.vcpu.set_regs(regs)

    def run(self):
        """Run until an exit other than EINTR/EAGAIN; return exit_reason."""
        while self.vcpu.run() != 0:
            pass
        return self.vcpu.run_ptr.exit_reason

    def close(self):
        self.vm.close()
        self.mem.close()


@pytest.fixture
def guest(kvm):
    made = []

    def make(code, **kw):
        g = RealModeGuest(kvm, bytes(code), **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


MOV_AL_42 = b"\xb0\x42"      # mov al, 0x42
OUT_10_AL = b"\xe6\x10"      # out 0x10, al
IN_AL_11 = b"\xe4\x11"       # in al, 0x11
OUT_12_AL = b"\xe6\x12"      # out 0x12, al
HLT = b"\xf4"
JMP_SELF = b"\xeb\xfe"       # jmp $


@pytest.mark.kvm
def test_system_queries(kvm):
    assert kvm.api_version() == 12
    assert kvm.check_extension(C.KVM_CAP_USER_MEMORY) > 0
    assert kvm.vcpu_mmap_size() >= max(RUN_SIZE, 4096)
    cpuid = kvm.supported_cpuid()
    functions = {cpuid.entries[i].function for i in range(cpuid.nent)}
    assert 0 in functions and 1 in functions
    msrs = kvm.msr_index_list()
    assert 0x10 in msrs  # IA32_TIME_STAMP_COUNTER


@pytest.mark.kvm
def test_supported_cpuid_grows_buffer_on_e2big(kvm):
    assert kvm.supported_cpuid(max_entries=1).nent > 1


@pytest.mark.kvm
def test_real_mode_guest_port_io_and_hlt(guest):
    g = guest(MOV_AL_42 + OUT_10_AL + IN_AL_11 + OUT_12_AL + HLT)
    run, mm = g.vcpu.run_ptr, g.vcpu.run_mmap

    assert g.run() == C.KVM_EXIT_IO
    assert (run.io.direction, run.io.size, run.io.port, run.io.count) == \
        (C.KVM_EXIT_IO_OUT, 1, 0x10, 1)
    # The same fields through the raw mmap, the way the hot loop reads them.
    assert struct.unpack_from("=I", mm, RUN_OFFSETS["exit_reason"])[0] == C.KVM_EXIT_IO
    assert struct.unpack_from("=H", mm, RUN_OFFSETS["io.port"])[0] == 0x10
    data_offset = struct.unpack_from("=Q", mm, RUN_OFFSETS["io.data_offset"])[0]
    assert data_offset == run.io.data_offset
    assert mm[data_offset] == 0x42

    assert g.run() == C.KVM_EXIT_IO
    assert (run.io.direction, run.io.port) == (C.KVM_EXIT_IO_IN, 0x11)
    mm[run.io.data_offset] = 0x99  # the value the guest's IN receives

    assert g.run() == C.KVM_EXIT_IO
    assert (run.io.direction, run.io.port) == (C.KVM_EXIT_IO_OUT, 0x12)
    assert mm[run.io.data_offset] == 0x99

    assert g.run() == C.KVM_EXIT_HLT
    assert g.vcpu.get_regs().rip == CODE_GPA + 9


@pytest.mark.kvm
def test_mmio_exit_outside_memory(guest):
    code = (b"\xbb\x00\x20"          # mov bx, 0x2000
            b"\x8e\xdb"              # mov ds, bx
            b"\xc6\x06\x00\x00\x77"  # mov byte [0], 0x77  -> GPA 0x20000, not backed
            + HLT)
    g = guest(code)
    assert g.run() == C.KVM_EXIT_MMIO
    mmio = g.vcpu.run_ptr.mmio
    assert (mmio.phys_addr, mmio.len, mmio.is_write, mmio.data[0]) == (0x20000, 1, 1, 0x77)
    assert g.run() == C.KVM_EXIT_HLT


@pytest.mark.kvm
def test_immediate_exit_returns_eintr(guest):
    g = guest(HLT)
    g.vcpu.immediate_exit = True
    assert g.vcpu.immediate_exit == 1
    assert g.vcpu.run() == errno.EINTR
    g.vcpu.immediate_exit = False
    assert g.run() == C.KVM_EXIT_HLT


@pytest.mark.kvm
def test_run_releases_gil_and_signal_kicks_vcpu_thread(guest):
    g = guest(JMP_SELF)
    result = {}

    def vcpu_thread():
        result["ret"] = g.vcpu.run()

    old = signal.signal(signal.SIGUSR1, lambda *a: None)
    try:
        t = threading.Thread(target=vcpu_thread)
        t.start()
        # The main thread keeps running Python while the guest spins: the GIL is free.
        spins = 0
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            spins += 1
        assert t.is_alive() and spins > 1000
        g.vcpu.immediate_exit = True  # closes the race if the signal lands outside KVM_RUN
        while t.is_alive():
            signal.pthread_kill(t.ident, signal.SIGUSR1)
            t.join(0.05)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert result["ret"] == errno.EINTR


@pytest.mark.kvm
def test_register_state_round_trips(guest):
    g = guest(HLT)
    v = g.vcpu
    regs = v.get_regs()
    regs.rbx = 0x1234
    v.set_regs(regs)
    assert regs_to_dict(v.get_regs())["rbx"] == 0x1234

    sregs = v.get_sregs()
    sregs.ds.base = 0x500
    sregs.ds.selector = 0x50
    v.set_sregs(sregs)
    assert sregs_to_dict(v.get_sregs())["ds"]["selector"] == 0x50

    fpu = v.get_fpu()
    fpu.xmm[1][0] = 0xAB
    v.set_fpu(fpu)
    assert v.get_fpu().xmm[1][0] == 0xAB

    events = v.get_vcpu_events()
    v.set_vcpu_events(events)

    v.set_msrs({0x174: 0x10})  # IA32_SYSENTER_CS
    assert v.get_msrs([0x174]) == {0x174: 0x10}
    with pytest.raises(KvmError) as info:
        v.get_msrs([0x174, 0xDEADBEEF])
    assert "0xdeadbeef" in str(info.value)

    v.set_cpuid2(g.vm.kvm.supported_cpuid())
    v.get_xcrs()

    assert v.get_mp_state() == C.KVM_MP_STATE_RUNNABLE
    # Paging is off in real mode: linear == physical.
    assert v.translate(0x1234) == (0x1234, True, True)
    v.set_guest_debug(C.KVM_GUESTDBG_ENABLE, [0] * 8)
    v.set_guest_debug(0)


@pytest.mark.kvm
def test_singlestep_reports_debug_exit(guest):
    g = guest(MOV_AL_42 + MOV_AL_42 + HLT)
    g.vcpu.set_guest_debug(C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP)
    assert g.run() == C.KVM_EXIT_DEBUG
    assert g.vcpu.run_ptr.debug.arch.exception == 1  # #DB
    assert g.vcpu.get_regs().rip == CODE_GPA + 2


@pytest.mark.kvm
def test_in_kernel_irqchip_and_interrupt_plumbing(guest):
    # With an in-kernel irqchip HLT waits in the kernel, so the guest ends on an OUT instead.
    g = guest(MOV_AL_42 + OUT_10_AL + OUT_12_AL + JMP_SELF, irqchip=True)
    vm, v = g.vm, g.vcpu
    lapic = v.get_lapic()
    v.set_lapic(lapic)
    vm.create_pit2(C.KVM_PIT_SPEAKER_DUMMY)
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    assert vm.signal_msi(0xFEE00000, 0x30) >= 0
    routes = [irqchip_route(pin, C.KVM_IRQCHIP_IOAPIC, pin) for pin in range(24)]
    routes.append(("msi", 24, 0xFEE00000, 0x31))
    vm.set_gsi_routing(routes)
    vm.register_coalesced_mmio(0xD0000000, 0x1000)
    vm.unregister_coalesced_mmio(0xD0000000, 0x1000)
    assert vm.get_clock().clock > 0

    irq = os.eventfd(0, os.EFD_NONBLOCK)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.irqfd(irq, 5)
        vm.irqfd(irq, 5, deassign=True)
        # The guest's OUT 0x10 now signals the eventfd inside the kernel: no exit for it.
        vm.ioeventfd(kick, 0x10, 1, datamatch=0x42, pio=True)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(kick)
        assert g.run() == C.KVM_EXIT_IO and v.run_ptr.io.port == 0x12
        assert os.eventfd_read(kick) == 1
        vm.ioeventfd(kick, 0x10, 1, datamatch=0x42, pio=True, deassign=True)
    finally:
        os.close(irq)
        os.close(kick)


@pytest.mark.kvm
def test_an_msi_no_lapic_accepts_is_dropped_not_an_error(kvm):
    # Lowest priority to logical destination 0xff while the LAPIC is software-disabled (its reset
    # state; logical ID 0 matches nothing): KVM answers EPERM, which the guest chose. Issue 19.
    with kvm.create_vm() as vm:
        if vm.check_extension(C.KVM_CAP_SPLIT_IRQCHIP):
            vm.enable_split_irqchip()
        else:
            vm.create_irqchip()
        vm.create_vcpu(0)
        assert vm.signal_msi(0xFEEFF00C, 0x0140) == 0          # redirection hint, logical, lowest priority
        assert vm.signal_msi(0xFEEFF004, 0x0040) == 0          # fixed, logical 0xff
        assert vm.signal_msi(0xFEE00000, 0x0030) >= 0          # APIC 0, physical: it exists


@pytest.mark.kvm
def test_split_irqchip_and_errors_name_the_ioctl(kvm):
    with kvm.create_vm() as vm:
        if vm.check_extension(C.KVM_CAP_SPLIT_IRQCHIP):
            vm.enable_split_irqchip()
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as info:
            vm.create_vcpu(0)
        assert info.value.errno == errno.EEXIST
        assert str(info.value) == "KVM_CREATE_VCPU failed: File exists"
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(1, 0x123, 0x1000, 0x1000)  # unaligned GPA
        assert info.value.errno == errno.EINVAL
        assert str(info.value).startswith("KVM_SET_USER_MEMORY_REGION failed")


@pytest.mark.kvm
def test_close_is_idempotent_and_run_after_close_fails(kvm):
    vm = kvm.create_vm()
    v = vm.create_vcpu(0)
    v.close()
    v.close()
    with pytest.raises(KvmError) as info:
        v.run()
    assert info.value.errno == errno.EBADF
    vm.close()
    vm.close()
