"""The loader's own ELF reader agrees with pyelftools on real images and fails cleanly on anything else."""

from __future__ import annotations

import io

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.boot import elf

from .helpers import guest


def reference(blob: bytes):
    e = ELFFile(io.BytesIO(blob))
    phdrs = tuple((p["p_type"], p["p_offset"], p["p_vaddr"], p["p_paddr"], p["p_filesz"], p["p_memsz"], p["p_flags"])
                  for p in e.iter_segments())
    return e.elfclass, e.header["e_entry"], phdrs


def ours(blob: bytes):
    h = elf.parse(blob)
    return h.bits, h.entry, tuple((p.type, p.offset, p.vaddr, p.paddr, p.filesz, p.memsz, p.flags) for p in h.phdrs)


TYPES = {"PT_LOAD": 1, "PT_NOTE": 4, "PT_GNU_STACK": 0x6474E551, "PT_INTERP": 3, "PT_PHDR": 6, "PT_DYNAMIC": 2,
         "PT_TLS": 7, "PT_GNU_PROPERTY": 0x6474E553, "PT_GNU_RELRO": 0x6474E552, "PT_GNU_EH_FRAME": 0x6474E550}


@pytest.mark.parametrize("name", ["hello", "multiboot", "higherhalf", "smp", "crash-hh"])
def test_matches_pyelftools_on_bundled_guests(name):
    blob = guest(name).read_bytes()
    bits, entry, phdrs = reference(blob)
    phdrs = tuple((TYPES.get(t, t), *rest) for t, *rest in phdrs)
    assert ours(blob) == (bits, entry, phdrs)


def test_symbols_match_pyelftools():
    blob = guest("hello").read_bytes()
    e = ELFFile(io.BytesIO(blob))
    names = ["kmain", "_start", "printf", "no_such_symbol"]
    want = {n: e.get_section_by_name(".symtab").get_symbol_by_name(n)[0]["st_value"] for n in names[:3]}
    assert elf.symbols(blob, names) == want


@pytest.mark.parametrize("name", ["hello", "multiboot", "higherhalf", "crash-hh"])
def test_symbol_table_matches_pyelftools(name):
    blob = guest(name).read_bytes()
    tab = ELFFile(io.BytesIO(blob)).get_section_by_name(".symtab")
    kinds = {"STT_NOTYPE": 0, "STT_OBJECT": 1, "STT_FUNC": 2, "STT_SECTION": 3, "STT_FILE": 4}
    shn = {"SHN_UNDEF": 0, "SHN_ABS": 0xFFF1, "SHN_COMMON": 0xFFF2}
    want = [(s.name, s["st_value"], s["st_size"], kinds[s["st_info"]["type"]], shn.get(s["st_shndx"], s["st_shndx"]))
            for s in tab.iter_symbols()]
    assert elf.symbol_table(blob) == want


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_images_give_elf_error_or_the_same_answer(data):
    base = bytearray(guest("hello").read_bytes()[:8192])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, 127))     # the headers live in the first bytes
        base[at] = data.draw(st.integers(0, 255))
    blob = bytes(base[:data.draw(st.integers(0, len(base)))])
    try:
        got = ours(blob)
    except elf.ElfError:
        return
    try:
        bits, entry, phdrs = reference(blob)
    except Exception:
        return   # pyelftools refuses some files ours accepts (it checks more than booting needs)
    assert got[:2] == (bits, entry)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_never_raise_anything_but_elf_error(blob):
    try:
        elf.parse(b"\x7fELF" + blob)
        elf.symbols(b"\x7fELF" + blob, ["x"])
        elf.symbol_table(b"\x7fELF" + blob)
    except elf.ElfError:
        pass
