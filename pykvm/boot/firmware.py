"""The firmware image: exception stubs loaded into every guest, found by their ELF symbols."""

from __future__ import annotations

from .. import abi
from ..errors import ToolchainError
from ..record import record
from .image import LoadSegment


@record
class Firmware:
    """Stub code to load and where the 64-bit and 32-bit stub tables start."""

    segments: list[LoadSegment]
    stubs64: int
    stubs32: int


def load_firmware(path) -> Firmware:
    """Read the built stubs ELF and check it stays inside its slot in the firmware area."""
    from . import elf

    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ToolchainError(f"firmware {path}: {e.strerror}; rebuild with `make -C firmware`") from None
    try:
        hdr = elf.parse(blob)
        segs = [LoadSegment(ph.paddr, ph.vaddr, blob[ph.offset:ph.offset + ph.filesz], ph.memsz)
                for ph in hdr.phdrs if ph.type == elf.PT_LOAD and ph.memsz]
        syms = elf.symbols(blob, ("pykvm_stubs64", "pykvm_stubs32"))
    except elf.ElfError as e:
        raise ToolchainError(f"firmware {path}: {e}; rebuild with `make -C firmware`") from None
    missing = [n for n in ("pykvm_stubs64", "pykvm_stubs32") if n not in syms]
    if missing:
        raise ToolchainError(f"firmware {path} lacks symbols {missing}; rebuild with `make -C firmware`")
    lo, hi = abi.PYKVM_STUBS_ADDR, abi.PYKVM_STUBS_ADDR + abi.PYKVM_STUBS_MAX
    for s in segs:
        if not (lo <= s.paddr and s.pend <= hi):
            raise ToolchainError(f"firmware {path}: segment {s.paddr:#x}-{s.pend:#x} is outside its slot {lo:#x}-{hi:#x}")
    return Firmware(segs, syms["pykvm_stubs64"], syms["pykvm_stubs32"])
