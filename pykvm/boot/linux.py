"""Linux's two direct-boot protocols: the x86 boot protocol (bzImage, boot_params) and PVH (hvm_start_info).

Layouts are those of Linux's Documentation/arch/x86/boot.rst and zero-page.rst and Xen's
public/arch-x86/hvm/start_info.h. The setup header and the ELF note come from an untrusted
file: every field used is checked here and a bad one is a BadImageError naming it.
"""

from __future__ import annotations

import struct

from ..errors import BadImageError, ImageDoesNotFitError
from ..record import record
from .bzsig import BOOT_FLAG, BOOT_FLAG_OFF, HEADER_MAGIC, HEADER_MAGIC_OFF, is_bzimage  # noqa: F401 (API)

# ---- the bzImage setup header (offsets in the file and in boot_params alike)
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_MAX_END = 0x290          # boot_params fields after the header start here
MIN_PROTOCOL = 0x020C                 # 2.12: xloadflags, the 64-bit entry
LOADED_HIGH = 1 << 0
XLF_KERNEL_64 = 1 << 0
ENTRY64_OFFSET = 0x200                # startup_64, relative to the protected-mode kernel's load address
DEFAULT_LOAD = 0x100000
MAX_INIT_SIZE = 1 << 30

# boot_params ("zero page") fields pykvm fills
BP_SIZE = 4096
BP_ACPI_RSDP = 0x070
BP_E820_ENTRIES = 0x1E8
BP_TYPE_OF_LOADER = 0x210
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_CMD_LINE_PTR = 0x228
BP_E820_TABLE = 0x2D0
E820_MAX = 128
E820_ENTRY = struct.Struct("<QQI")    # addr, size, type: 20 bytes, packed
LOADER_UNDEFINED = 0xFF

# The GDT the 64-bit boot protocol asks for: __BOOT_CS = 0x10, __BOOT_DS = 0x18, both 4 GiB flat.
BOOT_CS, BOOT_DS = 0x10, 0x18
GDT_CODE64 = 0x00AF9B000000FFFF
GDT_DATA = 0x00CF93000000FFFF


@record(frozen=True)
class SetupHeader:
    """The fields of a bzImage setup header pykvm uses, validated."""

    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    pref_address: int
    init_size: int
    raw: bytes                         # the header bytes from 0x1f1 to its end, copied into boot_params

    @property
    def kernel_offset(self) -> int:
        """Where the protected-mode kernel starts in the file."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        """'2.15' style."""
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def parse_setup_header(blob: bytes, name: str = "<kernel>") -> SetupHeader:
    """The setup header of a bzImage, or BadImageError saying which field is wrong."""
    if not is_bzimage(blob):
        raise BadImageError(f"{name}: not a bzImage (no 'HdrS' setup header)")
    end = HEADER_MAGIC_OFF + blob[0x201]
    if end > len(blob):
        raise BadImageError(f"{name}: truncated bzImage: setup header ends at {end:#x}, file has {len(blob):#x} bytes")
    end = min(end, SETUP_HEADER_MAX_END)
    version = struct.unpack_from("<H", blob, 0x206)[0]
    if version < MIN_PROTOCOL:
        raise BadImageError(f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old: "
                            "pykvm enters at the 64-bit entry point (protocol 2.12 or later)")
    if end < 0x264:
        raise BadImageError(f"{name}: setup header of protocol {version >> 8}.{version & 0xFF:02d} "
                            f"is too short ({end - SETUP_HEADER_START} bytes)")
    setup_sects = blob[SETUP_HEADER_START] or 4
    loadflags = blob[0x211]
    initrd_addr_max, kernel_alignment = struct.unpack_from("<II", blob, 0x22C)
    relocatable = bool(blob[0x234])
    xloadflags = struct.unpack_from("<H", blob, 0x236)[0]
    cmdline_size = struct.unpack_from("<I", blob, 0x238)[0]
    pref_address = struct.unpack_from("<Q", blob, 0x258)[0]
    init_size = struct.unpack_from("<I", blob, 0x260)[0]
    hdr = SetupHeader(version, setup_sects, loadflags, xloadflags, initrd_addr_max, kernel_alignment,
                      relocatable, cmdline_size, pref_address, init_size, bytes(blob[SETUP_HEADER_START:end]))
    if not xloadflags & XLF_KERNEL_64:
        raise BadImageError(f"{name}: bzImage has no 64-bit entry point (xloadflags {xloadflags:#x})")
    if not loadflags & LOADED_HIGH:
        raise BadImageError(f"{name}: zImage (loaded low) is not supported; pykvm boots bzImages")
    if hdr.kernel_offset >= len(blob):
        raise BadImageError(f"{name}: truncated bzImage: {setup_sects} setup sectors and nothing after them")
    payload = len(blob) - hdr.kernel_offset
    if not payload <= init_size <= MAX_INIT_SIZE:
        raise BadImageError(f"{name}: bzImage init_size {init_size:#x} is not between the kernel's size "
                            f"{payload:#x} and 1 GiB")
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)
                        or kernel_alignment > 1 << 30):
        raise BadImageError(f"{name}: bzImage kernel_alignment {kernel_alignment:#x} is not a power of two up to 1 GiB")
    if cmdline_size == 0:
        raise BadImageError(f"{name}: bzImage cmdline_size is 0")
    load = load_address(hdr)
    if load % 4096 or load + init_size > 1 << 32:
        raise BadImageError(f"{name}: bzImage pref_address {pref_address:#x} is not a page-aligned address "
                            "below 4 GiB with room for init_size")
    return hdr


def load_address(hdr: SetupHeader) -> int:
    """Where the protected-mode kernel goes: its preferred address (where it runs without moving), else 1 MiB."""
    return hdr.pref_address if hdr.pref_address >= DEFAULT_LOAD else DEFAULT_LOAD


def boot_params(hdr: SetupHeader, e820: list[tuple[int, int, int]], cmdline_addr: int, cmdline_len: int,
                initrd: tuple[int, int] | None = None, rsdp: int = 0) -> bytes:
    """The 4 KiB boot_params page: the kernel's setup header, loader fields, e820 map, command line, initrd."""
    if cmdline_len > hdr.cmdline_size:
        raise ImageDoesNotFitError(f"command line is {cmdline_len} bytes; this kernel takes at most {hdr.cmdline_size}")
    if len(e820) > E820_MAX:
        raise ImageDoesNotFitError(f"memory map has {len(e820)} entries; boot_params holds {E820_MAX}")
    bp = bytearray(BP_SIZE)
    bp[SETUP_HEADER_START:SETUP_HEADER_START + len(hdr.raw)] = hdr.raw
    bp[BP_TYPE_OF_LOADER] = LOADER_UNDEFINED
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, cmdline_addr)
    if initrd is not None:
        addr, size = initrd
        if addr + size > hdr.initrd_addr_max + 1:
            raise ImageDoesNotFitError(f"initrd at {addr:#x}+{size:#x} lies above this kernel's "
                                       f"initrd_addr_max {hdr.initrd_addr_max:#x}")
        struct.pack_into("<II", bp, BP_RAMDISK_IMAGE, addr, size)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP, rsdp)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        E820_ENTRY.pack_into(bp, BP_E820_TABLE + i * E820_ENTRY.size, addr, size, kind)
    return bytes(bp)


def boot_gdt() -> bytes:
    """A GDT with the 64-bit boot protocol's __BOOT_CS and __BOOT_DS."""
    return struct.pack("<4Q", 0, 0, GDT_CODE64, GDT_DATA)


# ---- PVH: the Xen ELF note and hvm_start_info
XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQI4x")     # 56 bytes, version 1
MODLIST_ENTRY = struct.Struct("<QQQQ")          # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")           # addr, size, type, reserved
MEMMAP_OFFSET = 64                              # where the tables go in the start-info page
START_INFO_PAGE = 4096


def pvh_entry(notes, name: str = "<kernel>") -> int | None:
    """The 32-bit physical entry of a XEN_ELFNOTE_PHYS32_ENTRY note among (name, type, desc), None when absent."""
    for n_name, n_type, desc in notes:
        if n_name != XEN_NOTE_NAME or n_type != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        if len(desc) == 4:
            entry = struct.unpack("<I", desc)[0]
        elif len(desc) == 8:
            entry = struct.unpack("<Q", desc)[0]
        else:
            raise BadImageError(f"{name}: Xen PHYS32_ENTRY note has {len(desc)} bytes (4 or 8 expected)")
        if not 0 < entry < 1 << 32:
            raise BadImageError(f"{name}: PVH entry {entry:#x} is not a 32-bit physical address")
        return entry
    return None


def hvm_start_info(base: int, memmap: list[tuple[int, int, int]], cmdline_addr: int,
                   modules: list[tuple[int, int]], rsdp: int = 0) -> bytes:
    """hvm_start_info at `base` followed by its memory map and module list, all in one 4 KiB page."""
    mm_addr = base + MEMMAP_OFFSET
    mods_addr = mm_addr + len(memmap) * MEMMAP_ENTRY.size
    end = mods_addr + len(modules) * MODLIST_ENTRY.size - base
    if end > START_INFO_PAGE:
        raise ImageDoesNotFitError(f"PVH start info with {len(memmap)} memory ranges and {len(modules)} modules "
                                   f"needs {end} bytes; {START_INFO_PAGE} fit")
    out = bytearray(START_INFO.pack(HVM_START_MAGIC, HVM_START_VERSION, 0, len(modules),
                                    mods_addr if modules else 0, cmdline_addr, rsdp,
                                    mm_addr, len(memmap)))
    out += bytes(MEMMAP_OFFSET - len(out))
    for addr, size, kind in memmap:
        out += MEMMAP_ENTRY.pack(addr, size, kind, 0)
    for addr, size in modules:
        out += MODLIST_ENTRY.pack(addr, size, 0, 0)
    return bytes(out)
