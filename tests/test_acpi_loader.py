"""The loader gives every guest ACPI tables, in memory every memory map reports reserved, and keeps kernels off them."""

from __future__ import annotations

import struct

import pytest

from pykvm import abi
from pykvm.boot import acpi, bootinfo
from pykvm.boot.acpi import Node, Topology
from pykvm.boot.firmware import Firmware
from pykvm.boot.image import parse_image
from pykvm.boot.loader import load
from pykvm.errors import ImageDoesNotFitError, UsageError
from pykvm.memory import GuestMemory

from . import acpi_parse

MIB = 1 << 20
FIRMWARE = Firmware([], abi.PYKVM_STUBS_ADDR, abi.PYKVM_STUBS_ADDR + 0x400)


@pytest.fixture
def mem():
    m = GuestMemory.create(8 * MIB, abi.PYKVM_MMIO_HOLE)
    yield m
    for r in m.regions:
        r.close()


def boot(mem, bits=64, addr=MIB, **kw):
    return load(mem, parse_image(b"\xf4" * 16, flat_addr=addr, flat_bits=bits), FIRMWARE, kw.pop("cpus", 2), **kw)


def _reserved_only(mmap, lo, hi):
    """[lo, hi) lies inside one reserved entry and overlaps no RAM entry."""
    inside = any(t == bootinfo.MMAP_RESERVED and a <= lo and hi <= a + n for a, n, t in mmap)
    ram = any(t == bootinfo.MMAP_RAM and a < hi and lo < a + n for a, n, t in mmap)
    return inside and not ram


def test_pykvm_guests_get_tables_and_the_rsdp_in_their_boot_info(mem):
    plan = boot(mem, cpus=3)
    got = acpi_parse.parse(mem.read)
    assert got.rsdp_addr == plan.acpi.rsdp_addr == abi.PYKVM_ACPI_RSDP_ADDR
    cpus = acpi_parse.madt(got.tables[b"APIC"][1])["cpus"]
    assert [apic for _, apic, _ in cpus] == [0, 1, 2]
    bi = abi.ffi.from_buffer("struct pykvm_boot_info *",
                             bytearray(mem.read(abi.PYKVM_BOOTINFO_ADDR, abi.ffi.sizeof("struct pykvm_boot_info"))))
    assert bi.acpi_rsdp_addr == abi.PYKVM_ACPI_RSDP_ADDR
    mmap = [(bi.mmap[i].addr, bi.mmap[i].len, bi.mmap[i].type) for i in range(bi.nr_mmap)]
    for addr, data in got.tables.values():
        assert _reserved_only(mmap, addr, addr + len(data)), f"table at {addr:#x} not reserved in the boot info"
    assert _reserved_only(mmap, got.rsdp_addr, got.rsdp_addr + 36)


def test_boot_info_grew_only_at_its_end():
    ffi = abi.ffi
    assert ffi.offsetof("struct pykvm_boot_info", "acpi_rsdp_addr") == ffi.offsetof("struct pykvm_boot_info", "mmap") \
        + ffi.sizeof("struct pykvm_mmap_entry") * abi.PYKVM_MAX_MMAP
    assert ffi.offsetof("struct pykvm_boot_info", "numa_info_addr") == \
        ffi.offsetof("struct pykvm_boot_info", "acpi_rsdp_addr") + 8
    assert ffi.sizeof("struct pykvm_boot_info") == ffi.offsetof("struct pykvm_boot_info", "numa_info_addr") + 8


def test_multiboot_memory_map_reserves_the_tables(mem):
    boot(mem, bits=32)
    acpi_parse.parse(mem.read)
    mbi = mem.read(abi.PYKVM_MBI_ADDR, 116)
    flags, = struct.unpack_from("<I", mbi, 0)
    length, addr = struct.unpack_from("<II", mbi, 44)
    assert flags & bootinfo.MBI_MMAP
    raw = mem.read(addr, length)
    mmap = [struct.unpack_from("<QQI", raw, off + 4) for off in range(0, length, 24)]
    assert _reserved_only(mmap, abi.PYKVM_ACPI_RSDP_ADDR, abi.PYKVM_ACPI_END)


@pytest.mark.parametrize("addr", [0xE0000, 0xF0000, 0xDFFF8, 0xFFFF8])
def test_kernels_over_the_acpi_area_are_refused(mem, addr):
    with pytest.raises(ImageDoesNotFitError, match="ACPI tables"):
        boot(mem, bits=16, addr=addr)


def test_real_mode_images_below_the_bios_area_still_load(mem):
    boot(mem, bits=16, addr=0x8000)
    acpi_parse.parse(mem.read)


def test_platform_reaches_the_tables(mem):
    boot(mem, acpi_platform=acpi.platform_for_irqchip("full"))
    m = acpi_parse.madt(acpi_parse.parse(mem.read).tables[b"APIC"][1])
    assert m["ioapics"] == [(0, 0xFEC00000, 0)] and m["flags"] == 1


def test_numa_topology_reaches_the_tables(mem):
    topo = Topology((0, 1), (Node((1,), ((0, 4 * MIB),)), Node((0,), ((4 * MIB, 4 * MIB),), ((1 << 32, 1 << 30),))),
                    ((10, 17), (17, 10)))
    boot(mem, acpi_topology=topo)
    got = acpi_parse.parse(mem.read)
    s = acpi_parse.srat(got.tables[b"SRAT"][1])
    assert s["cpus"] == {0: (1, 1), 1: (0, 1)}
    assert sorted(s["memory"]) == [(0, 0, 4 * MIB, 1), (1, 4 * MIB, 4 * MIB, 1), (1, 1 << 32, 1 << 30, 3)]
    assert acpi_parse.slit(got.tables[b"SLIT"][1]) == [[10, 17], [17, 10]]


@pytest.mark.parametrize("topo, match", [
    (Topology((0, 1, 2)), "lists 3 vCPUs but the VM has 2"),
    (Topology((0, 1), (Node((0, 1), ((0, 16 * MIB),)),)), "is not guest RAM"),
])
def test_topology_must_match_the_vm(mem, topo, match):
    with pytest.raises(UsageError, match=match):
        boot(mem, acpi_topology=topo)
