"""Page-table walks: real tables in every paging mode, and hostile random tables."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.memory import MIB, GuestMemory, MemoryRegion
from pykvm.memory.pagewalk import Mapping, WalkStats, paging_mode, translate, virtual_spans, walk

from .test_crash_support import (CR0_PE, CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE, HIGHER_HALF, NX,
                                P, PS, RW, US, PageTables)

LONG = dict(cr0=CR0_PE | CR0_PG, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA | EFER_NXE)


@pytest.fixture
def mem():
    m = GuestMemory([MemoryRegion(0, 16 * MIB)])
    yield m
    m.close()


def test_paging_off_returns_nothing_and_translate_is_identity(mem):
    assert walk(mem, CR0_PE, 0, 0, 0) == []
    assert translate(mem, 0, 0, 0, 0, 0x1234) == 0x1234
    assert paging_mode(0, 0, 0) == "none"


def test_identity_2mib_map_merges_into_one_run(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(0, 0, 8 * MIB, page=2 << 20, flags=P | RW)
    maps = walk(mem, cr3=pt.root, **LONG)
    assert maps == [Mapping(0, 0, 8 * MIB, True, False, False)]
    assert translate(mem, cr3=pt.root, vaddr=0x345678, **LONG) == 0x345678
    assert translate(mem, cr3=pt.root, vaddr=9 * MIB, **LONG) is None


def test_virtual_spans_split_at_pages_and_stop_at_the_first_hole(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(HIGHER_HALF + 0x100000, 0x300000, 0x1000, flags=P | RW)      # two pages, not contiguous physically
    pt.map(HIGHER_HALF + 0x101000, 0x105000, 0x1000, flags=P | RW)
    pt.map(HIGHER_HALF + 0x103000, 0x2000000, 0x1000, flags=P | RW)     # after a hole, and outside RAM
    spans = virtual_spans(mem, cr3=pt.root, vaddr=HIGHER_HALF + 0x100ff0, length=0x3000, **LONG)
    assert spans == [(0x300ff0, 0x10), (0x105000, 0x1000)]               # stops at the unmapped 0x102000
    assert virtual_spans(mem, cr3=pt.root, vaddr=HIGHER_HALF + 0x103000, length=8, **LONG) == []
    assert virtual_spans(mem, cr3=pt.root, vaddr=HIGHER_HALF + 0x103000, length=8, ram_only=False,
                         **LONG) == [(0x2000000, 8)]
    assert virtual_spans(mem, 0, 0, 0, 0, (1 << 64) - 4, 8, ram_only=False) == [((1 << 64) - 4, 4), (0, 4)]


def test_higher_half_4k_map_is_sign_extended(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(HIGHER_HALF + 0x100000, 0x100000, 0x3000, flags=P | RW)
    pt.map(HIGHER_HALF + 0x103000, 0x103000, 0x1000, flags=P | NX)  # read-only, no-exec: a new run
    maps = walk(mem, cr3=pt.root, **LONG)
    assert maps == [Mapping(HIGHER_HALF + 0x100000, 0x100000, 0x3000, True, False, False),
                    Mapping(HIGHER_HALF + 0x103000, 0x103000, 0x1000, False, False, True)]
    assert translate(mem, cr3=pt.root, vaddr=HIGHER_HALF + 0x101234, **LONG) == 0x101234
    # The same low bits without sign extension are not canonical.
    assert translate(mem, cr3=pt.root, vaddr=(HIGHER_HALF + 0x101234) & ((1 << 48) - 1), **LONG) is None


def test_full_page_table_with_varying_accessed_dirty_bits_is_one_run(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(HIGHER_HALF, 0x200000, 4 * MIB, flags=P | RW)
    leaf = 0x800000 + 3 * 4096  # root, pdpt, pd, then the first page table
    for i in range(0, 512, 3):  # A (bit 5), D (bit 6), G (bit 8) differ per page in real guests
        e = mem.read_u64(leaf + 8 * i)
        mem.write(leaf + 8 * i, struct.pack("<Q", e | 0x160))
    assert walk(mem, cr3=pt.root, **LONG) == [Mapping(HIGHER_HALF, 0x200000, 4 * MIB, True, False, False)]
    # One page unmapped in the middle: the slow path splits the run around it.
    mem.write(leaf + 8 * 100, struct.pack("<Q", 0))
    assert walk(mem, cr3=pt.root, **LONG) == [
        Mapping(HIGHER_HALF, 0x200000, 100 * 4096, True, False, False),
        Mapping(HIGHER_HALF + 101 * 4096, 0x200000 + 101 * 4096, 4 * MIB - 101 * 4096, True, False, False)]


def test_1gib_page_is_clipped_to_ram(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(0x40000000, 0, 1 << 30, page=1 << 30)
    assert walk(mem, cr3=pt.root, **LONG) == [Mapping(0x40000000, 0, 16 * MIB, True, False, False)]
    assert translate(mem, cr3=pt.root, vaddr=0x40000000 + 0x123456, **LONG) == 0x123456


def test_rights_combine_across_levels(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(0x200000, 0x200000, 0x1000, flags=P | RW | US)
    # Clear RW in the PML4 entry: nothing below can be writable.
    e = mem.read_u64(pt.root)
    mem.write(pt.root, struct.pack("<Q", e & ~RW))
    [m] = walk(mem, cr3=pt.root, **LONG)
    assert (m.writable, m.user, m.nx) == (False, True, False)


def test_nx_ignored_without_efer_nxe(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(0x200000, 0x200000, 0x1000, flags=P | NX)
    [m] = walk(mem, cr0=CR0_PE | CR0_PG, cr3=pt.root, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA)
    assert not m.nx


def test_self_referencing_pml4_entry_terminates(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(0, 0, 2 * MIB, page=2 << 20)
    # Recursive slot 510 and a loop one level down: both point back at an ancestor.
    mem.write(pt.root + 8 * 510, struct.pack("<Q", pt.root | P | RW))
    pdpt = mem.read_u64(pt.root) & ~0xFFF
    mem.write(pdpt + 8 * 7, struct.pack("<Q", pt.root | P | RW))
    stats = WalkStats()
    maps = walk(mem, cr3=pt.root, stats=stats, **LONG)
    assert maps == [Mapping(0, 0, 2 * MIB, True, False, False)]
    assert stats.skipped_tables == 2 and not stats.truncated


def test_table_pointer_outside_ram_is_skipped(mem):
    pt = PageTables(mem, 0x800000)
    pt.map(0, 0, 0x1000)
    mem.write(pt.root + 8, struct.pack("<Q", 0x7F0000000 | P | RW))
    stats = WalkStats()
    assert walk(mem, cr3=pt.root, stats=stats, **LONG) == [Mapping(0, 0, 0x1000, True, False, False)]
    assert stats.skipped_tables == 1
    assert translate(mem, cr3=pt.root, vaddr=1 << 39, **LONG) is None
    assert walk(mem, cr3=0x7F0000000, **LONG) == []


def test_shared_tables_hit_the_table_cap(mem):
    # Every entry of every level points at the same next table: a DAG with 512**3 paths.
    pml4, pdpt, pd, ptab = 0x800000, 0x801000, 0x802000, 0x803000
    mem.write(pml4, struct.pack("<512Q", *[pdpt | P | RW] * 512))
    mem.write(pdpt, struct.pack("<512Q", *[pd | P | RW] * 512))
    mem.write(pd, struct.pack("<512Q", *[ptab | P | RW] * 512))
    mem.write(ptab, struct.pack("<512Q", *[(i * 0x1000) | P | (RW if i % 2 else 0) for i in range(512)]))
    stats = WalkStats()
    maps = walk(mem, cr3=pml4, max_tables=100, max_entries=10**6, stats=stats, **LONG)
    assert stats.truncated and stats.tables == 100
    assert len(maps) <= 100 * 512
    stats = WalkStats()
    maps = walk(mem, cr3=pml4, max_entries=1000, stats=stats, **LONG)
    assert stats.truncated and len(maps) == 1000


def test_5level_paging(mem):
    pml5 = 0x900000
    pt = PageTables(mem, 0x800000)
    pt.map(0x1000, 0x5000, 0x1000)
    mem.write(pml5 + 8 * 1, struct.pack("<Q", pt.root | P | RW))  # PML5[1]: bit 48 of the vaddr
    la57 = 1 << 12
    maps = walk(mem, CR0_PE | CR0_PG, pml5, CR4_PAE | la57, EFER_LME | EFER_LMA)
    assert maps == [Mapping((1 << 48) + 0x1000, 0x5000, 0x1000, True, False, False)]
    assert translate(mem, CR0_PE | CR0_PG, pml5, CR4_PAE | la57, EFER_LMA, (1 << 48) + 0x1010) == 0x5010


def test_pae_paging(mem):
    pdpt, pd, ptab = 0x800000, 0x801000, 0x802000
    mem.write(pdpt + 8 * 3, struct.pack("<Q", pd | P))  # 0xc0000000..
    mem.write(pd, struct.pack("<Q", 0x200000 | P | RW | PS))  # 2 MiB page
    mem.write(pd + 8, struct.pack("<Q", ptab | P | RW))
    mem.write(ptab + 8 * 2, struct.pack("<Q", 0x7000 | P | US))
    maps = walk(mem, CR0_PE | CR0_PG, pdpt, CR4_PAE, 0)
    assert maps == [Mapping(0xC0000000, 0x200000, 2 * MIB, True, False, False),
                    Mapping(0xC0202000, 0x7000, 0x1000, False, False, False)]
    assert translate(mem, CR0_PE | CR0_PG, pdpt, CR4_PAE, 0, 0xC0202123) == 0x7123


def test_32bit_paging_with_pse(mem):
    pd, ptab = 0x800000, 0x801000
    mem.write(pd + 4 * 768, struct.pack("<I", 0x400000 | P | RW | PS))  # 4 MiB page at 0xc0000000
    mem.write(pd + 4 * 1, struct.pack("<I", ptab | P | RW | US))
    mem.write(ptab + 4 * 5, struct.pack("<I", 0x9000 | P | RW | US))
    maps = walk(mem, CR0_PE | CR0_PG, pd, CR4_PSE, 0)
    assert maps == [Mapping(0x405000, 0x9000, 0x1000, True, True, False),
                    Mapping(0xC0000000, 0x400000, 4 * MIB, True, False, False)]
    assert translate(mem, CR0_PE | CR0_PG, pd, CR4_PSE, 0, 0xC0012345) == 0x412345
    # Without CR4.PSE the PS bit is ignored and the entry is a page-table pointer.
    assert translate(mem, CR0_PE | CR0_PG, pd, 0, 0, 0x405004) == 0x9004


_FLAGS = st.one_of(st.integers(0, 0xFFF), st.sampled_from([P | RW, P | RW | PS, P | US, P | RW | US | PS]))
# Entries that point into the 16 RAM pages (so the walk goes deep and loops), or any 64 bits.
_ENTRY = st.one_of(st.builds(lambda page, flags, nx: page * 4096 | flags | nx,
                             st.integers(0, 15), _FLAGS, st.sampled_from([0, NX])),
                   st.integers(0, (1 << 64) - 1))
RAM = 64 * 1024


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(_ENTRY, min_size=1, max_size=64),
       raw=st.binary(max_size=4096), raw_at=st.integers(0, RAM - 4096),
       mode=st.sampled_from(["4level", "5level", "pae", "32"]),
       cr3=st.integers(0, RAM + 0x1000))
def test_random_tables_terminate_within_caps_and_stay_in_ram(entries, raw, raw_at, mode, cr3):
    m = GuestMemory([MemoryRegion(0, RAM)])
    try:
        # Tile the entries over all of RAM, then splatter raw garbage somewhere.
        m.write(0, (struct.pack(f"<{len(entries)}Q", *entries) * (RAM // 8))[:RAM])
        m.write(raw_at, raw)
        cr0, cr4, efer = {"4level": (CR0_PE | CR0_PG, CR4_PAE, EFER_LMA | EFER_NXE),
                          "5level": (CR0_PE | CR0_PG, CR4_PAE | (1 << 12), EFER_LMA),
                          "pae": (CR0_PE | CR0_PG, CR4_PAE, 0),
                          "32": (CR0_PE | CR0_PG, CR4_PSE, 0)}[mode]
        stats = WalkStats()
        maps = walk(m, cr0, cr3, cr4, efer, max_entries=500, max_tables=200, stats=stats)
        assert stats.tables <= 200 and len(maps) <= 500
        for a, b in zip(maps, maps[1:]):
            assert a.vaddr + a.size <= b.vaddr  # ascending, non-overlapping
        for mp in maps:
            assert mp.size > 0 and m.is_ram(mp.paddr, mp.size)
            assert 0 <= mp.vaddr < 1 << 64
        for mp in maps[:20]:
            assert translate(m, cr0, cr3, cr4, efer, mp.vaddr) == mp.paddr
            assert translate(m, cr0, cr3, cr4, efer, mp.vaddr + mp.size - 1) == mp.paddr + mp.size - 1
    finally:
        m.close()
