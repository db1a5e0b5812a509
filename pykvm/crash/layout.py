"""Decide the PT_LOAD segments of a core: guest RAM by physical address, plus each address space's virtual mappings.

Guest RAM is stored once, one segment per RAM region, at file offsets relative to
the start of the data area. Virtual segments point into those same bytes. gdb
reads overlapping segments first-match-wins, so the crashing vCPU's address
space comes first, then the other address spaces, then the identity view.
"""

from __future__ import annotations

from ..memory import GuestMemory
from ..memory.pagewalk import (CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, DEFAULT_MAX_ENTRIES, DEFAULT_MAX_TABLES,
                               EFER_LMA, EFER_NXE, WalkStats, paging_mode, walk)
from ..record import field, record
from .notes import u64
from .snapshot import CrashSnapshot

PF_X, PF_W, PF_R = 1, 2, 4
# Address spaces are not deduplicated against each other (a shared kernel half
# appears once per CR3): the reader resolves a vCPU's addresses through its own
# space only, and the duplicates cost 56 bytes each, never file data.
# Program headers for virtual mappings beyond this are dropped (and counted in
# the pykvm note): each costs 56 bytes and a gdb section, and the guest
# controls how fragmented its page tables are.
DEFAULT_MAX_SEGMENTS = 8192
# Each distinct CR3 costs a (bounded) walk; a guest with many processes on
# many vCPUs could otherwise multiply the dump time.
DEFAULT_MAX_SPACES = 16


@record
class Load:
    """One PT_LOAD: addresses, size, offset relative to the data area, flags."""

    vaddr: int
    paddr: int
    size: int
    rel_offset: int
    flags: int


@record
class Layout:
    """All PT_LOADs in program-header order plus what the pykvm note says about them."""

    loads: list[Load] = field(default_factory=list)
    region_offsets: list[int] = field(default_factory=list)  # rel offset of each RAM region
    data_size: int = 0
    spaces: list[dict] = field(default_factory=list)
    dropped_segments: int = 0
    dropped_spaces: list[dict] = field(default_factory=list)  # address spaces not walked (cap)


def _space_key(sregs: dict) -> tuple | None:
    """What makes two vCPUs share an address space: paging mode, table root, and walk-relevant bits."""
    cr0, cr3, cr4, efer = (u64(sregs.get(k)) for k in ("cr0", "cr3", "cr4", "efer"))
    mode = paging_mode(cr0, cr4, efer)
    if mode == "none":
        return None
    root = cr3 & (0xFFFF_FFE0 if mode == "pae" else 0x000F_FFFF_FFFF_F000)
    return (mode, root, cr0 & CR0_PG, cr4 & (CR4_PAE | CR4_PSE | CR4_LA57), efer & (EFER_LMA | EFER_NXE))


def plan(snapshot: CrashSnapshot, max_segments: int = DEFAULT_MAX_SEGMENTS, max_spaces: int = DEFAULT_MAX_SPACES,
         walk_max_entries: int = DEFAULT_MAX_ENTRIES, walk_max_tables: int = DEFAULT_MAX_TABLES) -> Layout:
    """Compute the PT_LOAD list for a snapshot (phdr index 0 is reserved for PT_NOTE)."""
    mem: GuestMemory = snapshot.memory
    lay = Layout()
    rel = 0
    for r in mem.regions:
        lay.region_offsets.append(rel)
        rel += r.size
    lay.data_size = rel

    # Crashing vCPU first so its view of memory wins in gdb.
    order = sorted(snapshot.vcpus, key=lambda v: (v.index != snapshot.crashing_vcpu, v.index))
    spaces: dict[tuple, dict] = {}
    for v in order:
        key = _space_key(v.sregs)
        if key is None:
            continue
        if key in spaces:
            spaces[key]["vcpus"].append(v.index)
            continue
        spaces[key] = {"cr3": key[1], "paging": key[0], "vcpus": [v.index], "sregs": v.sregs}

    budget = max_segments
    tables_left = walk_max_tables  # shared by all spaces, so many CR3s cannot multiply the walk time
    for n, sp in enumerate(spaces.values()):
        s = sp.pop("sregs")
        if n >= max_spaces or tables_left <= 0:
            lay.dropped_spaces.append(sp)
            continue
        stats = WalkStats()
        maps = walk(mem, u64(s.get("cr0")), u64(s.get("cr3")), u64(s.get("cr4")), u64(s.get("efer")),
                    max_entries=walk_max_entries, max_tables=tables_left, stats=stats)
        tables_left -= stats.tables
        first = len(lay.loads) + 1
        for m in maps:
            flags = PF_R | (PF_W if m.writable else 0) | (0 if m.nx else PF_X)
            for vaddr, paddr, size, relo in _split_by_region(mem, lay.region_offsets, m.vaddr, m.paddr, m.size):
                if vaddr == paddr:
                    continue  # already readable through the identity view
                if budget <= 0:
                    lay.dropped_segments += 1
                    continue
                lay.loads.append(Load(vaddr, paddr, size, relo, flags))
                budget -= 1
        sp.update(phdr_first=first, phdr_count=len(lay.loads) + 1 - first, tables=stats.tables,
                  mappings=stats.mappings, skipped_tables=stats.skipped_tables, truncated=stats.truncated)
        lay.spaces.append(sp)

    for r, relo in zip(mem.regions, lay.region_offsets):
        lay.loads.append(Load(r.gpa, r.gpa, r.size, relo, PF_R | PF_W | PF_X))
    return lay


def _split_by_region(mem: GuestMemory, region_offsets: list[int], vaddr: int, paddr: int, size: int):
    """Yield (vaddr, paddr, size, rel_offset) pieces of a mapping, one per RAM region it touches."""
    end = paddr + size
    for r, relo in zip(mem.regions, region_offsets):
        a, b = max(r.gpa, paddr), min(r.end, end)
        if a < b:
            yield vaddr + (a - paddr), a, b - a, relo + (a - r.gpa)
