"""Symbolize guest addresses with a kernel ELF's symbol table (pyelftools)."""

from __future__ import annotations

import bisect
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

# A size-less symbol (an assembly label) claims addresses up to this far past it.
_UNSIZED_REACH = 64 * 1024


class SymbolError(Exception):
    """The kernel file cannot be read for symbols."""


class SymbolTable:
    """Function and label symbols sorted by address."""

    def __init__(self, symbols: list[tuple[int, int, str]]):
        self._syms = sorted(symbols)
        self._starts = [s[0] for s in self._syms]

    @classmethod
    def from_elf(cls, path) -> "SymbolTable":
        """Load STT_FUNC and STT_NOTYPE symbols from .symtab (or .dynsym) of an ELF file."""
        syms = []
        try:
            with open(Path(path), "rb") as f:
                elf = ELFFile(f)
                tables = [s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)]
                tables.sort(key=lambda s: s.name != ".symtab")
                for tab in tables[:1]:
                    for sym in tab.iter_symbols():
                        kind = sym["st_info"]["type"]
                        if kind in ("STT_FUNC", "STT_NOTYPE") and sym.name and sym["st_value"] \
                                and sym["st_shndx"] != "SHN_UNDEF":
                            syms.append((sym["st_value"], sym["st_size"], sym.name))
        except Exception as e:  # noqa: BLE001 - pyelftools raises assorted errors on a damaged ELF
            raise SymbolError(f"cannot read symbols from {path}: {type(e).__name__}: {e}") from e
        return cls(syms)

    def lookup(self, addr: int) -> tuple[str, int] | None:
        """(name, offset) of the symbol holding `addr`, preferring sized functions over labels."""
        i = bisect.bisect_right(self._starts, addr) - 1
        best = None
        # Walk back over symbols at or before addr: a sized symbol that covers it wins.
        for j in range(i, max(i - 16, -1), -1):
            start, size, name = self._syms[j]
            if size and start <= addr < start + size:
                return name, addr - start
            if not size and best is None and addr - start < _UNSIZED_REACH:
                best = (name, addr - start)
        return best

    def format(self, addr: int, call_site: bool = False) -> str | None:
        """'name+0xoff' for addr; for return addresses (call_site) look up addr-1 so tail calls don't mislead."""
        hit = self.lookup(addr - 1 if call_site and addr else addr)
        if hit is None:
            return None
        name, off = hit
        off += 1 if call_site and addr else 0
        return f"{name}+{off:#x}" if off else name

    def start_of(self, addr: int) -> int | None:
        """Start address of the function holding `addr`."""
        hit = self.lookup(addr)
        return None if hit is None else addr - hit[1]
