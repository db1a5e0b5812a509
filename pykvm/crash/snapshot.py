"""What the machine layer hands the crash layer about a dead (or paused) guest."""

from __future__ import annotations

from ..version import __version__
from ..memory import GuestMemory, GuestMemoryError
from ..record import field, record

# Every way a guest can die that the machine reports; core.py accepts any
# string, these are the ones the tools know how to explain.
TRIGGERS = (
    "exception",           # unhandled exception caught by the firmware stubs
    "triple-fault",        # KVM_EXIT_SHUTDOWN
    "internal-error",      # KVM_EXIT_INTERNAL_ERROR
    "fail-entry",          # KVM_EXIT_FAIL_ENTRY
    "system-event-crash",  # KVM_EXIT_SYSTEM_EVENT / CRASH
    "pvpanic",             # write to the pvpanic port
    "timeout",             # wall-clock limit hit
    "watchdog",            # guest stopped making progress
    "host-request",        # someone asked for a dump
    "vmm-error",           # the VMM itself failed while running the guest
)

# Guest-supplied text copied into the core is bounded; this equals
# PYKVM_CRASH_INFO_MAX in guests/include/pykvm_abi.h (a test checks it).
CRASH_INFO_MAX = 4096
# Only the end of the serial log is useful and it is guest-controlled.
SERIAL_TAIL_MAX = 64 * 1024

SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


@record
class VcpuState:
    """Registers of one vCPU as KVM reports them.

    regs: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags (ints).
    sregs: cs ds es fs gs ss tr ldt, each {base, limit, selector, type, present,
    dpl, db, s, l, g, avl}; gdt and idt, each {base, limit}; cr0 cr2 cr3 cr4 cr8
    efer apic_base (ints). Extra keys (padding, interrupt_bitmap) are ignored.
    fpu: fcw fsw ftwx last_opcode last_ip last_dp mxcsr (ints), fpr (8 x 16
    bytes), xmm (16 x 16 bytes); None when unavailable.
    mode: optional free text from the machine (recorded in the pykvm note).
    Missing keys read as 0; the crash layer decodes the mode itself.
    """

    index: int
    regs: dict
    sregs: dict
    fpu: dict | None
    mode: str = ""


@record
class CrashSnapshot:
    """Everything a core file records about one guest death.

    For trigger "exception" the crashing vCPU's regs already hold the state at
    the faulting instruction (from the firmware trap frame). crash_info is the
    guest's KEY=VALUE text (see read_crash_info); serial_tail the last bytes
    of COM1 output. Both are guest-controlled and bounded when written.
    """

    trigger: str
    reason: str
    vcpus: list[VcpuState]
    crashing_vcpu: int
    memory: GuestMemory
    vector: int | None = None
    error_code: int | None = None
    exit_reason: str | None = None
    serial_tail: bytes = b""
    config: dict = field(default_factory=dict)
    crash_info: bytes = b""
    bus: dict | None = None          # the partition bus's state (bus.host.BusHost.snapshot()), if any
    screen: bytes = b""              # the VGA text buffer (80x25 character/attribute pairs), guest-written
    screen_cursor: tuple[int, int] | None = None
    pykvm_version: str = __version__


def read_crash_info(mem: GuestMemory, addr: int, length: int, limit: int = CRASH_INFO_MAX) -> bytes:
    """The guest's crash-info blob at guest-physical `addr`, bounded by `limit`, clipped to RAM, b"" when unreadable."""
    # addr/len come straight from guest-written boot info: never trust them.
    if not addr or length <= 0:
        return b""
    length = min(length, limit)
    r = mem.region_of(addr)
    if r is None:
        return b""
    length = min(length, r.end - addr)
    try:
        blob = mem.read(addr, length)
    except GuestMemoryError:
        return b""
    nul = blob.find(b"\0")
    return blob if nul < 0 else blob[:nul]
