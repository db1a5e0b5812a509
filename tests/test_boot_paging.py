"""Boot page tables for large sparse guests: 1 GiB pages when offered, spilled tables otherwise."""

from __future__ import annotations

import pytest

from pykvm.boot.loader import _reserve
from pykvm.boot.paging import GIB, build_boot_page_tables
from pykvm.errors import ImageDoesNotFitError
from pykvm.memory.guest import MAX_REGION_BYTES, plan_ram
from pykvm.memory.pagewalk import PTE_PS, translate

from .helpers import pykvm

BASE, LIMIT = 0x20000, 0x9F000          # PYKVM_PAGETABLE_ADDR .. PYKVM_FW_END
CR0, CR4, EFER = (1 | 1 << 31), 1 << 5, 1 << 8 | 1 << 10


class TableMemory:
    """Just enough of GuestMemory for the page walker: the builder's pages, everything else absent."""

    def __init__(self, builder):
        self.pages = {a: bytes(p) for a, p in builder.pages.items()}

    def is_ram(self, paddr, size):
        return paddr & ~0xFFF in self.pages and (paddr & 0xFFF) + size <= 4096

    def view(self, paddr, size):
        return memoryview(self.pages[paddr & ~0xFFF])[paddr & 0xFFF:(paddr & 0xFFF) + size]


def walk(b, vaddr):
    return translate(TableMemory(b), CR0, b.root, CR4, EFER, vaddr)


@pytest.mark.parametrize("ram", [256 * GIB, 1 << 40])
def test_large_guest_with_2mib_pages_spills_to_the_top_of_ram(ram):
    top = 4 * GIB + ram - 3 * GIB
    b = build_boot_page_tables(BASE, LIMIT, top, [(0xFFFFFFFF80100000, 0x100000, 0x5000)],
                               spill_top=top, spill_floor=top - (32 << 20))
    lo, hi = b.spill_range
    assert hi == top and lo < hi and b.fixed == (LIMIT - BASE) // 4096
    for va in (0, 0x12345678, 3 * GIB + 5, top - 8, top - 4096 * 7 + 12, top - GIB + 0x201234):
        assert walk(b, va) == va
    assert walk(b, 0xFFFFFFFF80102345) == 0x102345
    assert walk(b, top + (1 << 30)) is None


def test_1gib_pages_need_only_a_few_tables():
    top = 4 * GIB + 253 * GIB
    b = build_boot_page_tables(BASE, LIMIT, top, [(0xFFFFFFFF80100000, 0x100000, 0x5000)], gib_pages=True)
    assert b.spill_range is None and len(b.pages) <= 8
    pdpt = next(iter(sorted(b.pages)[1:]))
    assert int.from_bytes(b.pages[pdpt][8 * 200:8 * 201], "little") & PTE_PS
    for va in (0, 0x7654321, 200 * GIB + 0x1234, top - 1):
        assert walk(b, va) == va
    assert walk(b, 0xFFFFFFFF80104321) == 0x104321


def test_the_limit_names_itself():
    with pytest.raises(ImageDoesNotFitError, match=r"508 KiB firmware area plus 32 MiB .* 2 MiB pages"):
        build_boot_page_tables(BASE, LIMIT, 9 << 40, [], spill_top=9 << 40, spill_floor=(9 << 40) - (32 << 20))


def test_spilled_tables_are_reserved_in_the_memory_map():
    mmap = [(0, 0x10000, 1), (0x100000, 0xBFF00000, 1), (4 * GIB, 256 * GIB, 1)]
    end = 4 * GIB + 256 * GIB
    out = _reserve(mmap, end - 0x100000, end)
    assert out == [(0, 0x10000, 1), (0x100000, 0xBFF00000, 1), (4 * GIB, 256 * GIB - 0x100000, 1),
                   (end - 0x100000, 0x100000, 2)]


def test_ram_above_the_hole_is_split_into_kvm_sized_slots():
    spans = plan_ram(9 << 40, 3 * GIB)
    assert all(n <= MAX_REGION_BYTES for _, n in spans)
    assert sum(n for _, n in spans) == 9 << 40
    assert all(a + n == b for (a, n), (b, _) in zip(spans[1:], spans[2:]))


@pytest.mark.kvm
def test_a_256g_guest_boots():
    r = pykvm("run", "hello", "--mem", "256G", "--timeout", "60", timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert b"ram=262144M" in r.stdout


def test_cpuid_says_whether_1gib_pages_and_how_many_address_bits():
    from pykvm.boot.cpu import gib_pages_offered, phys_addr_bits
    from pykvm.kvm.abi import ffi

    def cpuid(*leaves):
        c = ffi.new("struct kvm_cpuid2 *", {"nent": len(leaves), "entries": len(leaves)})
        for e, (fn, eax, edx) in zip(c.entries, leaves):
            e.function, e.eax, e.edx = fn, eax, edx
        return c

    assert gib_pages_offered(cpuid((0x80000001, 0, 1 << 26)))
    assert not gib_pages_offered(cpuid((0x80000001, 0, 0x23D3FBFF)))     # this nested host's KVM
    assert phys_addr_bits(cpuid((0x80000008, 0x3030, 0))) == 48
    assert phys_addr_bits(cpuid()) == 36
