"""Boot information handed to guests: the pykvm boot-info block and the multiboot v1 info struct."""

from __future__ import annotations

import struct

from .. import abi
from ..version import __version__
from ..record import record

MMAP_RAM = abi.PYKVM_MMAP_RAM
MMAP_RESERVED = abi.PYKVM_MMAP_RESERVED
LOW_MEM_END = 0x100000

MB_INFO_MAGIC = 0x2BADB002
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9
MBI_SIZE = 116


@record
class Module:
    """A file placed in guest RAM for the kernel (multiboot module / initrd)."""

    addr: int
    size: int
    name: str


def memory_map(ram_spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(addr, len, type) entries: RAM minus the firmware area and the legacy hole below 1 MiB."""
    out = []
    for gpa, size in ram_spans:
        end = gpa + size
        if gpa < LOW_MEM_END:
            low_end = min(end, abi.PYKVM_FW_BASE)
            if gpa < low_end:
                out.append((gpa, low_end - gpa, MMAP_RAM))
            if end > abi.PYKVM_FW_BASE:
                out.append((abi.PYKVM_FW_BASE, min(end, LOW_MEM_END) - abi.PYKVM_FW_BASE, MMAP_RESERVED))
            if end > LOW_MEM_END:
                out.append((LOW_MEM_END, end - LOW_MEM_END, MMAP_RAM))
        else:
            out.append((gpa, size, MMAP_RAM))
    return out


def pykvm_boot_info(mmap: list[tuple[int, int, int]], nr_cpus: int, cmdline_len: int, ram_top: int,
                    initrd: Module | None, acpi_rsdp: int = 0, numa_info: int = 0) -> bytes:
    """The `struct pykvm_boot_info` bytes for PYKVM_BOOTINFO_ADDR."""
    ffi = abi.ffi
    bi = ffi.new("struct pykvm_boot_info *")
    bi.magic = abi.PYKVM_BOOT_MAGIC
    bi.version = abi.PYKVM_ABI_VERSION
    bi.size = ffi.sizeof(bi[0])
    bi.nr_cpus = nr_cpus
    bi.cmdline_addr = abi.PYKVM_CMDLINE_ADDR
    bi.cmdline_len = cmdline_len
    bi.ram_top = ram_top
    bi.acpi_rsdp_addr = acpi_rsdp
    bi.numa_info_addr = numa_info
    if initrd:
        bi.initrd_addr, bi.initrd_len = initrd.addr, initrd.size
    entries = mmap[:abi.PYKVM_MAX_MMAP]
    bi.nr_mmap = len(entries)
    for i, (addr, length, kind) in enumerate(entries):
        bi.mmap[i].addr, bi.mmap[i].len, bi.mmap[i].type = addr, length, kind
    return bytes(ffi.buffer(bi))


def multiboot_info(base: int, mmap: list[tuple[int, int, int]], cmdline_addr: int,
                   modules: list[Module], module_names_at: int) -> tuple[bytes, bytes]:
    """The multiboot info struct at `base` followed by its mmap and module list.

    Returns (info_block, module_name_strings) where the strings go to `module_names_at`.
    """
    mem_lower = next((l for a, l, t in mmap if a == 0 and t == MMAP_RAM), 0) // 1024
    mem_upper = next((l for a, l, t in mmap if a == LOW_MEM_END and t == MMAP_RAM), 0) // 1024
    mmap_blob = b"".join(struct.pack("<IQQI", 20, a, l, t) for a, l, t in mmap)
    names = bytearray()
    mods_blob = bytearray()
    for m in modules:
        mods_blob += struct.pack("<IIII", m.addr, m.addr + m.size, module_names_at + len(names), 0)
        names += m.name.encode() + b"\0"
    loader_name_at = module_names_at + len(names)
    names += f"pykvm {__version__}".encode() + b"\0"
    mmap_addr = base + MBI_SIZE
    mods_addr = mmap_addr + len(mmap_blob)
    flags = MBI_MEMORY | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME | MBI_MODS
    info = bytearray(MBI_SIZE)
    struct.pack_into("<IIIIIII", info, 0, flags, mem_lower, mem_upper, 0xFFFFFFFF, cmdline_addr,
                     len(modules), mods_addr)
    struct.pack_into("<II", info, 44, len(mmap_blob), mmap_addr)
    struct.pack_into("<I", info, 64, loader_name_at)
    return bytes(info) + mmap_blob + bytes(mods_blob), bytes(names)


def numa_info(cfg, layouts) -> bytes:
    """The `struct pykvm_numa_info` bytes for PYKVM_NUMA_INFO_ADDR (cfg: memory.numa.NumaConfig)."""
    ffi = abi.ffi
    ni = ffi.new("struct pykvm_numa_info *")
    ni.magic = abi.PYKVM_NUMA_MAGIC
    ni.size = ffi.sizeof(ni[0])
    ni.nr_nodes = len(cfg.nodes)
    for i, row in enumerate(cfg.distances):
        for j, d in enumerate(row):
            ni.distance[i][j] = d
    for n, (spec, lay) in enumerate(zip(cfg.nodes, layouts)):
        node = ni.nodes[n]
        if len(lay.ranges) > abi.PYKVM_NUMA_MAX_RANGES:
            raise ValueError(f"node {n} has {len(lay.ranges)} RAM ranges; the boot info holds {abi.PYKVM_NUMA_MAX_RANGES}")
        node.nr_ranges = len(lay.ranges)
        for i, (addr, length) in enumerate(lay.ranges):
            node.ranges[i].addr, node.ranges[i].len = addr, length
        node.nr_cpus = len(spec.cpus)
        for c in spec.cpus:
            node.cpus[c // 64] |= 1 << (c % 64)
        node.hotadd_addr, node.hotadd_len = lay.hotadd
    return bytes(ffi.buffer(ni))
