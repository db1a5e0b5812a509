"""Walk x86 page tables held in guest RAM: list the virtual mappings, translate one address.

The tables are guest-written and therefore untrusted. The walk is bounded by a
table budget and a mapping budget, skips table pointers that leave RAM or point
back at a table on the current path (self/ancestor loops such as recursive
mappings), clips leaf pages to RAM, and never raises on garbage: a corrupt
table only yields fewer mappings.
"""

from __future__ import annotations

import struct
from collections import namedtuple

from ..record import record
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
ADDR_MASK = 0x000F_FFFF_FFFF_F000
_U64 = (1 << 64) - 1

# 8192 page tables map 16 GiB with 4 KiB pages. Tables that map one contiguous
# block cost ~25 us each; a hostile fragmented tree costs ~0.3 ms per table, so
# the worst case stays around 3 s.
DEFAULT_MAX_TABLES = 8192
DEFAULT_MAX_ENTRIES = 65536  # merged runs; a sane kernel needs far fewer


class Mapping(namedtuple("Mapping", "vaddr paddr size writable user nx")):
    """A run of virtual pages mapped to contiguous guest-physical memory with the same rights.

    vaddr, paddr and size are ints, writable, user and nx bools. (collections' namedtuple, not
    typing's: importing typing costs every run ~2 ms.)
    """

    __slots__ = ()


@record
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


def linear_address(seg_base: int, offset: int, bits: int) -> int:
    """Segment base + offset as the CPU forms it: 64-bit code ignores the base, others wrap at 4 GiB.

    Both inputs may be anything a guest can load (a 64-bit base with a 64-bit offset); the
    result always fits a linear address, so no caller can overflow a u64 field with it.
    """
    if bits == 64:
        return offset & _U64
    width = 0xFFFF if bits == 16 else 0xFFFFFFFF
    return ((seg_base & 0xFFFFFFFF) + (offset & width)) & 0xFFFFFFFF


def code_bits(cr0: int, efer: int, cs_l: int, cs_db: int) -> int:
    """16, 32 or 64: the operand width of code running with these registers."""
    if efer & EFER_LMA and cs_l:
        return 64
    if not cr0 & CR0_PE:
        return 16
    return 32 if cs_db else 16


def _canonical(vaddr: int, bits: int) -> int:
    """Sign-extend a `bits`-wide linear address to 64 bits."""
    if vaddr & (1 << (bits - 1)):
        vaddr |= _U64 & ~((1 << bits) - 1)
    return vaddr


# Run flags, packed in an int while a run is being built.
_FW, _FU, _FNX = 1, 2, 4


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
        self.run: list[int] | None = None  # [vaddr, paddr, size, flags] being extended
        self.path: set[int] = set()
        self.ram = [(r.gpa, r.end) for r in mem.regions]
        self.ram_hit = self.ram[0] if self.ram else (0, 0)

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
    def _emit(self, vaddr: int, paddr: int, size: int, flags: int) -> None:
        """Record a leaf page, clipped to RAM."""
        lo, hi = self.ram_hit
        if lo <= paddr and paddr + size <= hi:  # the common case: same region as last time
            self._add(vaddr, paddr, size, flags)
            return
        end = paddr + size
        for lo, hi in self.ram:
            if hi <= paddr or lo >= end:
                continue
            self.ram_hit = (lo, hi)
            a, b = max(lo, paddr), min(hi, end)
            self._add(vaddr + (a - paddr), a, b - a, flags)

    def _add(self, vaddr: int, paddr: int, size: int, flags: int) -> None:
        """Extend the current run when contiguous with the same rights, else start a new one."""
        r = self.run
        if r is not None and r[0] + r[2] == vaddr and r[1] + r[2] == paddr and r[3] == flags:
            r[2] += size
            return
        self.flush()
        self.run = [vaddr, paddr, size, flags]

    def flush(self) -> None:
        """Move the current run to the output, within the mapping budget."""
        r = self.run
        if r is None:
            return
        if len(self.out) >= self.max_entries:
            raise _Budget
        self.out.append(Mapping(r[0], r[1], r[2], bool(r[3] & _FW), bool(r[3] & _FU), bool(r[3] & _FNX)))
        self.run = None

    def _uniform(self, entries: tuple, relevant: int) -> int | None:
        """First entry when a page table maps one contiguous block with identical rights, else None.

        Checked with list operations that run in C: walking a typical kernel
        direct map entry by entry in Python would cost a second per few GiB.
        """
        masked = [e & relevant for e in entries]
        first = masked[0]
        if first & PTE_P and masked == list(range(first, first + len(entries) * PAGE_SIZE, PAGE_SIZE)):
            return first
        return None

    # -- 64-bit formats (long mode, PAE) ------------------------------------
    def walk64(self, table: int, level: int, vbase: int, flags: int) -> None:
        """Walk a table of 512 64-bit entries; level 1 holds 4 KiB PTEs."""
        entries = self._table(table, 512, "Q")
        if entries is None:
            return
        if level == 1:
            self._leaf64(entries, vbase, flags)
            return
        shift = 12 + 9 * (level - 1)
        self.path.add(table)
        try:
            for i, e in enumerate(entries):
                if e & PTE_P:
                    self._entry64(e, level, vbase | (i << shift), shift, flags)
        finally:
            self.path.discard(table)

    def _combine(self, e: int, flags: int) -> int:
        """Rights of a mapping through entry e: write/user need every level, NX any level."""
        if not e & PTE_RW:
            flags &= ~_FW
        if not e & PTE_US:
            flags &= ~_FU
        if self.nxe and e & PTE_NX:
            flags |= _FNX
        return flags

    def _entry64(self, e: int, level: int, va: int, shift: int, flags: int) -> None:
        flags = self._combine(e, flags)
        if e & PTE_PS:
            # Large pages exist only at the PDPT (1 GiB) and PD (2 MiB) levels;
            # PS is reserved higher up, so such an entry faults: skip it.
            if level <= 3:
                size = 1 << shift
                self._emit(self._virt(va), e & ADDR_MASK & ~(size - 1), size, flags)
        else:
            self.walk64(e & ADDR_MASK, level - 1, va, flags)

    def _leaf64(self, entries: tuple, vbase: int, flags: int) -> None:
        relevant = PTE_P | PTE_RW | PTE_US | ADDR_MASK | (PTE_NX if self.nxe else 0)
        first = self._uniform(entries, relevant)
        if first is not None:
            self._emit(self._virt(vbase), first & ADDR_MASK, 512 * PAGE_SIZE, self._combine(first, flags))
            return
        # Per-entry work inlined: this loop is the walk's hot spot on fragmented tables.
        v0 = self._virt(vbase)  # the index bits below 2 MiB never change the sign extension
        nxe, emit = self.nxe, self._emit
        for i, e in enumerate(entries):
            if e & PTE_P:
                f = flags
                if not e & PTE_RW:
                    f &= ~_FW
                if not e & PTE_US:
                    f &= ~_FU
                if nxe and e & PTE_NX:
                    f |= _FNX
                emit(v0 | (i << 12), e & ADDR_MASK, PAGE_SIZE, f)

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
                self.walk64(e & ADDR_MASK, 2, i << 30, _FW | _FU)

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
                flags = self._combine(e & 0xFFF, _FW | _FU)
                if e & PTE_PS and self.pse:
                    pa = (e & 0xFFC0_0000) | ((e >> 13) & 0xFF) << 32
                    self._emit(i << 22, pa, 4 << 20, flags)
                    continue
                pt = self._table(e & 0xFFFF_F000, 1024, "I")
                if pt is None:
                    continue
                first = self._uniform(pt, PTE_P | PTE_RW | PTE_US | 0xFFFF_F000)
                if first is not None:
                    self._emit(i << 22, first & 0xFFFF_F000, 4 << 20, self._combine(first & 0xFFF, flags))
                    continue
                for j, pte in enumerate(pt):
                    if pte & PTE_P:
                        self._emit((i << 22) | (j << 12), pte & 0xFFFF_F000, PAGE_SIZE,
                                   self._combine(pte & 0xFFF, flags))
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
            w.walk64(cr3 & ADDR_MASK, 4, 0, _FW | _FU)
        elif mode == "5level":
            w.walk64(cr3 & ADDR_MASK, 5, 0, _FW | _FU)
        elif mode == "pae":
            w.walk_pae(cr3)
        else:
            w.walk32(cr3)
        w.flush()
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
    # Every table read is bounds-checked by _read, so garbage only yields None.
    if mode in ("4level", "5level"):
        levels = 5 if mode == "5level" else 4
        bits = 12 + 9 * levels
        if _canonical(vaddr & ((1 << bits) - 1), bits) != vaddr:
            return None  # non-canonical
        return _translate64(mem, cr3 & ADDR_MASK, levels, vaddr)
    if vaddr >> 32:
        return None
    if mode == "pae":
        pdpte = _read(mem, (cr3 & 0xFFFF_FFE0) + 8 * (vaddr >> 30), "Q")
        if pdpte is None or not pdpte & PTE_P:
            return None
        return _translate64(mem, pdpte & ADDR_MASK, 2, vaddr)
    return _translate32(mem, cr3, cr4, vaddr)


def virtual_spans(mem: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int, vaddr: int, length: int,
                  ram_only: bool = True) -> list[tuple[int, int]]:
    """(guest-physical, length) pieces of linear [vaddr, vaddr+length), one per page, up to the first page that
    does not map (with ram_only, also the first that maps outside guest RAM); the address wraps at 2**64."""
    out = []
    vaddr &= _U64
    while length > 0:
        n = min(length, PAGE_SIZE - (vaddr & (PAGE_SIZE - 1)))
        phys = translate(mem, cr0, cr3, cr4, efer, vaddr)
        if phys is None or ram_only and not mem.is_ram(phys, n):
            break
        out.append((phys, n))
        vaddr = (vaddr + n) & _U64
        length -= n
    return out


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
            return (e & ADDR_MASK & ~(size - 1)) | (vaddr & (size - 1))
        if e & PTE_PS:
            return None  # reserved bit at PML4/PML5 level
        table, level = e & ADDR_MASK, level - 1


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
