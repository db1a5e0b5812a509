"""The PCI host (config mechanism #1, BAR placement and moves, MSI capability) and QEMU's edu device."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import DeviceManager, registry
from pykvm.devices.edu import BAR_SIZE, BUF_BASE, ID, Edu
from pykvm.devices.pci import BAR0, COMMAND, HOLE_START, INT_LINE, STATUS, PciHost
from pykvm.devices.policy import PolicyAuthority
from pykvm.memory.guest import GuestMemory
from pykvm.memory.region import MemoryRegion

MIB = 1 << 20
STATUS_MASTER_ABORT = 1 << 13       # Received Master Abort, as PCI defines it
CONF = 0x80000000


def cfg_read(host, devfn, reg, size=4):
    host.io_write(0, 4, CONF | (devfn << 8) | reg)
    return host.io_read(4 + (reg & 3 if size < 4 else 0), size)


def cfg_write(host, devfn, reg, value, size=4):
    host.io_write(0, 4, CONF | (devfn << 8) | (reg & ~3))
    host.io_write(4 + (reg & 3), size, value)


def machine(iommu=False, ram=16 * MIB, policy=None):
    """A DeviceManager with RAM reserved, a started PCI host and an edu; interrupts recorded."""
    mem = GuestMemory([MemoryRegion(0, ram)])
    dm = DeviceManager(access_filter=policy)
    dm.reserve(0, ram, "guest RAM")
    sent, lines = [], []
    ctx = registry.DeviceContext(memory=mem, irq_line=lambda gsi, level: lines.append((gsi, level)))
    ctx.msi = lambda address, data: sent.append((address, data))
    host = dm.add(registry.lookup("pci-host").make(ctx, {}))
    ctx.pci = host
    ctx.mmio_free = dm.mmio_free
    unit = dm.add(registry.lookup("intel-iommu").make(ctx, {})) if iommu else None
    edu = dm.add(registry.lookup("edu").make(ctx, {}))
    dm.start_all()
    return dm, mem, host, edu, unit, sent, lines


# ------------------------------------------------------------------ configuration space
def test_bus_zero_has_the_host_bridge_and_the_edu_and_nothing_else():
    _dm, _mem, host, edu, *_ = machine()
    assert cfg_read(host, 0, 0) == 0x29C08086
    assert cfg_read(host, 8, 0) == 0x11E81234 and edu.devfn == 8
    assert cfg_read(host, 8, 2, 2) == 0x11E8          # register 2 selected through CONFIG_ADDRESS
    assert cfg_read(host, 8, 8) == 0x00FF0010          # class 00, subclass ff, revision 0x10
    assert cfg_read(host, 16, 0) == 0xFFFFFFFF        # an empty slot
    host.io_write(0, 4, (8 << 8))                      # enable bit clear
    assert host.io_read(4, 4) == 0xFFFFFFFF
    host.io_write(0, 4, CONF | (1 << 16) | (8 << 8))   # bus 1 does not exist
    assert host.io_read(4, 4) == 0xFFFFFFFF


def test_firmware_placed_the_bar_enabled_decode_and_wrote_the_interrupt_line():
    dm, _mem, host, edu, *_ = machine()
    assert cfg_read(host, 8, BAR0) == HOLE_START and edu.mmio == [(HOLE_START, BAR_SIZE)]
    assert cfg_read(host, 8, COMMAND, 2) & 2
    assert cfg_read(host, 8, INT_LINE, 1) == 16 + (1 & 3)     # slot 1, pin A
    assert dm.mmio_access(HOLE_START, 4, False) == ID


def test_read_only_fields_keep_their_values():
    _dm, _mem, host, *_ = machine()
    cfg_write(host, 8, 0, 0xDEADBEEF)
    cfg_write(host, 8, 8, 0xFFFFFFFF)
    cfg_write(host, 8, 0x3C, 0xFFFF0000)                       # the pin byte is read-only
    assert cfg_read(host, 8, 0) == 0x11E81234 and cfg_read(host, 8, 8) == 0x00FF0010
    assert cfg_read(host, 8, 0x3D, 1) == 1


def test_bar_sizing_unmaps_then_restoring_maps_again():
    dm, _mem, host, edu, *_ = machine()
    cfg_write(host, 8, BAR0, 0xFFFFFFFF)
    assert cfg_read(host, 8, BAR0) == (~(BAR_SIZE - 1)) & 0xFFFFFFFF        # 1 MiB, 32-bit, non-prefetchable
    assert edu.mmio == [] and dm.mmio_access(HOLE_START, 4, False) == 0xFFFFFFFF
    cfg_write(host, 8, BAR0, HOLE_START)
    assert dm.mmio_access(HOLE_START, 4, False) == ID


def test_the_guest_moves_the_bar_and_disables_decode():
    dm, _mem, host, edu, *_ = machine()
    cfg_write(host, 8, BAR0, 0xFE400000)
    assert dm.mmio_access(0xFE400000, 4, False) == ID
    assert dm.mmio_access(HOLE_START, 4, False) == 0xFFFFFFFF
    cfg_write(host, 8, COMMAND, 0, 2)                                  # memory decode off
    assert dm.mmio_access(0xFE400000, 4, False) == 0xFFFFFFFF and edu.mmio == []
    cfg_write(host, 8, COMMAND, 2, 2)
    assert dm.mmio_access(0xFE400000, 4, False) == ID


def test_a_bar_placed_over_ram_or_another_device_decodes_nowhere():
    dm, _mem, host, edu, *_ = machine(iommu=True)
    cfg_write(host, 8, BAR0, 0x00100000)                               # over guest RAM
    assert edu.mmio == []
    cfg_write(host, 8, BAR0, 0xFED00000)                               # over the IOMMU's page
    assert edu.mmio == [] and dm.mmio_access(0xFED90000, 4, False) == 0x10


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
                max_size=30))
def test_any_config_writes_keep_identity_and_bar_flags(writes):
    _dm, _mem, host, edu, *_ = machine()
    for reg, size, value in writes:
        reg &= ~(size - 1)
        cfg_write(host, 8, reg, value & ((1 << (8 * size)) - 1), size)
    assert cfg_read(host, 8, 0) == 0x11E81234
    assert cfg_read(host, 8, BAR0) & 0xFFFFF == 0                     # size alignment and flags hold
    assert all(b in range(0, 1 << 32) and n == BAR_SIZE for b, n in edu.mmio)


# ------------------------------------------------------------------ edu
def test_edu_identification_liveness_and_factorial():
    _dm, _mem, _host, edu, _u, _sent, lines = machine()
    assert edu.mmio_read(0, 4) == ID
    edu.mmio_write(4, 4, 0x12345678)
    assert edu.mmio_read(4, 4) == 0xEDCBA987
    edu.mmio_write(0x20, 4, 0x80)                       # interrupt when the factorial ends
    edu.mmio_write(8, 4, 5)
    assert edu.mmio_read(8, 4) == 120 and edu.mmio_read(0x24, 4) == 1
    assert lines[-1] == (17, 1)                         # INTx on GSI 17
    edu.mmio_write(0x64, 4, 1)
    assert lines[-1] == (17, 0) and edu.mmio_read(0x24, 4) == 0
    edu.mmio_write(8, 4, 40)
    assert edu.mmio_read(8, 4) == 0                     # 40! mod 2^32
    assert edu.mmio_read(0, 2) == 0xFFFF and edu.mmio_read(0x100, 4) == 0xFFFFFFFF


def dma(edu, src, dst, count, from_device):
    edu.mmio_write(0x80, 8, src)
    edu.mmio_write(0x88, 8, dst)
    edu.mmio_write(0x90, 8, count)
    edu.mmio_write(0x98, 4, 1 | (2 if from_device else 0))
    assert edu.mmio_read(0x98, 4) & 1 == 0


def test_edu_dma_without_an_iommu_reaches_physical_memory():
    _dm, mem, host, edu, *_ = machine()
    cfg_write(host, 8, COMMAND, 0x6, 2)                 # memory decode + bus master
    mem.write(0x5000, b"\x78\x56\x34\x12")
    dma(edu, 0x5000, BUF_BASE, 4, False)
    dma(edu, BUF_BASE, 0x6004, 4, True)
    assert mem.read(0x6004, 4) == b"\x78\x56\x34\x12" and not edu.dma_errors


def test_edu_dma_is_refused_without_bus_mastering_outside_ram_or_its_buffer():
    _dm, mem, host, edu, *_ = machine()
    mem.write(0x6000, b"keep")
    dma(edu, BUF_BASE, 0x6000, 4, True)                 # bus master still off
    cfg_write(host, 8, COMMAND, 0x6, 2)
    dma(edu, BUF_BASE, 0xFFFFFF0, 32, True)             # past the 16 MiB of RAM
    dma(edu, 0x6000, BUF_BASE + 4090, 16, False)        # past the 4 KiB buffer
    assert len(edu.dma_errors) == 3 and mem.read(0x6000, 4) == b"keep" and not edu.transfers


def test_edu_msi_when_enabled_and_dma_completion_interrupt():
    _dm, _mem, host, edu, _u, sent, _lines = machine()
    cfg_write(host, 8, COMMAND, 0x6, 2)
    cfg_write(host, 8, 0x44, 0xFEE01000)
    cfg_write(host, 8, 0x48, 0)
    cfg_write(host, 8, 0x4C, 0x41, 2)
    cfg_write(host, 8, 0x42, 1, 2)                      # MSI enable
    edu.mmio_write(0x60, 4, 4)
    assert sent == [(0xFEE01000, 0x41)]
    edu.mmio_write(0x80, 8, 0x1000)
    edu.mmio_write(0x88, 8, BUF_BASE)
    edu.mmio_write(0x90, 8, 8)
    edu.mmio_write(0x98, 4, 1 | 4)                      # start, interrupt when done
    assert sent[-1] == (0xFEE01000, 0x41) and len(sent) == 2 and edu.mmio_read(0x24, 4) == 0x104


def test_edu_msi_to_a_non_apic_address_is_a_memory_write():
    _dm, mem, host, edu, _u, sent, _lines = machine()
    cfg_write(host, 8, COMMAND, 0x6, 2)
    cfg_write(host, 8, 0x44, 0x3000)
    cfg_write(host, 8, 0x4C, 0xBEEF, 2)
    cfg_write(host, 8, 0x42, 1, 2)
    edu.mmio_write(0x60, 4, 1)
    assert not sent and struct.unpack("<I", mem.read(0x3000, 4))[0] == 0xBEEF


@pytest.mark.parametrize("iommu", [False, True], ids=["bus", "iommu"])
def test_an_msi_or_dma_to_nothing_is_a_master_abort_flagged_in_status(iommu):
    # Issue 19: an MSI at 0xd0000000 raised DmaError out of the guest's register write (status 20).
    _dm, mem, host, edu, _u, sent, _lines = machine(iommu=iommu)
    cfg_write(host, 8, COMMAND, 0x6, 2)
    cfg_write(host, 8, 0x44, 0xD0000000)
    cfg_write(host, 8, 0x4C, 0xBEEF, 2)
    cfg_write(host, 8, 0x42, 1, 2)
    edu.mmio_write(0x60, 4, 1)
    assert not sent and cfg_read(host, 8, STATUS, 2) & STATUS_MASTER_ABORT
    cfg_write(host, 8, STATUS, STATUS_MASTER_ABORT, 2)           # write 1 to clear
    assert not cfg_read(host, 8, STATUS, 2) & STATUS_MASTER_ABORT
    cfg_write(host, 8, STATUS, 0xFFFF, 2)                         # nothing else of it is writable
    assert cfg_read(host, 8, STATUS, 2) == 0x0010                 # the capability list bit alone
    dma(edu, BUF_BASE, 0xFFFFFF0, 32, True)                       # past the 16 MiB of RAM
    assert cfg_read(host, 8, STATUS, 2) & STATUS_MASTER_ABORT and edu.dma_errors


def test_a_bar_moved_to_every_base_keeps_one_counter_table():
    # Issue 19: each base the guest tried left a table of per-offset counters (28 MB over all of them).
    policy = PolicyAuthority("trusted", log=lambda line: None)
    dm, _mem, host, edu, *_ = machine(policy=policy)
    moved = 0
    for base in range(HOLE_START - 64 * MIB, HOLE_START + 3 * MIB, MIB):
        cfg_write(host, 8, BAR0, base)
        moved += edu.mmio == [(base, BAR_SIZE)]
        assert dm.mmio_access(base, 4, False) == (ID if edu.mmio else 0xFFFFFFFF)
    assert moved > 60
    assert [k for k in policy._ranges if k[0] == "edu"] == [("edu", "mmio", 0)]
    assert [k for k in policy.decisions if k[0] == "edu"] == [("edu", "mmio", edu.mmio[0][0])]
    assert policy.stats()["edu"]["id"]["allow"] == moved
