"""Boot page tables: identity map of RAM and the low 4 GiB, plus a kernel's virtual segments."""

from __future__ import annotations

import struct

from ..errors import ImageDoesNotFitError
from ..memory import PAGE_SIZE
from ..memory.pagewalk import ADDR_MASK, PTE_P, PTE_PS, PTE_RW

GIB = 1 << 30
MIB2 = 1 << 21
PAGE = PAGE_SIZE


class PageTableBuilder:
    """Builds 4-level page tables into a fixed guest-physical window, one page at a time."""

    def __init__(self, base: int, limit: int, gib_pages: bool = False):
        self.base = base
        self.limit = limit
        self.gib_pages = gib_pages          # 1 GiB leaves only when the guest's CPUID has pdpe1gb
        self.pages: list[bytearray] = []
        self.root = self._alloc()

    def _alloc(self) -> int:
        addr = self.base + len(self.pages) * PAGE
        if addr + PAGE > self.limit:
            raise ImageDoesNotFitError(
                f"boot page tables need more than {(self.limit - self.base) // 1024} KiB: "
                "guest RAM or the kernel's virtual layout is too large for pykvm's firmware area")
        self.pages.append(bytearray(PAGE))
        return addr

    def _page(self, addr: int) -> bytearray:
        return self.pages[(addr - self.base) // PAGE]

    def _entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self._page(table), index * 8)[0]

    def _set(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self._page(table), index * 8, value)

    def _next(self, table: int, index: int, leaf_size: int = MIB2) -> int:
        """The table below entry `index`, created (or split from a large page of leaf_size) when needed."""
        e = self._entry(table, index)
        if e & PTE_P and not e & PTE_PS:
            return e & ADDR_MASK
        child = self._alloc()
        if e & PTE_P:  # split a large leaf into 512 smaller ones so part of it can be remapped
            phys = e & ADDR_MASK & ~(leaf_size - 1)
            step = leaf_size // 512
            flags = PTE_P | PTE_RW | (PTE_PS if step > PAGE else 0)
            for i in range(512):
                self._set(child, i, (phys + i * step) | flags)
        self._set(table, index, child | PTE_P | PTE_RW)
        return child

    def map(self, vaddr: int, paddr: int, size: int) -> None:
        """Map [vaddr, vaddr+size) to paddr, with 2 MiB pages where alignment allows."""
        end = vaddr + size
        while vaddr < end:
            pml4 = (vaddr >> 39) & 511
            pdpt = self._next(self.root, pml4)
            if self.gib_pages and vaddr % GIB == 0 and paddr % GIB == 0 and end - vaddr >= GIB \
                    and not self._entry(pdpt, (vaddr >> 30) & 511) & PTE_P:
                self._set(pdpt, (vaddr >> 30) & 511, paddr | PTE_P | PTE_RW | PTE_PS)
                vaddr += GIB
                paddr += GIB
                continue
            pd = self._next(pdpt, (vaddr >> 30) & 511, GIB)
            if vaddr % MIB2 == 0 and paddr % MIB2 == 0 and end - vaddr >= MIB2:
                self._set(pd, (vaddr >> 21) & 511, paddr | PTE_P | PTE_RW | PTE_PS)
                step = MIB2
            else:
                pt = self._next(pd, (vaddr >> 21) & 511)
                self._set(pt, (vaddr >> 12) & 511, paddr | PTE_P | PTE_RW)
                step = PAGE
            vaddr += step
            paddr += step

    def image(self) -> bytes:
        """All table pages, contiguous from `base`."""
        return b"".join(self.pages)


def build_boot_page_tables(base: int, limit: int, ram_top: int,
                           virtual_segments: list[tuple[int, int, int]], gib_pages: bool = False) -> tuple[int, bytes]:
    """Tables mapping max(4 GiB, RAM) 1:1 plus each (vaddr, paddr, size); returns (cr3, bytes).

    gib_pages: use 1 GiB leaves where alignment allows (only when the guest's CPUID has pdpe1gb).
    """
    b = PageTableBuilder(base, limit, gib_pages)
    identity_top = max(4 * GIB, (ram_top + GIB - 1) // GIB * GIB)
    b.map(0, 0, identity_top)
    for vaddr, paddr, size in virtual_segments:
        if vaddr == paddr:
            continue
        start = vaddr & ~(PAGE - 1)
        delta = vaddr - start
        b.map(start, paddr - delta, (size + delta + PAGE - 1) & ~(PAGE - 1))
    return b.root, b.image()
