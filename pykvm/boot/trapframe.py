"""Parses the trap frame the firmware exception stubs leave on the guest stack (untrusted guest data)."""

from __future__ import annotations

from .. import abi

EXCEPTIONS = {
    0: ("#DE", "divide error"), 1: ("#DB", "debug"), 2: ("NMI", "non-maskable interrupt"),
    3: ("#BP", "breakpoint"), 4: ("#OF", "overflow"), 5: ("#BR", "bound range exceeded"),
    6: ("#UD", "invalid opcode"), 7: ("#NM", "device not available"), 8: ("#DF", "double fault"),
    9: ("CSO", "coprocessor segment overrun"), 10: ("#TS", "invalid TSS"), 11: ("#NP", "segment not present"),
    12: ("#SS", "stack-segment fault"), 13: ("#GP", "general protection fault"), 14: ("#PF", "page fault"),
    16: ("#MF", "x87 floating-point exception"), 17: ("#AC", "alignment check"), 18: ("#MC", "machine check"),
    19: ("#XM", "SIMD floating-point exception"), 20: ("#VE", "virtualization exception"),
    21: ("#CP", "control protection exception"), 28: ("#HV", "hypervisor injection exception"),
    29: ("#VC", "VMM communication exception"), 30: ("#SX", "security exception"),
}

GPR64 = ("r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8", "rbp", "rdi", "rsi", "rdx", "rcx", "rbx", "rax")
GPR32 = ("edi", "esi", "ebp", "esp_pusha", "ebx", "edx", "ecx", "eax")


def exception_name(vector: int) -> str:
    """'#PF page fault' style name of an exception vector."""
    short, long_ = EXCEPTIONS.get(vector, (f"vector {vector}", "interrupt" if vector >= 32 else "reserved"))
    return f"{short} {long_}"


def frame_size(long_mode: bool) -> int:
    """Bytes of trap frame to read for the guest's mode."""
    return abi.ffi.sizeof("struct pykvm_trap_frame64" if long_mode else "struct pykvm_trap_frame32")


def parse(raw: bytes, long_mode: bool, stub_rsp: int) -> dict:
    """Registers at the faulting instruction, plus vector and error code, from the frame bytes.

    Returned keys use 64-bit names (rax, ..., rip, rflags, rsp, cs, ss) so callers need not care
    which stub ran. The vector is bounded to 0-255 whatever the guest wrote there.
    """
    ffi = abi.ffi
    if long_mode:
        f = ffi.from_buffer("struct pykvm_trap_frame64 *", bytearray(raw))
        out = {name: getattr(f, name) for name in GPR64}
        out.update(rip=f.rip, cs=f.cs & 0xFFFF, rflags=f.rflags, rsp=f.rsp, ss=f.ss & 0xFFFF)
    else:
        f = ffi.from_buffer("struct pykvm_trap_frame32 *", bytearray(raw))
        out = {"r" + name[1:]: getattr(f, name) for name in GPR32 if name != "esp_pusha"}
        for r in ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
            out[r] = 0
        # same-privilege 32-bit frame: the interrupted ESP is just past EFLAGS
        out.update(rip=f.eip, cs=f.cs & 0xFFFF, rflags=f.eflags,
                   rsp=(stub_rsp + ffi.sizeof("struct pykvm_trap_frame32")) & 0xFFFFFFFF, ss=abi.PYKVM_SEL_DATA)
    out["vector"] = f.vector & 0xFF
    out["error_code"] = f.error_code & 0xFFFFFFFF
    return out
