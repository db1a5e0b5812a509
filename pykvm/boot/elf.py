"""The few ELF fields a loader needs (header, program headers, symbols), read with struct.

Booting needs e_ident, e_type, e_machine, e_entry and the program headers, nothing more; the
symbol table is read here too (the firmware's entry points, crash/symbols' symbolizing).
pyelftools stays for inspecting cores, off the path of `pykvm run` (importing it costs more
than the rest of the loader). Every offset and count is checked against the file before
use: ElfError names what is wrong.
"""

from __future__ import annotations

import struct
from ..record import record

ET_EXEC, ET_DYN = 2, 3
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_INTERP, PT_NOTE = 1, 3, 4
MAX_PHDRS = 4096
MAX_NOTES = 4096

_IDENT = struct.Struct("<4sBBBBB7x")
_HDR = {32: struct.Struct("<HHIIIIIHHHHHH"), 64: struct.Struct("<HHIQQQIHHHHHH")}
_PHDR = {32: struct.Struct("<IIIIIIII"), 64: struct.Struct("<IIQQQQQQ")}


class ElfError(ValueError):
    """A malformed or truncated ELF file."""


@record(frozen=True)
class ProgramHeader:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@record(frozen=True)
class ElfHeader:
    bits: int              # 32 or 64
    type: int              # ET_*
    machine: int           # EM_*
    entry: int
    phdrs: tuple[ProgramHeader, ...]


def is_elf(blob: bytes) -> bool:
    """True when blob starts with the ELF magic."""
    return blob[:4] == b"\x7fELF"


def parse(blob: bytes) -> ElfHeader:
    """The header and program headers of a little-endian ELF32/ELF64 image."""
    if len(blob) < _IDENT.size:
        raise ElfError(f"{len(blob)} bytes is shorter than an ELF identification")
    magic, cls, data, version, _abi, _abiv = _IDENT.unpack_from(blob)
    if magic != b"\x7fELF":
        raise ElfError("no ELF magic")
    bits = {1: 32, 2: 64}.get(cls)
    if bits is None:
        raise ElfError(f"unknown ELF class {cls}")
    if data != 1:
        raise ElfError("big-endian ELF (x86 is little-endian)")
    if version != 1:
        raise ElfError(f"unknown ELF version {version}")
    hdr = _HDR[bits]
    if len(blob) < 16 + hdr.size:
        raise ElfError("truncated ELF header")
    (e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = hdr.unpack_from(blob, 16)
    ph = _PHDR[bits]
    phdrs = []
    if phnum:
        if phentsize < ph.size:
            raise ElfError(f"program header entries of {phentsize} bytes (at least {ph.size} needed)")
        if phnum > MAX_PHDRS:
            raise ElfError(f"{phnum} program headers (at most {MAX_PHDRS})")
        if phoff + phnum * phentsize > len(blob):
            raise ElfError(f"program headers end at {phoff + phnum * phentsize:#x}, past the file's {len(blob):#x} bytes")
        for i in range(phnum):
            f = ph.unpack_from(blob, phoff + i * phentsize)
            if bits == 64:
                p_type, p_flags, off, vaddr, paddr, filesz, memsz, _align = f
            else:
                p_type, off, vaddr, paddr, filesz, memsz, p_flags, _align = f
            phdrs.append(ProgramHeader(p_type, off, vaddr, paddr, filesz, memsz, p_flags))
    return ElfHeader(bits, e_type, machine, entry, tuple(phdrs))


def notes(blob: bytes, hdr: ElfHeader) -> list[tuple[bytes, int, bytes]]:
    """(name without its NUL, type, descriptor) of every note in the PT_NOTE segments."""
    out = []
    for ph in hdr.phdrs:
        if ph.type != PT_NOTE:
            continue
        if ph.offset + ph.filesz > len(blob):
            raise ElfError(f"a PT_NOTE ends at {ph.offset + ph.filesz:#x}, past the file's {len(blob):#x} bytes")
        pos, end = ph.offset, ph.offset + ph.filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
            name_at = pos + 12
            desc_at = name_at + (namesz + 3) // 4 * 4
            nxt = desc_at + (descsz + 3) // 4 * 4
            if desc_at + descsz > end:
                raise ElfError(f"a note at {pos:#x} runs past the end of its PT_NOTE segment")
            out.append((bytes(blob[name_at:name_at + namesz]).rstrip(b"\0"), ntype,
                        bytes(blob[desc_at:desc_at + descsz])))
            if len(out) > MAX_NOTES:
                raise ElfError(f"more than {MAX_NOTES} notes")
            pos = nxt
    return out


SHT_SYMTAB, SHT_DYNSYM, SHT_NOBITS = 2, 11, 8
STT_NOTYPE, STT_FUNC = 0, 2
SHN_UNDEF = 0
_SHDR = {32: struct.Struct("<IIIIIIIIII"), 64: struct.Struct("<IIQQQQIIQQ")}
_SYM = {32: struct.Struct("<IIIBBH"), 64: struct.Struct("<IBBHQQ")}


def _section_headers(blob) -> tuple[int, list[tuple], int]:
    """(32 or 64, every section header as unpacked, the index of the name table) of an ELF file;
    ElfError when the headers lie outside it."""
    bits = parse(blob).bits
    fields = _HDR[bits].unpack_from(blob, 16)
    shoff, shentsize, shnum, shstrndx = fields[5], fields[10], fields[11], fields[12]
    sh = _SHDR[bits]
    if not shnum:
        return bits, [], 0
    if shentsize < sh.size or shnum > 65535 or shoff + shnum * shentsize > len(blob):
        raise ElfError("section headers lie outside the file")
    return bits, [sh.unpack_from(blob, shoff + i * shentsize) for i in range(shnum)], shstrndx


def symbol_table(blob, kinds=(SHT_SYMTAB, SHT_DYNSYM)) -> list[tuple[str, int, int, int, int]]:
    """(name, value, size, STT_* type, section index) of each symbol in the first table of the first of
    `kinds` the file has (.symtab before .dynsym by default); [] when it has none."""
    bits, sections, _names = _section_headers(blob)
    table = next((s for kind in kinds for s in sections if s[1] == kind), None)
    if table is None:
        return []
    off, size, link, entsize = table[4], table[5], table[6], table[9]   # same positions in Elf32_Shdr and Elf64_Shdr
    sym = _SYM[bits]
    if entsize < sym.size or off + size > len(blob) or link >= len(sections):
        raise ElfError("symbol table lies outside the file")
    stroff, strsize = sections[link][4], sections[link][5]
    if stroff + strsize > len(blob):
        raise ElfError("string table lies outside the file")
    out = []
    for i in range(size // entsize):
        f = sym.unpack_from(blob, off + i * entsize)
        if bits == 64:
            name_off, info, _other, shndx, value, sym_size = f
        else:
            name_off, value, sym_size, info, _other, shndx = f
        if name_off >= strsize:
            continue
        end = blob.find(b"\0", stroff + name_off, stroff + strsize)
        name = bytes(blob[stroff + name_off:end if end >= 0 else stroff + strsize]).decode("utf-8", "replace")
        out.append((name, value, sym_size, info & 0xF, shndx))
    return out


def symbols(blob: bytes, names) -> dict[str, int]:
    """Values of the named symbols from the file's .symtab (names not found are left out)."""
    want = set(names)
    found: dict[str, int] = {}
    for name, value, _size, _type, _shndx in symbol_table(blob, (SHT_SYMTAB,)):
        if name in want and name not in found:
            found[name] = value
    return found


def section(blob, name: str) -> bytes | None:
    """The bytes of the file's section called `name` (the first of that name), or None when it has none;
    a section whose headers or bytes lie outside the file raises ElfError."""
    _bits, sections, shstrndx = _section_headers(blob)
    if not sections:
        return None
    if shstrndx >= len(sections):
        raise ElfError("section headers lie outside the file")
    stroff, strsize = sections[shstrndx][4], sections[shstrndx][5]
    if stroff + strsize > len(blob):
        raise ElfError("the section name table lies outside the file")
    want = name.encode()
    for s in sections:
        at = stroff + s[0]
        if s[0] + len(want) + 1 > strsize or bytes(blob[at:at + len(want) + 1]) != want + b"\0":
            continue
        if s[1] == SHT_NOBITS:
            return b""
        off, size = s[4], s[5]
        if off + size > len(blob):
            raise ElfError(f"section {name} lies outside the file")
        return bytes(blob[off:off + size])
    return None
