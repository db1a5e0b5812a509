"""Boot page tables: identity map of RAM and the low 4 GiB, plus a kernel's virtual segments.

Tables go into pykvm's firmware area first. A large guest (hundreds of GiB mapped with 2 MiB
pages) needs more than that area holds: the rest spills into the top of guest RAM, growing
down, and the loader reserves that range in the memory map. With 1 GiB pages (when the
guest's CPUID offers them) even the largest guest needs only a few table pages.
"""

from __future__ import annotations

import struct

from ..errors import ImageDoesNotFitError
from ..memory import PAGE_SIZE
from ..memory.pagewalk import ADDR_MASK, PTE_P, PTE_PS, PTE_RW

GIB = 1 << 30
MIB2 = 1 << 21
PAGE = PAGE_SIZE
_LEAF = PTE_P | PTE_RW


class PageTableBuilder:
    """Builds 4-level page tables one page at a time: in [base, limit), then downward from spill_top."""

    def __init__(self, base: int, limit: int, *, gib_pages: bool = False,
                 spill_top: int | None = None, spill_floor: int = 0):
        self.base = base
        self.limit = limit
        self.gib_pages = gib_pages
        self.spill_top = spill_top
        self.spill_floor = spill_floor
        self.pages: dict[int, bytearray] = {}
        self.fixed = 0          # pages used in [base, limit)
        self.spilled = 0        # pages used below spill_top
        self.root = self._alloc()

    @property
    def capacity(self) -> int:
        """How many table pages fit in all."""
        spill = (self.spill_top - self.spill_floor) // PAGE if self.spill_top is not None else 0
        return (self.limit - self.base) // PAGE + max(spill, 0)

    def _alloc(self) -> int:
        if self.base + (self.fixed + 1) * PAGE <= self.limit:
            addr = self.base + self.fixed * PAGE
            self.fixed += 1
        elif self.spill_top is not None and self.spill_top - (self.spilled + 1) * PAGE >= self.spill_floor:
            self.spilled += 1
            addr = self.spill_top - self.spilled * PAGE
        else:
            self.too_large()
        self.pages[addr] = bytearray(PAGE)
        return addr

    def too_large(self) -> None:
        """Raise the error that names the table space and the page size that ran out."""
        area = f"{(self.limit - self.base) // 1024} KiB firmware area"
        if self.spill_top is not None:
            area += f" plus {max(self.spill_top - self.spill_floor, 0) >> 20} MiB at the top of RAM"
        how = "1 GiB pages" if self.gib_pages else "2 MiB pages (the guest's CPUID offers no 1 GiB pages)"
        raise ImageDoesNotFitError(
            f"boot page tables need more than the {area}: guest RAM or the kernel's virtual layout "
            f"is too large to map with {how}")

    def _entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.pages[table], index * 8)[0]

    def _set(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.pages[table], index * 8, value)

    def _next(self, table: int, index: int, leaf_size: int) -> int:
        """The table below entry `index`, created (or split from a large page of leaf_size) when needed."""
        e = self._entry(table, index)
        if e & PTE_P and not e & PTE_PS:
            return e & ADDR_MASK
        child = self._alloc()
        if e & PTE_P:  # split a large leaf into 512 smaller ones so part of it can be remapped
            step = leaf_size // 512
            phys = e & ADDR_MASK & ~(leaf_size - 1)
            struct.pack_into("<512Q", self.pages[child], 0,
                             *((phys + i * step) | _LEAF | (PTE_PS if step > PAGE else 0) for i in range(512)))
        self._set(table, index, child | PTE_P | PTE_RW)
        return child

    def map(self, vaddr: int, paddr: int, size: int) -> None:
        """Map [vaddr, vaddr+size) to paddr with the largest pages alignment (and CPUID) allow."""
        end = vaddr + size
        while vaddr < end:
            pdpt = self._next(self.root, (vaddr >> 39) & 511, 1 << 39)
            whole_gib = vaddr % GIB == 0 and paddr % GIB == 0 and end - vaddr >= GIB
            if whole_gib and self.gib_pages:
                self._set(pdpt, (vaddr >> 30) & 511, paddr | _LEAF | PTE_PS)
                step = GIB
            elif whole_gib:  # a whole directory of 2 MiB pages at once
                pd = self._next(pdpt, (vaddr >> 30) & 511, GIB)
                struct.pack_into("<512Q", self.pages[pd], 0,
                                 *((paddr + i * MIB2) | _LEAF | PTE_PS for i in range(512)))
                step = GIB
            else:
                pd = self._next(pdpt, (vaddr >> 30) & 511, GIB)
                if vaddr % MIB2 == 0 and paddr % MIB2 == 0 and end - vaddr >= MIB2:
                    self._set(pd, (vaddr >> 21) & 511, paddr | _LEAF | PTE_PS)
                    step = MIB2
                else:
                    pt = self._next(pd, (vaddr >> 21) & 511, MIB2)
                    self._set(pt, (vaddr >> 12) & 511, paddr | _LEAF)
                    step = PAGE
            vaddr += step
            paddr += step

    def chunks(self) -> list[tuple[int, bytes]]:
        """(guest-physical address, bytes) of each contiguous run of table pages."""
        runs: list[tuple[int, list[bytearray]]] = []
        for addr in sorted(self.pages):
            if runs and runs[-1][0] + len(runs[-1][1]) * PAGE == addr:
                runs[-1][1].append(self.pages[addr])
            else:
                runs.append((addr, [self.pages[addr]]))
        return [(addr, b"".join(pages)) for addr, pages in runs]

    @property
    def spill_range(self) -> tuple[int, int] | None:
        """[start, end) of the table pages placed below spill_top, or None."""
        if not self.spilled:
            return None
        return self.spill_top - self.spilled * PAGE, self.spill_top


def build_boot_page_tables(base: int, limit: int, ram_top: int, virtual_segments: list[tuple[int, int, int]],
                           *, gib_pages: bool = False, spill_top: int | None = None,
                           spill_floor: int = 0) -> PageTableBuilder:
    """Tables mapping max(4 GiB, RAM) 1:1 plus each (vaddr, paddr, size); the builder holds root and pages."""
    b = PageTableBuilder(base, limit, gib_pages=gib_pages, spill_top=spill_top, spill_floor=spill_floor)
    identity_top = max(4 * GIB, (ram_top + GIB - 1) // GIB * GIB)
    # The identity map alone needs a PML4, a PDPT per 512 GiB and (with 2 MiB pages) a PD per GiB:
    # refuse at once rather than after building most of it.
    if 1 + -(-identity_top // (512 * GIB)) + (0 if gib_pages else identity_top // GIB) > b.capacity:
        b.too_large()
    b.map(0, 0, identity_top)
    for vaddr, paddr, size in virtual_segments:
        if vaddr == paddr:
            continue
        start = vaddr & ~(PAGE - 1)
        delta = vaddr - start
        b.map(start, paddr - delta, (size + delta + PAGE - 1) & ~(PAGE - 1))
    return b
