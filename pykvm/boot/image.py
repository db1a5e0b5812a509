"""Kernel images: recognise and parse ELF64, multiboot v1 (ELF or a.out kludge) and flat binaries.

This is where the untrusted kernel file is parsed and validated; everything
downstream sees only `KernelImage` with bounded, consistent segments.
"""

from __future__ import annotations

import struct

from ..errors import BadImageError
from ..paths import clean
from ..record import field, record

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192
MB_FLAG_PAGE_ALIGN = 1 << 0
MB_FLAG_MEMINFO = 1 << 1
MB_FLAG_VIDEO = 1 << 2
MB_FLAG_AOUT_KLUDGE = 1 << 16
MB_SUPPORTED_REQUIRED = MB_FLAG_PAGE_ALIGN | MB_FLAG_MEMINFO | MB_FLAG_VIDEO

EM_386 = 3
EM_X86_64 = 62
MAX_IMAGE_BYTES = 1 << 32

PROTOCOL_PYKVM64 = "pykvm64"
PROTOCOL_MULTIBOOT = "multiboot"
PROTOCOL_FLAT = "flat"
PROTOCOL_LINUX = "linux"           # the x86 boot protocol: bzImage, boot_params, 64-bit entry
PROTOCOL_PVH = "pvh"               # Xen PVH: ELF with a PHYS32_ENTRY note, hvm_start_info, 32-bit entry

GZIP_MAGIC = b"\x1f\x8b\x08"
MAX_GUNZIPPED_BYTES = 1 << 30      # a compressed kernel may expand to this much and no more


@record
class LoadSegment:
    """Bytes to place at a guest-physical address, zero-filled up to memsz."""

    paddr: int
    vaddr: int
    data: bytes = field(repr=False)
    memsz: int

    @property
    def pend(self) -> int:
        """Physical end address."""
        return self.paddr + self.memsz


@record
class KernelImage:
    """A parsed kernel: how to enter it and what to load where."""

    path: str
    protocol: str
    entry: int
    segments: list[LoadSegment]
    bits: int = 64
    multiboot_flags: int = 0
    format: str = ""
    notes: list[str] = field(default_factory=list)
    setup: object = None             # linux.SetupHeader for PROTOCOL_LINUX

    @property
    def physical_end(self) -> int:
        """End of the highest loaded byte (bss included)."""
        return max(s.pend for s in self.segments)


@record
class MultibootHeader:
    """The fields of a multiboot v1 header found in a kernel file."""

    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_multiboot_header(blob: bytes) -> MultibootHeader | None:
    """Locate a valid multiboot v1 header in the first 8 KiB, 4-byte aligned."""
    limit = min(len(blob), MULTIBOOT_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", blob, off)
        if magic != MULTIBOOT_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
            continue
        hdr = MultibootHeader(off, flags)
        if flags & MB_FLAG_AOUT_KLUDGE:
            if off + 32 > len(blob):
                raise BadImageError("multiboot header is truncated (a.out kludge fields missing)")
            (hdr.header_addr, hdr.load_addr, hdr.load_end_addr,
             hdr.bss_end_addr, hdr.entry_addr) = struct.unpack_from("<5I", blob, off + 12)
        return hdr
    return None


def load_image(path, flat_addr: int | None = None, flat_bits: int = 64) -> KernelImage:
    """Read and parse a kernel file (path: str or os.PathLike); raises BadImageError with a one-line reason."""
    path = clean(path)
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_IMAGE_BYTES + 1)
    except IsADirectoryError:
        raise BadImageError(f"{path}: is a directory, not a kernel image") from None
    except OSError as e:
        raise BadImageError(f"{path}: cannot read kernel: {e.strerror}") from None
    return parse_image(blob, path, flat_addr=flat_addr, flat_bits=flat_bits)


def parse_image(blob: bytes, name: str = "<kernel>", flat_addr: int | None = None,
                flat_bits: int = 64) -> KernelImage:
    """Parse kernel bytes: multiboot kludge, ELF (multiboot or pykvm 64-bit protocol), or flat."""
    if not blob:
        raise BadImageError(f"{name}: file is empty")
    if len(blob) > MAX_IMAGE_BYTES:
        raise BadImageError(f"{name}: larger than 4 GiB")
    compressed = blob[:3] == GZIP_MAGIC
    if compressed:
        blob = gunzip(blob, name)
    if flat_addr is not None:
        image = _flat(blob, name, flat_addr, flat_bits)
    else:
        image = _detect(blob, name)
    if compressed:
        image.format = f"gzip-compressed {image.format}"
    return image


def gunzip(blob: bytes, name: str = "<kernel>", limit: int = MAX_GUNZIPPED_BYTES) -> bytes:
    """Decompress a gzip file, refusing one that expands past `limit` (a gzip bomb) or is corrupt."""
    import zlib

    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(blob, limit + 1)
    except zlib.error as e:
        raise BadImageError(f"{name}: corrupt gzip data ({e})") from None
    if len(out) > limit:
        raise BadImageError(f"{name}: gzip data expands past {limit >> 20} MiB; refusing it (a gzip bomb?)")
    if not d.eof:
        raise BadImageError(f"{name}: truncated gzip data")
    if not out:
        raise BadImageError(f"{name}: gzip data decompresses to nothing")
    return out


def _detect(blob: bytes, name: str) -> KernelImage:
    from .bzsig import is_bzimage

    if is_bzimage(blob):
        return _bzimage(blob, name)
    mb = find_multiboot_header(blob)
    if mb is not None and mb.flags & 0xFFFF & ~MB_SUPPORTED_REQUIRED:
        raise BadImageError(f"{name}: multiboot header requires unsupported features (flags {mb.flags:#x})")
    if mb is not None and mb.flags & MB_FLAG_AOUT_KLUDGE:
        return _multiboot_kludge(blob, name, mb)
    if blob[:4] == b"\x7fELF":
        return _elf(blob, name, mb)
    raise BadImageError(f"{name}: not an ELF file and no multiboot header found "
                        "(for a raw binary give --load-addr)")


def _bzimage(blob: bytes, name: str) -> KernelImage:
    from . import linux

    hdr = linux.parse_setup_header(blob, name)
    load = linux.load_address(hdr)
    payload = blob[hdr.kernel_offset:]
    seg = LoadSegment(load, load, payload, max(hdr.init_size, len(payload)))
    return KernelImage(name, PROTOCOL_LINUX, load + linux.ENTRY64_OFFSET, [seg], bits=64,
                       format=f"bzImage (boot protocol {hdr.version_text})", setup=hdr)


def _flat(blob: bytes, name: str, addr: int, bits: int) -> KernelImage:
    seg = LoadSegment(addr, addr, blob, len(blob))
    return KernelImage(name, PROTOCOL_FLAT, addr, [seg], bits=bits, format="flat")


def _multiboot_kludge(blob: bytes, name: str, mb: MultibootHeader) -> KernelImage:
    if mb.header_addr < mb.load_addr:
        raise BadImageError(f"{name}: multiboot header_addr {mb.header_addr:#x} is below load_addr {mb.load_addr:#x}")
    start = mb.offset - (mb.header_addr - mb.load_addr)
    if start < 0:
        raise BadImageError(f"{name}: multiboot load_addr puts the image start before the file start")
    if mb.load_end_addr:
        if mb.load_end_addr < mb.load_addr:
            raise BadImageError(f"{name}: multiboot load_end_addr is below load_addr")
        size = mb.load_end_addr - mb.load_addr
        if start + size > len(blob):
            raise BadImageError(f"{name}: truncated: multiboot header asks for {size} bytes, file has {len(blob) - start}")
    else:
        size = len(blob) - start
    memsz = size
    if mb.bss_end_addr:
        if mb.bss_end_addr < mb.load_addr + size:
            raise BadImageError(f"{name}: multiboot bss_end_addr is below the loaded image's end")
        memsz = mb.bss_end_addr - mb.load_addr
    if not mb.load_addr <= mb.entry_addr < mb.load_addr + memsz:
        raise BadImageError(f"{name}: multiboot entry {mb.entry_addr:#x} is outside the loaded image")
    seg = LoadSegment(mb.load_addr, mb.load_addr, blob[start:start + size], memsz)
    return KernelImage(name, PROTOCOL_MULTIBOOT, mb.entry_addr, [seg], bits=32,
                       multiboot_flags=mb.flags, format="multiboot a.out kludge")


def _elf(blob: bytes, name: str, mb: MultibootHeader | None) -> KernelImage:
    from . import elf

    try:
        hdr = elf.parse(blob)
    except elf.ElfError as e:
        raise BadImageError(f"{name}: malformed or truncated ELF ({e})") from None
    machine, bits, entry = hdr.machine, hdr.bits, hdr.entry
    if any(p.type == elf.PT_INTERP for p in hdr.phdrs):
        # A kernel never asks for a dynamic loader; a host executable (PIE or not) does.
        raise BadImageError(f"{name}: this is a program, not a kernel (it names a dynamic loader, PT_INTERP); "
                            "give a freestanding kernel ELF")
    segs = []
    for ph in hdr.phdrs:
        if ph.type != elf.PT_LOAD or ph.memsz == 0:
            continue
        off, filesz, memsz = ph.offset, ph.filesz, ph.memsz
        if filesz > memsz:
            raise BadImageError(f"{name}: malformed ELF: a PT_LOAD has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        if off + filesz > len(blob):
            raise BadImageError(f"{name}: truncated ELF: a PT_LOAD needs bytes up to offset "
                                f"{off + filesz:#x}, the file has {len(blob):#x}")
        segs.append(LoadSegment(ph.paddr, ph.vaddr, blob[off:off + filesz], memsz))
    machine = {elf.EM_X86_64: "EM_X86_64", elf.EM_386: "EM_386"}.get(machine, machine)
    if machine not in ("EM_X86_64", "EM_386"):
        raise BadImageError(f"{name}: not an x86 ELF (machine {machine}); pykvm runs x86-64 guests")
    if not segs:
        raise BadImageError(f"{name}: ELF has no loadable segments")
    for s in segs:
        if s.pend > 1 << (64 if bits == 64 else 32) or s.paddr + s.memsz < s.paddr:
            raise BadImageError(f"{name}: a PT_LOAD segment wraps around the address space")
    if mb is not None:
        return KernelImage(name, PROTOCOL_MULTIBOOT, _physical_entry(entry, segs), segs, bits=32,
                           multiboot_flags=mb.flags, format=f"multiboot ELF{bits}")
    from . import linux

    try:
        pvh = linux.pvh_entry(elf.notes(blob, hdr), name)
    except elf.ElfError as e:
        raise BadImageError(f"{name}: malformed ELF note ({e})") from None
    if pvh is not None:
        if not any(s.paddr <= pvh < s.pend for s in segs):
            raise BadImageError(f"{name}: PVH entry {pvh:#x} lies in no loadable segment")
        return KernelImage(name, PROTOCOL_PVH, pvh, segs, bits=32, format=f"ELF{bits} with a PVH entry note")
    if bits == 32:
        raise BadImageError(f"{name}: 32-bit ELF without a multiboot header: pykvm cannot tell how to enter it")
    return KernelImage(name, PROTOCOL_PYKVM64, entry, segs, bits=64, format="ELF64")


def _physical_entry(entry: int, segs: list[LoadSegment]) -> int:
    """Multiboot enters with paging off: translate a virtual e_entry through its segment, as QEMU does."""
    if any(s.paddr <= entry < s.pend for s in segs):
        return entry
    for s in segs:
        if s.vaddr <= entry < s.vaddr + s.memsz:
            return entry - s.vaddr + s.paddr
    raise BadImageError(f"entry point {entry:#x} lies in no loadable segment")
