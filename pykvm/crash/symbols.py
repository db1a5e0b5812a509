"""Symbolize guest addresses with a kernel ELF's symbol table (read by boot/elf.py)."""

from __future__ import annotations

import bisect
import mmap

from ..boot import elf

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
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                table = elf.symbol_table(blob)
        except (OSError, ValueError) as e:    # ElfError is a ValueError; mmap refuses an empty file with one
            raise SymbolError(f"cannot read symbols from {path}: {type(e).__name__}: {e}") from e
        return cls([(value, size, name) for name, value, size, kind, shndx in table
                    if kind in (elf.STT_FUNC, elf.STT_NOTYPE) and name and value and shndx != elf.SHN_UNDEF])

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
