"""CPU set-up at boot: CPUID per vCPU and the BSP's registers for long, protected or real mode."""

from __future__ import annotations

from .. import abi
from ..memory.pagewalk import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE
from .cpumodel import CpuModel, apply_model, check_available, has
from .loader import BootCpu, EntryState

# Bits the page walker also needs come from memory.pagewalk; these matter only at boot.
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10

SEG_CODE = 0xB   # execute/read, accessed
SEG_DATA = 0x3   # read/write, accessed
SEG_TSS_BUSY = 0xB


def cpuid_for_vcpu(supported, index: int, ffi, model: CpuModel | None = None):
    """A copy of KVM's supported CPUID shaped by `model`, with this vCPU's APIC ids and the hypervisor bit."""
    n = supported.nent
    out = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
    ffi.memmove(out.entries, supported.entries, n * ffi.sizeof("struct kvm_cpuid_entry2"))
    if model is not None:
        apply_model(model, [out.entries[i] for i in range(n)])
    for i in range(n):
        e = out.entries[i]
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (index << 24)
            e.ecx |= 1 << 31                       # running under a hypervisor
        elif e.function in (0xB, 0x1F):
            e.edx = index                          # x2APIC id
    return out


def nx_supported(supported, model: CpuModel | None = None) -> bool:
    """True when CPUID 0x80000001 EDX.NX is offered (and the model does not hide it)."""
    return guest_has(supported, "nx", model)


def check_model(supported, model: CpuModel) -> None:
    """UsageError when the model asks for a feature this host's KVM lacks."""
    check_available(model, [supported.entries[i] for i in range(supported.nent)])


def boot_features(supported, model: CpuModel | None = None) -> BootCpu:
    """What the loaders need to know about the guest's CPU (large pages, x2APIC)."""
    return BootCpu(gib_pages=guest_has(supported, "pdpe1gb", model), x2apic=guest_has(supported, "x2apic", model))


def guest_has(supported, feature: str, model: CpuModel | None = None) -> bool:
    """Whether a guest under `model` (default: host) sees `feature` in CPUID."""
    return has(model or CpuModel(), [supported.entries[i] for i in range(supported.nent)], feature)


def _leaf(supported, function: int):
    for i in range(supported.nent):
        if supported.entries[i].function == function:
            return supported.entries[i]
    return None


def gib_pages_offered(supported) -> bool:
    """True when CPUID 0x80000001 EDX.Page1GB (pdpe1gb) is offered, so boot tables may use 1 GiB pages.

    Guests get KVM's supported CPUID unchanged (cpuid_for_vcpu), so this is also what the guest sees.
    Nested KVM may leave it out even when the host CPU has it; then the tables use 2 MiB pages.
    """
    e = _leaf(supported, 0x80000001)
    return bool(e is not None and e.edx & (1 << 26))


def phys_addr_bits(supported) -> int:
    """MAXPHYADDR from CPUID 0x80000008 EAX[7:0] (36 when the leaf is missing, as the SDM says)."""
    e = _leaf(supported, 0x80000008)
    return (e.eax & 0xFF) if e is not None and e.eax & 0xFF else 36


def _seg(s, selector: int, base: int, limit: int, type_: int, *, s_flag=1, db=0, l=0, g=1, present=1):
    s.selector, s.base, s.limit, s.type = selector, base, limit, type_
    s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl = present, 0, db, s_flag, l, g, 0
    s.unusable = 0 if present else 1


def real_mode_reset(vcpu, vector: int) -> None:
    """Put a vCPU in real mode at `vector` (CS = vector >> 4, IP = vector & 0xf), paging and long mode off: an S3 resume."""
    sregs = vcpu.get_sregs()
    regs = vcpu.get_regs()
    seg = vector >> 4
    # cffi hands out a fresh cdata per field access, so identity tests against sregs.cs never match.
    _seg(sregs.cs, seg, seg << 4, 0xFFFF, SEG_CODE, g=0)
    for s in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _seg(s, 0, 0, 0xFFFF, SEG_DATA, g=0)
    sregs.cr0 = CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF
    regs.rip = vector & 0xF
    regs.rflags = 0x2
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)


def apply_entry(vcpu, entry: EntryState, nx: bool) -> None:
    """Load the BSP with the entry state: segments, control registers, descriptor tables, GPRs."""
    sregs = vcpu.get_sregs()
    regs = vcpu.get_regs()
    if entry.mode == "real":
        seg = (entry.rip >> 4) & 0xF000
        _seg(sregs.cs, seg, seg << 4, 0xFFFF, SEG_CODE, g=0)
        for s in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _seg(s, seg, seg << 4, 0xFFFF, SEG_DATA, g=0)
        regs.rip = entry.rip - (seg << 4)
        regs.rflags = 0x2
    else:
        long_mode = entry.mode == "long"
        code, data = entry.selectors or (abi.PYKVM_SEL_CODE64 if long_mode else abi.PYKVM_SEL_CODE32,
                                         abi.PYKVM_SEL_DATA)
        _seg(sregs.cs, code, 0, 0xFFFFFFFF, SEG_CODE, db=0 if long_mode else 1, l=1 if long_mode else 0)
        for s in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _seg(s, data, 0, 0xFFFFFFFF, SEG_DATA, db=1)
        _seg(sregs.tr, abi.PYKVM_SEL_TSS, abi.PYKVM_TSS_ADDR, 0x67, SEG_TSS_BUSY, s_flag=0, g=0)
        sregs.gdt.base, sregs.gdt.limit = entry.gdt or (abi.PYKVM_GDT_ADDR, abi.PYKVM_SEL_TSS + 15)
        if long_mode:
            sregs.idt.base, sregs.idt.limit = abi.PYKVM_IDT64_ADDR, 256 * 16 - 1
            sregs.cr3 = entry.cr3
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
            sregs.efer = EFER_LME | EFER_LMA | (EFER_NXE if nx else 0)
        else:
            sregs.idt.base, sregs.idt.limit = abi.PYKVM_IDT32_ADDR, 256 * 8 - 1
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
            sregs.cr4 = 0
            sregs.efer = 0
        regs.rip = entry.rip
        regs.rsp = entry.rsp
        regs.rflags = 0x2
    for name, value in entry.gprs.items():
        setattr(regs, name, value)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
