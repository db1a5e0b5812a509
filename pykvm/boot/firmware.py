"""The firmware image: exception stubs loaded into every guest, found by their ELF symbols."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import abi
from ..errors import ToolchainError
from .image import LoadSegment


@dataclass
class Firmware:
    """Stub code to load and where the 64-bit and 32-bit stub tables start."""

    segments: list[LoadSegment]
    stubs64: int
    stubs32: int


def load_firmware(path: Path) -> Firmware:
    """Read the built stubs ELF and check it stays inside its slot in the firmware area."""
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            segs = [LoadSegment(ph["p_paddr"], ph["p_vaddr"], ph.data(), ph["p_memsz"])
                    for ph in elf.iter_segments() if ph["p_type"] == "PT_LOAD" and ph["p_memsz"]]
            symtab = elf.get_section_by_name(".symtab")
            syms = {name: symtab.get_symbol_by_name(name) for name in ("pykvm_stubs64", "pykvm_stubs32")}
    except OSError as e:
        raise ToolchainError(f"firmware {path}: {e.strerror}; rebuild with `make -C firmware`") from None
    missing = [n for n, s in syms.items() if not s]
    if missing or symtab is None:
        raise ToolchainError(f"firmware {path} lacks symbols {missing}; rebuild with `make -C firmware`")
    lo, hi = abi.PYKVM_STUBS_ADDR, abi.PYKVM_STUBS_ADDR + abi.PYKVM_STUBS_MAX
    for s in segs:
        if not (lo <= s.paddr and s.pend <= hi):
            raise ToolchainError(f"firmware {path}: segment {s.paddr:#x}-{s.pend:#x} is outside its slot {lo:#x}-{hi:#x}")
    return Firmware(segs, syms["pykvm_stubs64"][0]["st_value"], syms["pykvm_stubs32"][0]["st_value"])
