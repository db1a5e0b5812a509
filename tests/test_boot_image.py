"""Kernel image parsing: formats recognised, malformed input refused with a clear reason."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.boot.image import (MULTIBOOT_MAGIC, PROTOCOL_FLAT, PROTOCOL_MULTIBOOT, PROTOCOL_PYKVM64,
                              find_multiboot_header, parse_image)
from pykvm.errors import BadImageError


def elf(bits=64, machine=62, segments=((0x100000, 0x100000, b"\x90" * 16, 32),), entry=0x100000, extra=b""):
    """A minimal ELF with the given PT_LOADs: (paddr, vaddr, data, memsz)."""
    if bits == 64:
        ehsize, phentsize = 64, 56
    else:
        ehsize, phentsize = 52, 32
    phoff = ehsize
    data_off = phoff + phentsize * len(segments)
    body = b""
    phdrs = b""
    for paddr, vaddr, data, memsz in segments:
        off = data_off + len(body)
        if bits == 64:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, vaddr, paddr, len(data), memsz, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, off, vaddr, paddr, len(data), memsz, 7, 0x1000)
        body += data
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    if bits == 64:
        hdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, ehsize, phentsize,
                                  len(segments), 64, 0, 0)
    else:
        hdr = ident + struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, ehsize, phentsize,
                                  len(segments), 40, 0, 0)
    return hdr + phdrs + body + extra


def mb_header(flags=0, kludge=None):
    checksum = (-(MULTIBOOT_MAGIC + flags)) & 0xFFFFFFFF
    h = struct.pack("<III", MULTIBOOT_MAGIC, flags, checksum)
    if kludge:
        h += struct.pack("<5I", *kludge)
    return h


def test_elf64_is_pykvm_protocol():
    img = parse_image(elf())
    assert img.protocol == PROTOCOL_PYKVM64
    assert img.entry == 0x100000
    assert img.segments[0].paddr == 0x100000 and img.segments[0].memsz == 32


def test_higher_half_elf_keeps_virtual_entry_and_physical_load():
    v = 0xFFFFFFFF80100000
    img = parse_image(elf(segments=((0x100000, v, b"\xf4", 0x1000),), entry=v))
    assert img.entry == v and img.segments[0].paddr == 0x100000 and img.segments[0].vaddr == v


def test_multiboot_elf32_entry_translated_to_physical():
    seg_data = mb_header() + b"\x90" * 4
    img = parse_image(elf(bits=32, machine=3, segments=((0x100000, 0xC0100000, seg_data, 64),), entry=0xC0100010))
    assert img.protocol == PROTOCOL_MULTIBOOT
    assert img.entry == 0x100010


def test_multiboot_aout_kludge():
    load = 0x100000
    hdr = mb_header(1 << 16, (load, load, load + 64, load + 128, load + 32))
    blob = hdr + bytes(64 - len(hdr))
    img = parse_image(blob)
    assert img.protocol == PROTOCOL_MULTIBOOT and img.entry == load + 32
    assert img.segments[0].memsz == 128 and len(img.segments[0].data) == 64


def test_flat_binary_needs_address():
    with pytest.raises(BadImageError, match="--load-addr"):
        parse_image(b"\x90\xf4")
    img = parse_image(b"\x90\xf4", flat_addr=0x7C00, flat_bits=16)
    assert img.protocol == PROTOCOL_FLAT and img.entry == 0x7C00 and img.bits == 16


@pytest.mark.parametrize("blob,match", [
    (b"", "empty"),
    (elf()[:40], "malformed or truncated"),
    (elf(segments=((0x100000, 0x100000, b"\x90" * 4096, 4096),))[:200], "truncated"),
    (elf(machine=40), "not an x86 ELF"),
    (elf(bits=32, machine=3), "without a multiboot header"),
    (elf(segments=((0x100000, 0x100000, b"\x90" * 64, 16),)), "p_filesz"),
])
def test_bad_images_are_refused(blob, match):
    with pytest.raises(BadImageError, match=match):
        parse_image(blob)


def test_multiboot_header_with_bad_checksum_is_ignored():
    blob = struct.pack("<III", MULTIBOOT_MAGIC, 0, 0) + bytes(32)
    assert find_multiboot_header(blob) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzzed_elves_fail_cleanly(tail):
    """Any corruption of an ELF either parses or raises BadImageError, nothing else."""
    base = elf()
    blob = base[:64] + tail
    try:
        parse_image(blob)
    except BadImageError:
        pass
