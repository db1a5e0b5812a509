"""Walk x86 page tables held in guest RAM: list the virtual mappings, translate one address.

The tables are guest-written and therefore untrusted. The walk is bounded by a
table budget and a mapping budget, skips table pointers that leave RAM or point
back at a table on the current path (self/ancestor loops such as recursive
mappings), clips leaf pages to RAM, and never raises on garbage: a corrupt
table only yields fewer mappings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from .guest import GuestMemory
from .region import PAGE_SIZE

# Control-register and EFER bits the walk depends on.
CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# Page-table entry bits.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7
PTE_NX = 1 << 63

# Physical-address bits of a 64-bit entry (MAXPHYADDR is at most 52).
_ADDR_MASK = 0x000F_FFFF_FFFF_F000
_U64 = (1 << 64) - 1

DEFAULT_MAX_TABLES = 16384  # 16384 page tables map 32 GiB with 4 KiB pages
DEFAULT_MAX_ENTRIES = 65536  # merged runs; a sane kernel needs far fewer


class Mapping(NamedTuple):
    """A run of virtual pages mapped to contiguous guest-physical memory with the same rights."""

    vaddr: int
    paddr: int
    size: int
    writable: bool
    user: bool
    nx: bool


@dataclass
class WalkStats:
    """What a walk looked at and whether it stopped early (for the crash report)."""

    tables: int = 0
    mappings: int = 0
    skipped_tables: int = 0  # pointers outside RAM or looping back on the path
    truncated: bool = False  # a budget ran out


class _Budget(Exception):
    """Raised internally when a cap is reached; never escapes walk()."""


def paging_mode(cr0: int, cr4: int, efer: int) -> str:
    """'none', '32', 'pae', '4level' or '5level' for these control registers."""
    if not (cr0 & CR0_PG) or not (cr0 & CR0_PE):
        return "none"
    if efer & EFER_LMA or (efer & EFER_LME and cr4 & CR4_PAE):
        return "5level" if cr4 & CR4_LA57 else "4level"
    if cr4 & CR4_PAE:
        return "pae"
    return "32"


def _canonical(vaddr: int, bits: int) -> int:
    """Sign-extend a `bits`-wide linear address to 64 bits."""
    if vaddr & (1 << (bits - 1)):
        vaddr |= _U64 & ~((1 << bits) - 1)
    return vaddr


class _Walker:
    """One bounded walk over a page-table tree."""

    def __init__(self, mem: GuestMemory, mode: str, cr4: int, efer: int,
                 max_tables: int, max_entries: int, stats: WalkStats):
        self.mem = mem
        self.mode = mode
        self.pse = bool(cr4 & CR4_PSE)
        self.nxe = bool(efer & EFER_NXE)
        self.max_tables = max_tables
        self.max_entries = max_entries
        self.stats = stats
        self.out: list[Mapping] = []
        self.path: set[int] = set()
        self.ram = [(r.gpa, r.end) for r in mem.regions]

    # -- table access -------------------------------------------------------
    def _table(self, paddr: int, count: int, fmt: str) -> tuple | None:
        """The entries of a table, or None when it is not wholly RAM or would loop."""
        width = struct.calcsize(fmt)
        if paddr in self.path or not self.mem.is_ram(paddr, count * width):
            self.stats.skipped_tables += 1
            return None
        if self.stats.tables >= self.max_tables:
            raise _Budget
        self.stats.tables += 1
        return struct.unpack_from(f"<{count}{fmt}", self.mem.view(paddr, count * width))

    # -- output -------------------------------------------------------------
    def _emit(self, vaddr: int, paddr: int, size: int, w: bool, u: bool, nx: bool) -> None:
        """Record a leaf page (clipped to RAM), merging it into the previous run when contiguous."""
        end = paddr + size
        for lo, hi in self.ram:
            if hi <= paddr or lo >= end:
                continue
            a, b = max(lo, paddr), min(hi, end)
            self._append(vaddr + (a - paddr), a, b - a, w, u, nx)

    def _append(self, vaddr: int, paddr: int, size: int, w: bool, u: bool, nx: bool) -> None:
        out = self.out
        if out:
            p = out[-1]
            if (p.vaddr + p.size == vaddr and p.paddr + p.size == paddr
                    and p.writable == w and p.user == u and p.nx == nx):
                out[-1] = p._replace(size=p.size + size)
                return
        if len(out) >= self.max_entries:
            raise _Budget
        out.append(Mapping(vaddr, paddr, size, w, u, nx))

    # -- 64-bit formats (long mode, PAE) ------------------------------------
    def walk64(self, table: int, level: int, vbase: int, w: bool, u: bool, nx: bool) -> None:
        """Walk a table of 512 64-bit entries; level 1 holds 4 KiB PTEs."""
        entries = self._table(table, 512, "Q")
        if entries is None:
            return
        shift = 12 + 9 * (level - 1)
        self.path.add(table)
        try:
            for i, e in enumerate(entries):
                if not e & PTE_P:
                    continue
                self._entry64(e, level, vbase | (i << shift), shift, w, u, nx)
        finally:
            self.path.discard(table)

    def _entry64(self, e: int, level: int, va: int, shift: int, w: bool, u: bool, nx: bool) -> None:
        ew, eu = w and bool(e & PTE_RW), u and bool(e & PTE_US)
        enx = nx or (self.nxe and bool(e & PTE_NX))
        if level == 1:
            self._emit(self._virt(va), e & _ADDR_MASK, PAGE_SIZE, ew, eu, enx)
        elif e & PTE_PS:
            # Large pages exist only at the PDPT (1 GiB) and PD (2 MiB) levels;
            # PS is reserved higher up, so such an entry faults: skip it.
            if level <= 3:
                size = 1 << shift
                self._emit(self._virt(va), e & _ADDR_MASK & ~(size - 1), size, ew, eu, enx)
        else:
            self.walk64(e & _ADDR_MASK, level - 1, va, ew, eu, enx)

    def _virt(self, va: int) -> int:
        if self.mode == "4level":
            return _canonical(va, 48)
        if self.mode == "5level":
            return _canonical(va, 57)
        return va  # PAE: 32-bit linear addresses

    def walk_pae(self, cr3: int) -> None:
        """Walk a PAE PDPT (4 entries, 32-byte aligned); PDPTEs carry no rights bits."""
        pdpt = self._table(cr3 & 0xFFFF_FFE0, 4, "Q")
        if pdpt is None:
            return
        for i, e in enumerate(pdpt):
            if e & PTE_P:
                self.walk64(e & _ADDR_MASK, 2, i << 30, True, True, False)

    # -- 32-bit non-PAE format ----------------------------------------------
    def walk32(self, cr3: int) -> None:
        """Walk a 1024-entry page directory; PSE allows 4 MiB pages (PSE-36 high bits honoured)."""
        pd_addr = cr3 & 0xFFFF_F000
        pd = self._table(pd_addr, 1024, "I")
        if pd is None:
            return
        self.path.add(pd_addr)
        try:
            for i, e in enumerate(pd):
                if not e & PTE_P:
                    continue
                w, u = bool(e & PTE_RW), bool(e & PTE_US)
                if e & PTE_PS and self.pse:
                    pa = (e & 0xFFC0_0000) | ((e >> 13) & 0xFF) << 32
                    self._emit(i << 22, pa, 4 << 20, w, u, False)
                    continue
                pt_addr = e & 0xFFFF_F000
                pt = self._table(pt_addr, 1024, "I")
                if pt is None:
                    continue
                for j, pte in enumerate(pt):
                    if pte & PTE_P:
                        self._emit((i << 22) | (j << 12), pte & 0xFFFF_F000, PAGE_SIZE,
                                   w and bool(pte & PTE_RW), u and bool(pte & PTE_US), False)
        finally:
            self.path.discard(pd_addr)


def walk(mem: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int,
         max_entries: int = DEFAULT_MAX_ENTRIES, max_tables: int = DEFAULT_MAX_TABLES,
         stats: WalkStats | None = None) -> list[Mapping]:
    """All virtual mappings of the address space at `cr3`, merged into runs, in ascending vaddr order."""
    stats = stats if stats is not None else WalkStats()
    mode = paging_mode(cr0, cr4, efer)
    if mode == "none":
        return []
    w = _Walker(mem, mode, cr4, efer, max_tables, max_entries, stats)
    try:
        if mode == "4level":
            w.walk64(cr3 & _ADDR_MASK, 4, 0, True, True, False)
        elif mode == "5level":
            w.walk64(cr3 & _ADDR_MASK, 5, 0, True, True, False)
        elif mode == "pae":
            w.walk_pae(cr3)
        else:
            w.walk32(cr3)
    except _Budget:
        stats.truncated = True
    stats.mappings = len(w.out)
    return w.out


def translate(mem: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int, vaddr: int) -> int | None:
    """Guest-physical address for `vaddr` (not necessarily RAM), or None when it is not mapped."""
    mode = paging_mode(cr0, cr4, efer)
    vaddr &= _U64
    if mode == "none":
        return vaddr
    try:
        if mode in ("4level", "5level"):
            levels = 5 if mode == "5level" else 4
            bits = 12 + 9 * levels
            if _canonical(vaddr & ((1 << bits) - 1), bits) != vaddr:
                return None  # non-canonical
            return _translate64(mem, cr3 & _ADDR_MASK, levels, vaddr)
        if vaddr >> 32:
            return None
        if mode == "pae":
            pdpte = _read(mem, (cr3 & 0xFFFF_FFE0) + 8 * (vaddr >> 30), "Q")
            if pdpte is None or not pdpte & PTE_P:
                return None
            return _translate64(mem, pdpte & _ADDR_MASK, 2, vaddr)
        return _translate32(mem, cr3, cr4, vaddr)
    except Exception:  # garbage tables: treat as unmapped, never raise
        return None


def _read(mem: GuestMemory, paddr: int, fmt: str) -> int | None:
    size = struct.calcsize(fmt)
    if not mem.is_ram(paddr, size):
        return None
    return struct.unpack_from("<" + fmt, mem.view(paddr, size))[0]


def _translate64(mem: GuestMemory, table: int, level: int, vaddr: int) -> int | None:
    while True:
        shift = 12 + 9 * (level - 1)
        e = _read(mem, table + 8 * ((vaddr >> shift) & 0x1FF), "Q")
        if e is None or not e & PTE_P:
            return None
        if level == 1 or (e & PTE_PS and level <= 3):
            size = 1 << shift
            return (e & _ADDR_MASK & ~(size - 1)) | (vaddr & (size - 1))
        if e & PTE_PS:
            return None  # reserved bit at PML4/PML5 level
        table, level = e & _ADDR_MASK, level - 1


def _translate32(mem: GuestMemory, cr3: int, cr4: int, vaddr: int) -> int | None:
    pde = _read(mem, (cr3 & 0xFFFF_F000) + 4 * (vaddr >> 22), "I")
    if pde is None or not pde & PTE_P:
        return None
    if pde & PTE_PS and cr4 & CR4_PSE:
        return (pde & 0xFFC0_0000) | ((pde >> 13) & 0xFF) << 32 | (vaddr & 0x3F_FFFF)
    pte = _read(mem, (pde & 0xFFFF_F000) + 4 * ((vaddr >> 12) & 0x3FF), "I")
    if pte is None or not pte & PTE_P:
        return None
    return (pte & 0xFFFF_F000) | (vaddr & 0xFFF)
