"""Linux's boot protocols: bzImage setup header and boot_params, PVH note and hvm_start_info, gzip images.

Offsets are those documented in Linux's Documentation/arch/x86/boot.rst and zero-page.rst
and Xen's public/arch-x86/hvm/start_info.h; the tests spell them out as numbers so that a
change to the code's tables cannot silently move a field.
"""

from __future__ import annotations

import gzip
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pykvm import abi
from pykvm.boot import bootinfo, linux
from pykvm.boot.firmware import Firmware
from pykvm.boot.image import PROTOCOL_LINUX, PROTOCOL_PVH, gunzip, parse_image
from pykvm.boot.loader import FOREIGN_INFO_ADDR, LINUX_GDT_ADDR, load
from pykvm.errors import BadImageError, ImageDoesNotFitError
from pykvm.memory import GuestMemory

from .test_boot_image import elf

MIB = 1 << 20
FIRMWARE = Firmware([], abi.PYKVM_STUBS_ADDR, abi.PYKVM_STUBS_ADDR + 0x400)


def bzimage(version=0x020F, xloadflags=0x3, loadflags=0x1, setup_sects=1, init_size=0x400000,
            pref=0x1000000, payload=b"\x90" * 2048, header_end=0x26C, cmdline_size=2047, align=0x200000):
    """A synthetic bzImage: boot sector and setup sectors with a setup header, then the 'kernel'."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = header_end - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<II", setup, 0x22C, 0x7FFFFFFF, align)
    setup[0x234] = 1
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def pvh_elf(desc=struct.pack("<I", 0x100010), name=b"Xen\0", ntype=18, entry=0x100000):
    """An ELF64 kernel with a PT_NOTE holding one note, after its one PT_LOAD at 1 MiB."""
    note = struct.pack("<III", len(name), len(desc), ntype) + name + bytes(-len(name) % 4) + desc + bytes(-len(desc) % 4)
    base = elf(segments=((0x100000, 0xFFFFFFFF81000000, b"\x90" * 64, 0x1000),), entry=entry)
    # add a second program header (PT_NOTE) by rebuilding: header, 2 phdrs, load data, note
    ehdr = bytearray(base[:64])
    struct.pack_into("<H", ehdr, 56, 2)                  # e_phnum
    data_off = 64 + 2 * 56
    load = struct.pack("<IIQQQQQQ", 1, 7, data_off, 0xFFFFFFFF81000000, 0x100000, 64, 0x1000, 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, data_off + 64, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + load + pnote + b"\x90" * 64 + note


@pytest.fixture
def mem():
    m = GuestMemory.create(64 * MIB, abi.PYKVM_MMIO_HOLE)
    yield m
    for r in m.regions:
        r.close()


# ---------------------------------------------------------------- bzImage
def test_setup_header_parsed_and_entry_is_startup_64():
    img = parse_image(bzimage())
    assert img.protocol == PROTOCOL_LINUX and img.bits == 64
    assert img.entry == 0x1000000 + 0x200               # protected-mode kernel at pref_address, + startup_64
    (seg,) = img.segments
    assert seg.paddr == 0x1000000 and seg.memsz == 0x400000 and seg.data == b"\x90" * 2048
    assert "2.15" in img.format


@pytest.mark.parametrize("kw, words", [
    (dict(version=0x020B), "too old"),
    (dict(xloadflags=0), "no 64-bit entry"),
    (dict(loadflags=0), "zImage"),
    (dict(init_size=16), "init_size"),
    (dict(align=0x3000), "kernel_alignment"),
    (dict(cmdline_size=0), "cmdline_size"),
    (dict(pref=0x1000123), "pref_address"),
    (dict(header_end=0x240), "too short"),
    (dict(payload=b""), "truncated"),
])
def test_bad_setup_headers_are_refused(kw, words):
    with pytest.raises(BadImageError, match=words):
        parse_image(bzimage(**kw))


def test_boot_params_at_documented_offsets():
    hdr = linux.parse_setup_header(bzimage())
    e820 = [(0, 0x10000, 1), (0x10000, 0xF0000, 2), (0x100000, 0x3F00000, 1)]
    bp = linux.boot_params(hdr, e820, 0x14000, 11, initrd=(0x2000000, 0x1234), rsdp=0xE0000)
    assert len(bp) == 4096
    assert bp[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", bp, 0x206)[0] == 0x020F
    assert bp[0x1F1] == 1 and bp[0x210] == 0xFF                         # setup_sects copied, type_of_loader
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x14000           # cmd_line_ptr
    assert struct.unpack_from("<II", bp, 0x218) == (0x2000000, 0x1234)  # ramdisk_image, ramdisk_size
    assert struct.unpack_from("<Q", bp, 0x070)[0] == 0xE0000            # acpi_rsdp_addr
    assert bp[0x1E8] == 3                                               # e820_entries
    for i, want in enumerate(e820):
        assert struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) == want   # packed 20-byte boot_e820_entry
    assert bp[0x2D0 + 60:0x2D0 + 80] == bytes(20)


def test_boot_params_limits():
    hdr = linux.parse_setup_header(bzimage(cmdline_size=10))
    with pytest.raises(ImageDoesNotFitError, match="at most 10"):
        linux.boot_params(hdr, [], 0x14000, 11)
    with pytest.raises(ImageDoesNotFitError, match="initrd_addr_max"):
        linux.boot_params(hdr, [], 0x14000, 1, initrd=(0x7FFFF000, 0x2000))
    with pytest.raises(ImageDoesNotFitError, match="128"):
        linux.boot_params(hdr, [(i << 20, 4096, 1) for i in range(129)], 0x14000, 1)


def test_loader_enters_bzimage_by_the_64_bit_protocol(mem):
    img = parse_image(bzimage())
    plan = load(mem, img, FIRMWARE, 1, cmdline="console=ttyS0")
    e = plan.entry
    assert e.mode == "long" and e.rip == 0x1000200 and e.gprs == {"rsi": FOREIGN_INFO_ADDR}
    assert e.selectors == (0x10, 0x18) and e.gdt == (LINUX_GDT_ADDR, 31)
    gdt = mem.read(LINUX_GDT_ADDR, 32)
    code, data = struct.unpack_from("<QQ", gdt, 16)
    assert code >> 53 & 1 and code >> 47 & 1 and (code >> 40) & 0x8 # L bit, present, executable
    assert not data >> 43 & 1 and data >> 47 & 1                      # data: not executable, present
    bp = mem.read(FOREIGN_INFO_ADDR, 4096)
    assert struct.unpack_from("<I", bp, 0x228)[0] == abi.PYKVM_CMDLINE_ADDR
    assert mem.read(abi.PYKVM_CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    n = bp[0x1E8]
    e820 = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)]
    assert e820 == [tuple(x) for x in plan.memory_map]
    assert (0x100000, 63 * MIB, bootinfo.MMAP_RAM) in e820
    # Linux's real-mode trampoline needs RAM below 1 MiB outside the low 64 KiB and the "EBDA":
    # the part of the firmware area only boot page tables use is RAM, and the BDA says where it ends
    assert (0x20000, 0x9F000 - 0x20000, bootinfo.MMAP_RAM) in e820
    assert (0x10000, 0x10000, bootinfo.MMAP_RESERVED) in e820 and (0x9F000, 0x61000, bootinfo.MMAP_RESERVED) in e820
    assert struct.unpack_from("<H", mem.read(0x413, 2))[0] == 0x9F000 >> 10


def test_loader_passes_the_initrd(mem, tmp_path):
    rd = tmp_path / "initrd"
    rd.write_bytes(b"initrd!" * 100)
    plan = load(mem, parse_image(bzimage()), FIRMWARE, 1, initrd=rd)
    bp = mem.read(FOREIGN_INFO_ADDR, 4096)
    addr, size = struct.unpack_from("<II", bp, 0x218)
    assert size == 700 and addr >= 0x1000000 + 0x400000 and addr % 4096 == 0
    assert mem.read(addr, 7) == b"initrd!" and plan.modules[0].addr == addr


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)), max_size=12))
def test_mutated_setup_headers_fail_only_with_bad_image(edits):
    blob = bytearray(bzimage())
    for off, val in edits:
        blob[off] = val
    try:
        img = parse_image(bytes(blob))
    except BadImageError as e:
        assert "\n" not in str(e)
        return
    assert img.protocol in (PROTOCOL_LINUX, "multiboot") or img.format


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=0x300))
def test_random_bytes_with_a_header_magic_fail_cleanly(raw):
    blob = bytearray(raw.ljust(0x300, b"\0"))
    blob[0x1FE:0x200] = b"\x55\xaa"
    blob[0x202:0x206] = b"HdrS"
    try:
        parse_image(bytes(blob))
    except BadImageError:
        pass


# ---------------------------------------------------------------- PVH
@pytest.mark.parametrize("desc", [struct.pack("<I", 0x100010), struct.pack("<Q", 0x100010)])
def test_pvh_note_gives_the_32_bit_entry(desc):
    img = parse_image(pvh_elf(desc))
    assert img.protocol == PROTOCOL_PVH and img.entry == 0x100010 and img.bits == 32


def test_elf_without_the_note_stays_a_pykvm_elf():
    assert parse_image(pvh_elf(ntype=17)).protocol == "pykvm64"
    assert parse_image(pvh_elf(name=b"Linux\0")).protocol == "pykvm64"


@pytest.mark.parametrize("kw, words", [
    (dict(desc=b"\x10\x00"), "4 or 8 expected"),
    (dict(desc=struct.pack("<Q", 1 << 33)), "32-bit physical"),
    (dict(desc=struct.pack("<I", 0x900000)), "no loadable segment"),
])
def test_bad_pvh_notes_are_refused(kw, words):
    with pytest.raises(BadImageError, match=words):
        parse_image(pvh_elf(**kw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1))
def test_malformed_notes_fail_only_with_bad_image(garbage, namesz, descsz):
    blob = bytearray(pvh_elf())
    note_at = 64 + 2 * 56 + 64
    struct.pack_into("<II", blob, note_at, namesz, descsz)
    blob[note_at + 12:note_at + 12 + len(garbage)] = garbage[:len(blob) - note_at - 12]
    try:
        parse_image(bytes(blob))
    except BadImageError as e:
        assert "\n" not in str(e)


def test_hvm_start_info_at_documented_offsets():
    mm = [(0, 0x10000, 1), (0x10000, 0xF0000, 2), (0x100000, 0x3F00000, 1)]
    raw = linux.hvm_start_info(0x15000, mm, 0x14000, [(0x2000000, 0x555)], rsdp=0xE0000)
    magic, version, flags, nr_modules = struct.unpack_from("<IIII", raw, 0)
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    modlist, cmdline, rsdp, memmap = struct.unpack_from("<QQQQ", raw, 16)
    entries = struct.unpack_from("<I", raw, 48)[0]
    assert cmdline == 0x14000 and rsdp == 0xE0000 and entries == 3
    for i, want in enumerate(mm):                        # hvm_memmap_table_entry: addr, size, type, reserved
        assert struct.unpack_from("<QQII", raw, memmap - 0x15000 + 24 * i) == (*want, 0)
    assert struct.unpack_from("<QQQQ", raw, modlist - 0x15000) == (0x2000000, 0x555, 0, 0)
    assert linux.START_INFO.size == 56


def test_hvm_start_info_must_fit_its_page():
    with pytest.raises(ImageDoesNotFitError, match="PVH start info"):
        linux.hvm_start_info(0x15000, [(0, 4096, 1)] * 200, 0x14000, [])


def test_loader_enters_pvh_in_protected_mode(mem):
    plan = load(mem, parse_image(pvh_elf()), FIRMWARE, 1, cmdline="console=ttyS0")
    e = plan.entry
    assert e.mode == "protected" and e.rip == 0x100010 and e.gprs == {"rbx": FOREIGN_INFO_ADDR}
    raw = mem.read(FOREIGN_INFO_ADDR, 64)
    assert struct.unpack_from("<I", raw, 0)[0] == 0x336EC578
    assert struct.unpack_from("<Q", raw, 24)[0] == abi.PYKVM_CMDLINE_ADDR
    assert struct.unpack_from("<Q", raw, 32)[0] == abi.PYKVM_ACPI_RSDP_ADDR
    assert mem.read(abi.PYKVM_CMDLINE_ADDR, 14) == b"console=ttyS0\0"   # no argv[0] for Linux


# ---------------------------------------------------------------- gzip
def test_gzip_image_is_accepted_as_is():
    plain = parse_image(bzimage())
    packed = parse_image(gzip.compress(bzimage()))
    assert packed.entry == plain.entry and packed.segments == plain.segments
    assert packed.format.startswith("gzip-compressed bzImage")
    assert parse_image(gzip.compress(pvh_elf())).protocol == PROTOCOL_PVH


def test_gzip_bomb_and_corruption_are_refused():
    with pytest.raises(BadImageError, match="gzip bomb"):
        gunzip(gzip.compress(bytes(2 * MIB)), limit=MIB)
    good = gzip.compress(bzimage())
    with pytest.raises(BadImageError, match="truncated gzip"):
        parse_image(good[:len(good) // 2])
    with pytest.raises(BadImageError, match="corrupt gzip"):
        parse_image(good[:10] + bytes(len(good) - 10))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_gzip_garbage_fails_cleanly(tail):
    try:
        parse_image(b"\x1f\x8b\x08" + tail)
    except BadImageError:
        pass


# ---------------------------------------------------------------- a real kernel
@pytest.mark.kvm
def test_debian_vmlinux_boots_through_pvh_to_memory_init(tmp_path):
    """Boot a distribution kernel's vmlinux through PVH until it prints its memory summary."""
    from .linux_kernel import boot_until_memory_summary, find_vmlinux

    vmlinux = find_vmlinux(tmp_path)
    if vmlinux is None:
        pytest.skip("no Linux kernel image found (/boot/vmlinuz-*, /boot/vmlinux-*, $PYKVM_TEST_KERNEL)")
    assert parse_image(vmlinux.read_bytes()).protocol == PROTOCOL_PVH
    console, outcome = boot_until_memory_summary(vmlinux)
    assert "Linux version" in console, console[-2000:]
    assert "Memory:" in console, f"{outcome.reason}\n{console[-3000:]}"
    assert "No sub-1M memory is available for the trampoline" not in console
