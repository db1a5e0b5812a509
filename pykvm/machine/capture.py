"""Captures a stopped (or paused) VM's state as a CrashSnapshot and writes it as a core file."""

from __future__ import annotations

from .. import abi
from ..crash.snapshot import VcpuState, read_crash_info
from ..kvm import KvmError
from ..kvm.abi import ffi as kffi
from ..kvm.vcpu import regs_to_dict, sregs_to_dict

DEFAULT_CRASH_DIR = "crashes"


def fpu_to_dict(fpu) -> dict:
    """KVM's 'struct kvm_fpu' as the plain dict the crash layer expects."""
    return {
        "fcw": fpu.fcw, "fsw": fpu.fsw, "ftwx": fpu.ftwx, "last_opcode": fpu.last_opcode,
        "last_ip": fpu.last_ip, "last_dp": fpu.last_dp, "mxcsr": fpu.mxcsr,
        "fpr": [bytes(kffi.buffer(fpu.fpr[i])) for i in range(8)],
        "xmm": [bytes(kffi.buffer(fpu.xmm[i])) for i in range(16)],
    }


def vcpu_state(vcpu) -> VcpuState:
    """Registers of one vCPU that is not running (KVM serialises these ioctls with KVM_RUN)."""
    try:
        fpu = fpu_to_dict(vcpu.get_fpu())
    except KvmError:
        fpu = None
    return VcpuState(vcpu.index, regs_to_dict(vcpu.get_regs()), sregs_to_dict(vcpu.get_sregs()), fpu)


def apply_trap_frame(state: VcpuState, frame: dict) -> None:
    """Show the faulting instruction's state rather than the firmware stub's."""
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "rflags",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        state.regs[name] = frame[name]
    state.sregs["cs"]["selector"] = frame["cs"]
    state.sregs["ss"]["selector"] = frame["ss"]


def guest_crash_info(memory, plan) -> bytes:
    """The vmcoreinfo-style blob a pykvm-protocol guest registered in its boot info, if any."""
    if plan is None or plan.entry.mode != "long":
        return b""
    ffi = abi.ffi
    try:
        raw = memory.read(abi.PYKVM_BOOTINFO_ADDR, ffi.sizeof("struct pykvm_boot_info"))
    except Exception:
        return b""
    bi = ffi.from_buffer("struct pykvm_boot_info *", bytearray(raw))
    return read_crash_info(memory, bi.crash_info_addr, bi.crash_info_len)
