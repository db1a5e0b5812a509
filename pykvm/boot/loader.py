"""Places a kernel, its modules, the firmware and the boot tables in guest RAM and says how to enter it."""

from __future__ import annotations

import os

from .. import abi
from ..errors import ImageDoesNotFitError, MemorySizeError, UsageError
from ..memory import PAGE_SIZE, GuestMemory
from ..record import field, record
from . import acpi, bootinfo, tables
from .firmware import Firmware
from .image import (PROTOCOL_FLAT, PROTOCOL_LINUX, PROTOCOL_MULTIBOOT, PROTOCOL_PVH, PROTOCOL_PYKVM64, KernelImage,
                    LoadSegment)
from .paging import build_boot_page_tables

PAGE = PAGE_SIZE
MBI_NAMES_OFFSET = 2048
# Boot tables beyond the firmware area may take this much from the top of RAM: with 2 MiB pages
# that maps 8 TiB (one 4 KiB directory per GiB); with 1 GiB pages, any RAM the address width allows.
MAX_TABLE_SPILL = 32 << 20
# Linux's boot_params or PVH's hvm_start_info take the page multiboot info uses; the Linux boot
# GDT sits after pykvm's own GDT, in the same page, below the TSS.
FOREIGN_INFO_ADDR = abi.PYKVM_MBI_ADDR
LINUX_GDT_ADDR = abi.PYKVM_GDT_ADDR + 0x400


@record
class EntryState:
    """The BSP's register state at entry, independent of KVM structures."""

    mode: str                    # "long", "protected" or "real"
    rip: int
    rsp: int = 0
    cr3: int = 0
    gprs: dict[str, int] = field(default_factory=dict)
    gdt: tuple[int, int] | None = None          # (base, limit) instead of pykvm's GDT
    selectors: tuple[int, int] | None = None    # (code, data) selectors in that GDT


@record(frozen=True)
class BootCpu:
    """What the loaders must respect of the guest's CPU model."""

    gib_pages: bool = False      # CPUID pdpe1gb: boot page tables may use 1 GiB leaves
    x2apic: bool = True          # CPUID x2apic: ACPI may describe x2APIC-only ids


@record
class BootPlan:
    """What the loader did: the entry state and what a crash report wants to know."""

    entry: EntryState
    image: KernelImage
    modules: list[bootinfo.Module]
    memory_map: list[tuple[int, int, int]]
    cmdline: bytes
    acpi: acpi.AcpiTables | None = None


# Guest-physical areas pykvm fills at boot; a kernel segment or module must stay out of them.
RESERVED_AREAS = ((abi.PYKVM_FW_BASE, abi.PYKVM_FW_END, "pykvm's firmware area"),
                  (abi.PYKVM_ACPI_RSDP_ADDR, abi.PYKVM_ACPI_END, "pykvm's ACPI tables"))


def _check_fits(mem: GuestMemory, seg: LoadSegment, what: str) -> None:
    for lo, hi, name in RESERVED_AREAS:
        if seg.paddr < hi and seg.pend > lo:
            raise ImageDoesNotFitError(f"{what} at {seg.paddr:#x}-{seg.pend:#x} overlaps {name} "
                                       f"{lo:#x}-{hi:#x}; link it at 1 MiB or above")
    if not mem.is_ram(seg.paddr, seg.memsz):
        need = (seg.pend + (1 << 20) - 1) >> 20
        raise ImageDoesNotFitError(f"{what} needs guest RAM at {seg.paddr:#x}-{seg.pend:#x} but the VM has "
                                   f"{mem.size >> 20} MiB ({', '.join(f'{r.gpa:#x}-{r.end:#x}' for r in mem.regions)}); "
                                   f"try --mem {max(need + 1, 2)}M or more")


def _acpi_tables(mem: GuestMemory, nr_cpus: int, topology: acpi.Topology | None,
                 platform: acpi.Platform | None) -> acpi.AcpiTables:
    """Build the ACPI tables for this VM, checking a given topology against its vCPUs and RAM."""
    topology = topology if topology is not None else acpi.default_topology(nr_cpus)
    if len(topology.apic_ids) != nr_cpus:
        raise UsageError(f"ACPI topology lists {len(topology.apic_ids)} vCPUs but the VM has {nr_cpus}")
    for n, node in enumerate(topology.nodes):
        for base, length in node.memory:
            if not (isinstance(base, int) and isinstance(length, int) and mem.is_ram(base, length)):
                raise UsageError(f"ACPI topology: node {n} memory {base!r}+{length!r} is not guest RAM")
    return acpi.build_tables(topology, platform if platform is not None else acpi.Platform())


def numa_topology(ncfg, layouts, nr_cpus: int) -> acpi.Topology:
    """The ACPI view of a vNUMA layout: vCPU i has APIC id i; hot-add ranges are hot-pluggable."""
    nodes = tuple(acpi.Node(cpus=tuple(spec.cpus), memory=tuple(lay.ranges),
                            hotplug=(lay.hotadd,) if lay.hotadd[1] else ())
                  for spec, lay in zip(ncfg.nodes, layouts))
    return acpi.Topology(apic_ids=tuple(range(nr_cpus)), nodes=nodes, distances=ncfg.distances)


def _load_segment(mem: GuestMemory, seg: LoadSegment) -> None:
    mem.write(seg.paddr, seg.data)
    if seg.memsz > len(seg.data):  # bss; RAM may hold an earlier boot's bytes when reused
        mem.view(seg.paddr + len(seg.data), seg.memsz - len(seg.data))[:] = bytes(seg.memsz - len(seg.data))


def _load_initrd(mem: GuestMemory, image: KernelImage, path: str) -> bootinfo.Module:
    """The initrd in the first page above the kernel (and above 1 MiB), as the boot module."""
    with open(path, "rb") as f:
        data = f.read()
    addr = (max(image.physical_end, 1 << 20) + PAGE - 1) & ~(PAGE - 1)
    seg = LoadSegment(addr, addr, data, max(len(data), 1))
    _check_fits(mem, seg, f"initrd {path}")
    _load_segment(mem, seg)
    return bootinfo.Module(addr, len(data), path)


def _check_address_width(mem: GuestMemory, phys_bits: int) -> None:
    """RAM must lie below 2^MAXPHYADDR: the boot tables could not map it, nor the guest use it."""
    if phys_bits and mem.top > 1 << phys_bits:
        raise MemorySizeError(f"guest RAM would end at {mem.top:#x}, beyond the {1 << (phys_bits - 30)} GiB "
                              f"that this CPU's {phys_bits}-bit physical addresses reach; use a smaller --mem")


def _reserve(mmap: list[tuple[int, int, int]], start: int, end: int) -> list[tuple[int, int, int]]:
    """The memory map with [start, end) carved out of its RAM entry and marked reserved."""
    out = []
    for addr, length, kind in mmap:
        a, b = max(addr, start), min(addr + length, end)
        if kind != bootinfo.MMAP_RAM or a >= b:
            out.append((addr, length, kind))
            continue
        if addr < a:
            out.append((addr, a - addr, kind))
        out.append((a, b - a, bootinfo.MMAP_RESERVED))
        if b < addr + length:
            out.append((b, addr + length - b, kind))
    return out


@record
class _Boot:
    """What a protocol's entry function works from: the RAM as loaded so far and what its boot info says."""

    mem: GuestMemory
    image: KernelImage
    mmap: list[tuple[int, int, int]]     # the memory map so far (the protocol may carve it further)
    cmdline_len: int                     # the command line is at PYKVM_CMDLINE_ADDR
    modules: list[bootinfo.Module]
    rsdp: int
    cpu: BootCpu
    nr_cpus: int
    numa: tuple | None                   # (NumaConfig, [NodeLayout]) or None
    map_top: int                         # what the boot page tables must map (RAM and hot-add ranges)
    phys_bits: int


def load(mem: GuestMemory, image: KernelImage, firmware: Firmware, nr_cpus: int, cmdline: str = "",
         argv0: str = "", initrd=None, acpi_platform: acpi.Platform | None = None,
         acpi_topology: acpi.Topology | None = None, numa=None, *, gib_pages: bool = False,
         phys_bits: int = 0, cpu: BootCpu | None = None) -> BootPlan:
    """Write everything the guest needs at boot into `mem` and return the BSP's entry state.

    Every guest gets ACPI tables; `acpi_platform` says which interrupt controllers and PM
    ports they advertise (default: LAPICs only), `acpi_topology` the vNUMA layout (default:
    vCPU i has APIC id i, no nodes). gib_pages: the guest's CPUID offers 1 GiB pages
    (boot.cpu.gib_pages_offered); phys_bits: its MAXPHYADDR (boot.cpu.phys_addr_bits), 0 when unknown.
    `numa` is (memory.numa.NumaConfig, [NodeLayout]): the
    nodes go into the SRAT/SLIT and the boot info's NUMA block, and the boot page tables also
    map the hot-add ranges (so memory plugged in later is reachable without new tables).
    `cpu`: what the CPU model offers (default: host; its gib_pages overrides `gib_pages`).
    """
    if cpu is None:
        cpu = BootCpu(gib_pages=gib_pages)
    if not cpu.x2apic and acpi_topology is not None and max(acpi_topology.apic_ids, default=0) > 0xFE:
        raise UsageError("--cpu -x2apic: APIC ids above 254 need x2APIC")
    map_top = mem.top
    if numa is not None:
        ncfg, layouts = numa
        acpi_topology = numa_topology(ncfg, layouts, nr_cpus)
        map_top = max([map_top] + [b + n for b, n in (lay.hotadd for lay in layouts)])
    acpi_tables = _acpi_tables(mem, nr_cpus, acpi_topology, acpi_platform)
    for i, seg in enumerate(image.segments):
        _check_fits(mem, seg, f"kernel segment {i}")
    for seg in firmware.segments:
        _load_segment(mem, seg)
    for seg in image.segments:
        _load_segment(mem, seg)

    modules = [] if initrd is None else [_load_initrd(mem, image, os.fspath(initrd))]

    mmap = bootinfo.memory_map([(r.gpa, r.size) for r in mem.regions])
    if image.protocol == PROTOCOL_MULTIBOOT:
        # QEMU's -kernel convention: argv[0] is the kernel's name, then the user's command line
        line = " ".join(p for p in (argv0 or image.path, cmdline) if p)
    else:
        line = cmdline
    raw = line.encode()
    if len(raw) >= abi.PYKVM_CMDLINE_MAX:
        raise ImageDoesNotFitError(f"command line is {len(raw)} bytes; at most {abi.PYKVM_CMDLINE_MAX - 1} fit")
    mem.write(abi.PYKVM_CMDLINE_ADDR, raw + b"\0")

    mem.write(abi.PYKVM_GDT_ADDR, tables.gdt())
    mem.write(abi.PYKVM_TSS_ADDR, tables.tss64())
    mem.write(abi.PYKVM_IDT64_ADDR, tables.idt64(firmware.stubs64))
    mem.write(abi.PYKVM_IDT32_ADDR, tables.idt32(firmware.stubs32))
    acpi.write_tables(mem, acpi_tables)

    boot = _Boot(mem, image, mmap, len(raw), modules, acpi_tables.rsdp_addr, cpu, nr_cpus, numa, map_top, phys_bits)
    entry, mmap = _PROTOCOLS[image.protocol](boot)
    return BootPlan(entry, image, modules, mmap, raw, acpi_tables)


def _pykvm64(b: _Boot) -> tuple[EntryState, list]:
    """pykvm's own protocol (ELF64, 64-bit flat): long mode on boot page tables, pykvm_boot_info in RDI."""
    mem, image, mmap = b.mem, b.image, b.mmap
    virt = [(s.vaddr, s.paddr, s.memsz) for s in image.segments]
    _check_address_width(mem, b.phys_bits)
    # Tables that do not fit the firmware area go to the top of the highest RAM region,
    # above everything loaded, and are reserved in the memory map the guest gets.
    top = mem.regions[-1]
    floor = max(top.gpa, 1 << 20, top.end - MAX_TABLE_SPILL,
                *(s.pend for s in image.segments), *(m.addr + m.size for m in b.modules))
    pts = build_boot_page_tables(abi.PYKVM_PAGETABLE_ADDR, abi.PYKVM_FW_END, b.map_top, virt,
                                 gib_pages=b.cpu.gib_pages, spill_top=top.end, spill_floor=floor)
    for addr, data in pts.chunks():
        mem.write(addr, data)
    if pts.spill_range is not None:
        mmap = _reserve(mmap, *pts.spill_range)
    numa_at = 0
    if b.numa is not None:
        mem.write(abi.PYKVM_NUMA_INFO_ADDR, bootinfo.numa_info(*b.numa))
        numa_at = abi.PYKVM_NUMA_INFO_ADDR
    mem.write(abi.PYKVM_BOOTINFO_ADDR,
              bootinfo.pykvm_boot_info(mmap, b.nr_cpus, b.cmdline_len, mem.top, b.modules[0] if b.modules else None,
                                       acpi_rsdp=b.rsdp, numa_info=numa_at))
    entry = EntryState("long", image.entry, rsp=abi.PYKVM_BOOT_STACK_TOP, cr3=pts.root,
                       gprs={"rdi": abi.PYKVM_BOOTINFO_ADDR, "rsi": abi.PYKVM_BOOT_MAGIC})
    return entry, mmap


def _multiboot(b: _Boot) -> tuple[EntryState, list]:
    """Multiboot v1 (and 16/32-bit flat images): the multiboot information page, EAX magic, EBX pointer."""
    mem, image = b.mem, b.image
    info, names = bootinfo.multiboot_info(abi.PYKVM_MBI_ADDR, b.mmap, abi.PYKVM_CMDLINE_ADDR, b.modules,
                                          abi.PYKVM_MBI_ADDR + MBI_NAMES_OFFSET)
    if len(info) > MBI_NAMES_OFFSET or len(names) > PAGE - MBI_NAMES_OFFSET:
        raise ImageDoesNotFitError("multiboot information (memory map, module names) exceeds its 4 KiB page")
    mem.write(abi.PYKVM_MBI_ADDR, info)
    mem.write(abi.PYKVM_MBI_ADDR + MBI_NAMES_OFFSET, names)
    mode = "real" if image.bits == 16 else "protected"
    # Multiboot leaves ESP undefined; a valid one lets a fault before the kernel sets up
    # its own stack reach the firmware stubs instead of triple-faulting.
    entry = EntryState(mode, image.entry, rsp=abi.PYKVM_BOOT_STACK_TOP if mode == "protected" else 0,
                       gprs={"rax": bootinfo.MB_INFO_MAGIC, "rbx": abi.PYKVM_MBI_ADDR})
    return entry, b.mmap


def _flat(b: _Boot) -> tuple[EntryState, list]:
    """A flat binary: entered as pykvm's own 64-bit protocol, or as multiboot in 16/32-bit modes."""
    return (_pykvm64 if b.image.bits == 64 else _multiboot)(b)


def _linux(b: _Boot) -> tuple[EntryState, list]:
    """The x86 boot protocol (bzImage): boot_params and the 64-bit entry on identity-mapped RAM."""
    from . import linux

    mem, mmap = b.mem, _linux_low_memory(b.mem, b.mmap)
    initrd = (b.modules[0].addr, b.modules[0].size) if b.modules else None
    mem.write(FOREIGN_INFO_ADDR, linux.boot_params(b.image.setup, mmap, abi.PYKVM_CMDLINE_ADDR, b.cmdline_len,
                                                   initrd, b.rsdp))
    # The protocol asks for an identity map of the kernel, boot_params and the command line: all
    # of RAM and the low 4 GiB are.
    pts = build_boot_page_tables(abi.PYKVM_PAGETABLE_ADDR, abi.PYKVM_FW_END, mem.top, [], gib_pages=b.cpu.gib_pages)
    for addr, data in pts.chunks():
        mem.write(addr, data)
    gdt = linux.boot_gdt()
    mem.write(LINUX_GDT_ADDR, gdt)
    entry = EntryState("long", b.image.entry, rsp=abi.PYKVM_BOOT_STACK_TOP, cr3=pts.root,
                       gprs={"rsi": FOREIGN_INFO_ADDR}, gdt=(LINUX_GDT_ADDR, len(gdt) - 1),
                       selectors=(linux.BOOT_CS, linux.BOOT_DS))
    return entry, mmap


def _pvh(b: _Boot) -> tuple[EntryState, list]:
    """Xen PVH: hvm_start_info in EBX and the 32-bit protected-mode entry."""
    from . import linux

    mem, mmap = b.mem, _linux_low_memory(b.mem, b.mmap)
    info = linux.hvm_start_info(FOREIGN_INFO_ADDR, mmap, abi.PYKVM_CMDLINE_ADDR,
                                [(m.addr, m.size) for m in b.modules], b.rsdp)
    mem.write(FOREIGN_INFO_ADDR, info)
    entry = EntryState("protected", b.image.entry, rsp=abi.PYKVM_BOOT_STACK_TOP, gprs={"rbx": FOREIGN_INFO_ADDR})
    return entry, mmap


# How each boot protocol (KernelImage.protocol) enters the guest
_PROTOCOLS = {PROTOCOL_PYKVM64: _pykvm64, PROTOCOL_MULTIBOOT: _multiboot, PROTOCOL_FLAT: _flat,
              PROTOCOL_LINUX: _linux, PROTOCOL_PVH: _pvh}


# Linux keeps the low 64 KiB and everything from the BIOS data area's base-memory size up to
# 1 MiB for itself, and needs a few pages below 1 MiB outside those for its real-mode trampoline
# (APs, resume): it gets the part of pykvm's firmware area that only pykvm's boot page tables use,
# since Linux has replaced them by the time it allocates memory.
LINUX_LOW_RAM = (abi.PYKVM_PAGETABLE_ADDR, abi.PYKVM_FW_END)
BDA_BASE_MEMORY_KIB = 0x413


def linux_memory_map(mmap: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The memory map for Linux: pykvm's reserved low area split so [PAGETABLE_ADDR, FW_END) is RAM."""
    lo, hi = LINUX_LOW_RAM
    out = []
    for addr, length, kind in mmap:
        end = addr + length
        if kind == bootinfo.MMAP_RESERVED and addr <= lo and hi <= end:
            for a, e, k in ((addr, lo, kind), (lo, hi, bootinfo.MMAP_RAM), (hi, end, kind)):
                if e > a:
                    out.append((a, e - a, k))
        else:
            out.append((addr, length, kind))
    return out


def _linux_low_memory(mem: GuestMemory, mmap) -> list[tuple[int, int, int]]:
    """Linux's view of low memory: the trampoline area as RAM in the map, and the BDA's base memory size."""
    # the BIOS data area's base memory size, which Linux reads to find where the "EBDA" starts
    mem.write(BDA_BASE_MEMORY_KIB, (LINUX_LOW_RAM[1] >> 10).to_bytes(2, "little"))
    return linux_memory_map(mmap)
