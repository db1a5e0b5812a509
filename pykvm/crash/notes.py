"""Binary layouts of the ELF core notes pykvm writes, packed and unpacked in one place.

- NT_PRSTATUS ("CORE", type 1): x86-64 `struct elf_prstatus`, 336 bytes; pr_reg is
  `struct user_regs_struct` (27 x u64) at offset 112.
- NT_FPREGSET ("CORE", type 2): `struct user_fpregs_struct`, the 512-byte FXSAVE image.
- QEMU CPU state ("QEMU", type 0): QEMUCPUState of QEMU's target/i386/arch_dump.c,
  version 1, 440 bytes (cr[5] then kernel_gs_base; KVM does not report the latter
  in sregs, so it is 0).
- pykvm ("PYKVM", type NT_PYKVM = 0x50594b01, "PYK" + format 1): UTF-8 JSON, see core.py.
- VMCOREINFO ("VMCOREINFO", type 0): the guest's KEY=VALUE crash-info text.
"""

from __future__ import annotations

import struct

NT_PRSTATUS = 1
NT_FPREGSET = 2
NT_QEMU = 0
NT_VMCOREINFO = 0
NT_PYKVM = 0x50594B01

NAME_CORE = "CORE"
NAME_QEMU = "QEMU"
NAME_PYKVM = "PYKVM"
NAME_VMCOREINFO = "VMCOREINFO"

_M64 = (1 << 64) - 1

# user_regs_struct order (asm/user_64.h); also pr_reg in elf_prstatus.
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
             "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
             "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")

# siginfo head (signo, code, errno), pr_cursig, pr_sigpend, pr_sighold,
# pid, ppid, pgrp, sid, four struct timeval, pr_reg, pr_fpvalid.
_PRSTATUS = struct.Struct("<iiih2xQQiiii64x27Qi4x")
PRSTATUS_SIZE = _PRSTATUS.size
assert PRSTATUS_SIZE == 336

# fcw, fsw, ftw (abridged), fop, rip, rdp, mxcsr, mxcsr_mask; then st/mm, xmm, padding.
_FXSAVE_HEAD = struct.Struct("<HHBxHQQII")
FPREGSET_SIZE = 512

QEMU_CPUSTATE_VERSION = 1
QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
# version, size, 18 registers, 10 segments {selector, limit, flags, pad, base}, cr[5], kernel_gs_base
_QEMU = struct.Struct("<II18Q" + "IIIIQ" * 10 + "5QQ")
QEMU_CPUSTATE_SIZE = _QEMU.size
assert QEMU_CPUSTATE_SIZE == 440


def _u(value, mask: int = _M64) -> int:
    """An int register value clipped to its width (missing or odd values become 0)."""
    try:
        return int(value) & mask
    except (TypeError, ValueError):
        return 0


def u64(value) -> int:
    """A register value as an unsigned 64-bit int (missing or odd values become 0)."""
    return _u(value)


def note(name: str, ntype: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    raw = name.encode() + b"\0"
    return (struct.pack("<III", len(raw), len(desc), ntype)
            + raw + bytes(-len(raw) % 4) + desc + bytes(-len(desc) % 4))


def pack_prstatus(pid: int, signo: int, user_regs: dict, fpvalid: bool) -> bytes:
    """elf_prstatus for one vCPU; user_regs is keyed by USER_REGS names."""
    return _PRSTATUS.pack(signo, 0, 0, signo, 0, 0, pid, 0, pid, pid,
                          *(_u(user_regs.get(k, 0)) for k in USER_REGS), int(fpvalid))


def unpack_prstatus(desc: bytes) -> dict:
    """pid, cursig and the user_regs_struct registers of an elf_prstatus."""
    f = _PRSTATUS.unpack_from(desc)
    return {"pid": f[6], "cursig": f[3], "regs": dict(zip(USER_REGS, f[10:37])), "fpvalid": f[37]}


def _reg16(blobs, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        b = bytes(blobs[i]) if blobs is not None and i < len(blobs) else b""
        out.append(b[:16].ljust(16, b"\0"))
    return out


def pack_fpregset(fpu: dict | None) -> bytes:
    """user_fpregs_struct (FXSAVE layout) from a KVM fpu dict; reset state when fpu is None."""
    fpu = fpu or {"fcw": 0x37F, "mxcsr": 0x1F80}
    head = _FXSAVE_HEAD.pack(_u(fpu.get("fcw", 0), 0xFFFF), _u(fpu.get("fsw", 0), 0xFFFF),
                             _u(fpu.get("ftwx", 0), 0xFF), _u(fpu.get("last_opcode", 0), 0xFFFF),
                             _u(fpu.get("last_ip", 0)), _u(fpu.get("last_dp", 0)),
                             _u(fpu.get("mxcsr", 0), 0xFFFFFFFF), 0xFFFF)
    body = head + b"".join(_reg16(fpu.get("fpr"), 8)) + b"".join(_reg16(fpu.get("xmm"), 16))
    return body.ljust(FPREGSET_SIZE, b"\0")


def unpack_fpregset(desc: bytes) -> dict:
    """The KVM-style fpu dict back from a user_fpregs_struct."""
    fcw, fsw, ftwx, fop, rip, rdp, mxcsr, _mask = _FXSAVE_HEAD.unpack_from(desc)
    fpr = [bytes(desc[32 + 16 * i:48 + 16 * i]) for i in range(8)]
    xmm = [bytes(desc[160 + 16 * i:176 + 16 * i]) for i in range(16)]
    return {"fcw": fcw, "fsw": fsw, "ftwx": ftwx, "last_opcode": fop, "last_ip": rip,
            "last_dp": rdp, "mxcsr": mxcsr, "fpr": fpr, "xmm": xmm}


def pack_qemu_cpustate(regs: dict, segments: dict, crs: tuple, kernel_gs_base: int = 0) -> bytes:
    """QEMUCPUState; segments maps QEMU_SEGMENTS names to (selector, limit, flags, base)."""
    seg_fields = []
    for name in QEMU_SEGMENTS:
        sel, limit, flags, base = segments.get(name, (0, 0, 0, 0))
        seg_fields += [_u(sel, 0xFFFFFFFF), _u(limit, 0xFFFFFFFF), _u(flags, 0xFFFFFFFF), 0, _u(base)]
    return _QEMU.pack(QEMU_CPUSTATE_VERSION, QEMU_CPUSTATE_SIZE,
                      *(_u(regs.get(k, 0)) for k in QEMU_GPRS), *seg_fields,
                      *(_u(c) for c in crs[:5]), _u(kernel_gs_base))


def unpack_qemu_cpustate(desc: bytes) -> dict:
    """Registers, segments {selector, limit, flags, base} and cr0..cr4 of a QEMUCPUState."""
    f = _QEMU.unpack_from(desc)
    regs = dict(zip(QEMU_GPRS, f[2:20]))
    segs = {}
    for i, name in enumerate(QEMU_SEGMENTS):
        sel, limit, flags, _pad, base = f[20 + 5 * i:25 + 5 * i]
        segs[name] = {"selector": sel, "limit": limit, "flags": flags, "base": base}
    crs = f[70:75]
    return {"version": f[0], "size": f[1], "regs": regs, "segments": segs,
            "cr0": crs[0], "cr2": crs[2], "cr3": crs[3], "cr4": crs[4], "kernel_gs_base": f[75]}
