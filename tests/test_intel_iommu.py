"""The Intel VT-d model: registers, DMA table walks, queued invalidation, interrupt remapping, and its parsers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import intel_iommu as V
from pykvm.devices import vtd_tables as T
from pykvm.devices.ioapic import msi_of

from .test_pci_edu import BUF_BASE, COMMAND, cfg_write, dma, machine

U64 = st.integers(0, (1 << 64) - 1)
ROOT, CTX, PML3, IRT, QUEUE, STATUS = 0x10000, 0x11000, 0x12000, 0x20000, 0x30000, 0x31000
ALLOC: dict[int, list[int]] = {}


def q(mem, gpa, *words):
    mem.write(gpa, struct.pack(f"<{len(words)}Q", *words))


def enable(unit, *cmds):
    """Set each command bit the way kvm-unit-tests does: status | cmd."""
    for cmd in cmds:
        unit.mmio_write(V.GSTS - 4, 4, unit.mmio_read(V.GSTS, 4) | cmd)


def tables(mem, sid=8, fpd=False, tt=0, aw=1):
    """Root entry for bus 0, context entry for `sid`, an empty 3-level table."""
    q(mem, ROOT, CTX | 1, 0)
    q(mem, CTX + sid * 16, PML3 | (tt << 2) | (2 if fpd else 0) | 1, aw | (sid << 8))


def map4k(mem, iova, gpa, perm=3):
    """Install a 4 KiB mapping (tables allocated from 0x13000 up, 13 pages at most)."""
    next_free = ALLOC.setdefault(id(mem), [0x13000])
    table = PML3
    for level in (3, 2):
        idx = (iova >> (12 + 9 * (level - 1))) & 0x1FF
        entry = struct.unpack("<Q", mem.read(table + idx * 8, 8))[0]
        if not entry & 3:
            page = next_free[0]
            next_free[0] += 0x1000
            mem.write(page, bytes(0x1000))
            entry = page | 3
            q(mem, table + idx * 8, entry)
        table = entry & ~0xFFF
    q(mem, table + ((iova >> 12) & 0x1FF) * 8, gpa | perm)


def iommu_machine():
    dm, mem, host, edu, unit, sent, lines = machine(iommu=True)
    ALLOC.clear()
    cfg_write(host, 8, COMMAND, 0x6, 2)
    unit.mmio_write(V.RTADDR, 8, ROOT)
    enable(unit, V.QIE, V.SRTP)
    return dm, mem, host, edu, unit, sent, lines


# ------------------------------------------------------------------ registers
def test_identification_matches_what_qemu_advertises_with_intremap():
    unit = V.IntelIommu()
    assert unit.mmio_read(V.VER, 4) == 0x10
    assert unit.mmio_read(V.CAP_REG, 8) == 0x00D2008C22260206
    assert unit.mmio_read(V.ECAP_REG, 8) == 0xF00F4A
    assert unit.mmio_read(V.CAP_REG + 4, 4) == 0x00D2008C
    assert V.IntelIommu(intremap=False).mmio_read(V.ECAP_REG, 8) & V.ECAP_IR == 0


def test_global_commands_latch_pointers_and_report_status():
    unit = V.IntelIommu()
    unit.mmio_write(V.RTADDR, 8, 0x1234000 | 0xFFF)
    unit.mmio_write(V.IRTA, 8, 0x55000 | 0xF)
    enable(unit, V.QIE, V.SRTP, V.SIRTP, V.TE, V.IRE)
    assert unit.mmio_read(V.GSTS, 4) == V.QIE | V.SRTP | V.SIRTP | V.TE | V.IRE
    assert unit.mmio_read(V.GCMD, 4) == 0
    assert unit.root_table == 0x1234000 and unit.ir_table == (0x55000, 1 << 16)
    unit.mmio_write(V.GCMD, 4, V.QIE | V.SRTP | V.SIRTP | V.IRE)       # translation off again
    assert not unit.mmio_read(V.GSTS, 4) & V.TE
    unit.mmio_write(V.CCMD + 4, 4, 0x80000000 | (1 << 29))          # ICC, global: done at once
    assert unit.mmio_read(V.CCMD + 4, 4) == (1 << 29) | (1 << 27)
    unit.mmio_write(V.IOTLB, 8, (1 << 63) | (1 << 60))
    assert unit.mmio_read(V.IOTLB, 8) == (1 << 60) | (1 << 57)


# ------------------------------------------------------------------ DMA remapping
def test_edu_dma_goes_through_the_page_tables():
    _dm, mem, _host, edu, unit, _sent, _lines = iommu_machine()
    tables(mem)
    map4k(mem, 0, 0x50000)
    enable(unit, V.TE)
    mem.write(0x50000, struct.pack("<I", 0x12345678))
    dma(edu, 0, BUF_BASE, 4, False)
    dma(edu, BUF_BASE, 4, 4, True)
    assert mem.read(0x50004, 4) == struct.pack("<I", 0x12345678)
    assert mem.read(4, 4) == bytes(4) and not edu.dma_errors       # IOVA 4 is not physical 4


def test_a_dma_across_pages_is_split_and_a_large_page_translates():
    _dm, mem, _host, edu, unit, _sent, _lines = iommu_machine()
    tables(mem)
    map4k(mem, 0x7000, 0x60000)
    map4k(mem, 0x8000, 0x70000)
    enable(unit, V.TE)
    assert unit.dma(8, 0x7FF0, 0x20, False) == [(0x60FF0, 0x10), (0x70000, 0x10)]
    q(mem, PML3 + 8, 0x40000 | 3)                 # iova 1 GiB.. through a 2 MiB leaf
    q(mem, 0x40000, 0x200000 | T.PTE_PS | 3)
    assert unit.translate(8, (1 << 30) + 0x12345, False) == (0x212345, 0x200000 - 0x12345)


def test_faults_are_recorded_reported_and_stop_the_transfer():
    _dm, mem, _host, edu, unit, sent, _lines = iommu_machine()
    tables(mem)
    map4k(mem, 0, 0x50000, perm=1)                 # read-only
    enable(unit, V.TE)
    unit.mmio_write(V.FEADDR, 4, 0xFEE00000)
    unit.mmio_write(V.FEDATA, 4, 0x33)
    unit.mmio_write(V.FECTL, 4, 0)                 # unmask fault events
    mem.write(0x50000, b"ro!!")
    dma(edu, BUF_BASE, 0, 4, True)                 # a write to a read-only page
    assert mem.read(0x50000, 4) == b"ro!!" and edu.dma_errors
    assert unit.mmio_read(V.FSTS, 4) & V.PPF
    hi = unit.mmio_read(V.FRO + 8, 8)
    assert hi & 0xFFFF == 8 and (hi >> 32) & 0xFF == T.FR_WRITE and hi >> 63
    assert sent == [(0xFEE00000, 0x33)]
    dma(edu, 0x200000, BUF_BASE, 4, False)         # a second fault while the record is full
    assert unit.mmio_read(V.FSTS, 4) & V.PFO
    unit.mmio_write(V.FRO + 12, 4, 0x80000000)     # clear F: PPF follows
    assert not unit.mmio_read(V.FSTS, 4) & V.PPF


def test_fault_processing_disable_keeps_the_record_empty():
    _dm, mem, _host, edu, unit, _sent, _lines = iommu_machine()
    tables(mem, fpd=True)
    enable(unit, V.TE)
    dma(edu, 0, BUF_BASE, 4, False)
    assert edu.dma_errors and unit.mmio_read(V.FSTS, 4) == 0 and unit.faults == 1


def test_pass_through_context_and_absent_entries():
    _dm, mem, _host, _edu, unit, _sent, _lines = iommu_machine()
    enable(unit, V.TE)
    with pytest.raises(T.VtdFault) as e:
        unit.translate(8, 0x1000, False)
    assert e.value.reason == T.FR_ROOT_ENTRY_P
    tables(mem, tt=2, aw=0)
    assert unit.translate(8, 0xABC123, True) == (0xABC123, 0x1000 - 0x123)
    with pytest.raises(T.VtdFault) as e:
        unit.translate(16, 0, False)
    assert e.value.reason == T.FR_CONTEXT_ENTRY_P


# ------------------------------------------------------------------ queued invalidation
def test_wait_descriptor_writes_status_and_interrupts():
    _dm, mem, _host, _edu, unit, sent, _lines = iommu_machine()
    unit.mmio_write(V.IQA, 8, QUEUE)               # 256 descriptors
    q(mem, QUEUE, 0x2 | (3 << 4), 0)               # IOTLB global
    q(mem, QUEUE + 16, T.INV_WAIT | T.WAIT_SW | T.WAIT_IF | (0xCAFE << 32), STATUS)
    unit.mmio_write(V.IEADDR, 4, 0xFEE00000)
    unit.mmio_write(V.IEDATA, 4, 0x44)
    unit.mmio_write(V.IECTL, 4, 0)
    unit.mmio_write(V.IQT, 8, 2 << 4)
    assert unit.mmio_read(V.IQH, 8) == 2 << 4
    assert mem.read(STATUS, 4) == struct.pack("<I", 0xCAFE)
    assert unit.mmio_read(V.ICS, 4) == V.IWC and sent == [(0xFEE00000, 0x44)]
    unit.mmio_write(V.ICS, 4, V.IWC)
    assert unit.mmio_read(V.ICS, 4) == 0


def test_a_bad_descriptor_stops_the_queue_with_iqe():
    _dm, mem, _host, _edu, unit, _sent, _lines = iommu_machine()
    unit.mmio_write(V.IQA, 8, QUEUE)
    q(mem, QUEUE, T.INV_IEC, 0)
    q(mem, QUEUE + 16, 0xF, 0)                     # no such type
    q(mem, QUEUE + 32, T.INV_WAIT | T.WAIT_SW | (1 << 32), STATUS)
    unit.mmio_write(V.IQT, 8, 3 << 4)
    assert unit.mmio_read(V.IQH, 8) == 1 << 4 and unit.mmio_read(V.FSTS, 4) & V.IQE
    assert mem.read(STATUS, 4) == bytes(4)
    q(mem, QUEUE + 16, T.INV_CONTEXT, 0)           # fixed; clearing IQE lets the next tail write run
    unit.mmio_write(V.FSTS, 4, V.IQE)
    unit.mmio_write(V.IQT, 8, 3 << 4)
    assert unit.mmio_read(V.IQH, 8) == 3 << 4 and mem.read(STATUS, 4) == struct.pack("<I", 1)


def test_events_aimed_outside_the_interrupt_window_are_lost():
    # An event message is a write to FEADDR/IEADDR: anywhere but 0xfeexxxxx it reaches no LAPIC.
    _dm, mem, _host, _edu, unit, sent, _lines = iommu_machine()
    unit.mmio_write(V.FEADDR, 4, 0xD0000000)
    unit.mmio_write(V.FECTL, 4, 0)
    unit.mmio_write(V.IQT, 8, 0x7FFF0)              # a tail past the queue: IQE, a fault event
    unit.mmio_write(V.IEADDR, 4, 0x1000)
    unit.mmio_write(V.IECTL, 4, 0)
    unit.mmio_write(V.FSTS, 4, V.IQE)
    unit.mmio_write(V.IQA, 8, QUEUE)
    q(mem, QUEUE, T.INV_WAIT | T.WAIT_IF, 0)
    unit.mmio_write(V.IQT, 8, 1 << 4)
    assert sent == [] and unit.lost_events == 2 and mem.read(0x1000, 4) == bytes(4)
    unit.mmio_write(V.FEADDR, 4, 0xFEE00000)        # the next fault event reaches APIC 0
    unit.mmio_write(V.IQT, 8, 0x7FFF0)
    assert sent == [(0xFEE00000, 0)]


def test_a_wait_status_outside_ram_is_an_error_not_a_host_write():
    _dm, mem, _host, _edu, unit, _sent, _lines = iommu_machine()
    unit.mmio_write(V.IQA, 8, QUEUE)
    q(mem, QUEUE, T.INV_WAIT | T.WAIT_SW | (1 << 32), 0x7F000000)
    unit.mmio_write(V.IQT, 8, 1 << 4)
    assert unit.mmio_read(V.FSTS, 4) & V.IQE and unit.mmio_read(V.IQH, 8) == 0


# ------------------------------------------------------------------ interrupt remapping
def irte(vector, dest=0, sid=8, svt=1, present=1, trigger=0):
    return present | (trigger << 4) | (vector << 16) | ((dest << 8) << 32), sid | (svt << 18)


def ir_machine():
    env = iommu_machine()
    mem, unit = env[1], env[4]
    unit.mmio_write(V.IRTA, 8, IRT | 0xF)
    enable(unit, V.SIRTP, V.IRE)
    return env


def test_edu_msi_is_remapped_through_its_irte():
    _dm, mem, host, edu, unit, sent, _lines = ir_machine()
    q(mem, IRT + 2 * 16, *irte(0xEE, dest=1))
    cfg_write(host, 8, 0x44, 0xFEE00000 | (2 << 5) | (1 << 4))   # remappable, handle 2
    cfg_write(host, 8, 0x4C, 0, 2)
    cfg_write(host, 8, 0x42, 1, 2)
    edu.mmio_write(0x60, 4, 1)
    assert sent == [(0xFEE01000, 0xEE)]


def test_ioapic_remappable_entries_reach_the_irte_and_skip_sid_checks():
    _dm, mem, _host, _edu, unit, sent, _lines = ir_machine()
    q(mem, IRT + 16, *irte(0xED, sid=0x1234))
    entry = 0xED | (1 << 48) | (1 << 49)          # interrupt format, index 1
    address, data = msi_of(entry)
    assert address == 0xFEE00000 | (1 << 4) | (1 << 5)
    assert unit.interrupt(address, data, None) and sent == [(0xFEE00000, 0xED)]
    assert not unit.interrupt(address, data, 8)   # from the edu, the SID check fails
    assert (unit.mmio_read(V.FRO + 8, 8) >> 32) & 0xFF == T.FR_IR_SID_ERR


@pytest.mark.parametrize("address, entry, reason", [
    (0xFEE00000 | (3 << 5) | 0x10, None, T.FR_IR_ENTRY_P),        # IRTE 3 never written
    (0xFEE00000, None, T.FR_IR_REQ_COMPAT),                        # compatibility format, CFI off
    (0xFEE00000 | (1 << 5) | 0x10, (1 | (1 << 15), 0), T.FR_IR_IRTE_RSVD),   # posted mode
])
def test_blocked_interrupts_fault_and_deliver_nothing(address, entry, reason):
    _dm, mem, _host, _edu, unit, sent, _lines = ir_machine()
    if entry:
        q(mem, IRT + 16, *entry)
    with pytest.raises(T.VtdFault) as e:
        unit.remap(address, 0, None)
    assert e.value.reason == reason
    assert not unit.interrupt(address, 0, None) and not sent


def test_index_beyond_the_table_size():
    _dm, _mem, _host, _edu, unit, _sent, _lines = iommu_machine()
    unit.mmio_write(V.IRTA, 8, IRT | 0)             # 2 entries
    enable(unit, V.SIRTP, V.IRE)
    with pytest.raises(T.VtdFault) as e:
        unit.remap(0xFEE00000 | (2 << 5) | 0x10, 0, None)
    assert e.value.reason == T.FR_IR_INDEX_OVER


# ------------------------------------------------------------------ parsers and hostile input
@given(U64, U64)
def test_entry_parsers_accept_or_fault_on_any_words(lo, hi):
    for parse in (T.RootEntry.parse, T.ContextEntry.parse, T.Irte.parse):
        try:
            r = parse(lo, hi)
        except T.VtdFault as f:
            assert 1 <= f.reason <= 0x26
            continue
        for v in vars(r).values():
            assert isinstance(v, (int, bool)) and v < (1 << T.HAW)
    try:
        d = T.InvDescriptor.parse(lo, hi)
        assert d.kind in (T.INV_CONTEXT, T.INV_IOTLB, T.INV_IEC, T.INV_WAIT)
    except ValueError:
        pass


@given(st.dictionaries(st.integers(0, 0x3FF), U64, max_size=64), st.integers(0, (1 << 40)), st.booleans())
def test_walks_of_arbitrary_tables_stay_inside_what_read_u64_offers(entries, iova, write):
    """Tables are 8 pages of random entries; anything outside them is 'not RAM'."""
    seen = []

    def read_u64(gpa):
        seen.append(gpa)
        return entries.get((gpa - 0x1000) // 8, 0) if 0x1000 <= gpa < 0x3000 else None
    try:
        gpa, size = T.walk(read_u64, 0x1000, iova, write)
        assert gpa < (1 << T.HAW) and size in (1 << 12, 1 << 21, 1 << 30)
    except T.VtdFault as f:
        assert f.reason in (T.FR_ADDR_BEYOND_MGAW, T.FR_READ, T.FR_WRITE, T.FR_PAGING_ENTRY_INV,
                            T.FR_PAGING_ENTRY_RSVD)
    assert len(seen) <= T.LEVELS


@given(U64, st.integers(0, 0xFFFFFFFF))
def test_msi_index_of_any_address(address, data):
    try:
        index = T.msi_index(address, data)
    except T.VtdFault as f:
        assert f.reason == T.FR_IR_REQ_RSVD
        return
    assert index is None or 0 <= index <= 0xFFFF


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFF), st.sampled_from([1, 2, 4, 8]), U64), max_size=40),
       st.binary(min_size=0x100, max_size=0x100))
def test_any_register_writes_and_guest_tables_never_break_the_model(writes, junk):
    """A hostile guest: random register writes over random table contents, then DMA and interrupts."""
    _dm, mem, _host, edu, unit, _sent, _lines = iommu_machine()
    for base in (ROOT, CTX, PML3, IRT, QUEUE):
        mem.write(base, junk * 16)
    for off, size, value in writes:
        unit.mmio_write(off, size, value & ((1 << (8 * size)) - 1))
        unit.mmio_read(off, size)
    dma(edu, 0x1000, BUF_BASE, 64, False)
    unit.interrupt(0xFEE00010 | (5 << 5), 0, 8)
    unit.mmio_write(V.IQT, 8, 0x7FFF0)
    assert len(unit.regs) == V.SIZE and mem.size == 16 << 20
