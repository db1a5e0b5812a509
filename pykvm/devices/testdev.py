"""QEMU's pc-testdev, the helper device kvm-unit-tests expects on a PC (layout learned from QEMU; own code).

  0xe0..0xe3   a 32-bit latch: writes of any width land at the byte offset, reads give them back
  0xe4..0xe7   flush-page: QEMU remaps the written page to shake the host TLB; here a counted no-op
               (guest memory is never remapped under a running guest)
  0xe8..0xeb   the same latch again, decoded byte by byte (QEMU splits wide accesses)
  0x2000+n     IRQ line n (0..23): a byte write drives ISA/GSI line n to (value != 0); reads 0
  0xff000000   64 KiB of plain RAM behind MMIO ("IO RAM"), so tests can run instructions on MMIO
"""

from __future__ import annotations

from .device import Device

IOPORT_BASE = 0xE0
IOPORT_LEN = 12
IRQ_BASE = 0x2000
IRQ_LINES = 24
IORAM_BASE = 0xFF000000
IORAM_LEN = 0x10000
_FLUSH = 4                     # offset of the flush-page port inside the 0xe0 range


class PcTestdev(Device):
    """The latch and flush-page ports and the IO RAM (the IRQ lines are PcTestdevIrq: offsets are per range)."""

    name = "pc-testdev"

    def __init__(self):
        super().__init__()
        self.ports = [(IOPORT_BASE, IOPORT_LEN)]
        self.mmio = [(IORAM_BASE, IORAM_LEN)]
        self.latch = 0
        self.flushes = 0
        self.ram = bytearray(IORAM_LEN)

    def io_read(self, offset: int, size: int) -> int:
        """The latch bytes at offset (both aliases); 0 for flush-page."""
        if offset in range(_FLUSH, _FLUSH + 4):
            return 0
        shift = 8 * (offset & 3)
        return (self.latch >> shift) & ((1 << (8 * size)) - 1)

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Latch bytes or count a flush."""
        if offset in range(_FLUSH, _FLUSH + 4):
            self.flushes += 1
            return
        shift = 8 * (offset & 3)
        width = min(size, 4 - (offset & 3))             # a latch never grows past its 32 bits
        mask = ((1 << (8 * width)) - 1) << shift
        self.latch = (self.latch & ~mask) | ((value << shift) & mask)

    def mmio_read(self, offset: int, size: int) -> int:
        """Little-endian bytes of the IO RAM (an access running off the end reads zeros there)."""
        return int.from_bytes(self.ram[offset:offset + size].ljust(size, b"\0"), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Store little-endian bytes into the IO RAM."""
        end = min(offset + size, IORAM_LEN)
        if 0 <= offset < end:
            self.ram[offset:end] = value.to_bytes(size, "little")[:end - offset]

    def get_state(self) -> dict:
        """Latch and the IO RAM (hex)."""
        return {"latch": self.latch, "ram": self.ram.hex()}

    def set_state(self, state: dict) -> None:
        """Reload what get_state saved."""
        self.latch = int(state.get("latch", 0)) & 0xFFFFFFFF
        ram = bytes.fromhex(state.get("ram", ""))
        self.ram[:len(ram[:IORAM_LEN])] = ram[:IORAM_LEN]


class PcTestdevIrq(Device):
    """pc-testdev's IRQ-line ports: a byte write to 0x2000+n drives line n through `irq_line(line, level)`."""

    name = "pc-testdev-irq"

    def __init__(self, irq_line=None):
        super().__init__()
        self.ports = [(IRQ_BASE, IRQ_LINES)]
        self.irq_line = irq_line
        self.lines = [0] * IRQ_LINES

    def io_read(self, offset: int, size: int) -> int:
        """Reads give 0, as in QEMU."""
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Line `offset` goes high for a non-zero byte, low for zero."""
        if not 0 <= offset < IRQ_LINES:
            return
        level = 1 if value & 0xFF else 0
        self.lines[offset] = level
        if self.irq_line is not None:
            self.irq_line(offset, level)

    def get_state(self) -> dict:
        """The line levels the guest drove."""
        return {"lines": list(self.lines)}
