"""QEMU's `edu` teaching device (PCI 1234:11e8), the DMA and interrupt source kvm-unit-tests' IOMMU test drives.

Layout learned from QEMU's documentation of the device (docs/specs/edu.rst); the code is our own.
BAR0 is 1 MiB of registers (32-bit accesses below 0x80, 32- or 64-bit from 0x80; any other
access reads all ones and writes nothing):

  0x00 R   identification 0x010000ed (version 1.0)      0x04 RW  liveness: reads back ~value
  0x08 RW  factorial: a write computes value! (mod 2^32)  0x20 RW  status: bit 0 computing (RO),
  0x24 R   interrupt status                                         bit 7 interrupt when a factorial ends
  0x60 W   raise: status |= value, interrupt               0x64 W   acknowledge: status &= ~value
  0x80 RW  DMA source    0x88 RW  DMA destination    0x90 RW  DMA count
  0x98 RW  DMA command: bit 0 start (reads 1 while running), bit 1 direction (1: device buffer to
           RAM), bit 2 raise interrupt 0x100 when done

The device's 4 KiB buffer sits at 0x40000 in its DMA view; the other address of a transfer is a
bus address (28-bit DMA mask, as QEMU's default), which the PCI host sends through the IOMMU when
there is one. Transfers and factorials complete synchronously, so the guest's polling loops see
them done at their first read. A transfer the buffer bounds or the bus refuse sets no byte and
counts an error (QEMU would abort the whole VM). Interrupts are MSIs when the guest enabled the
capability, else INTx pin A, level-triggered while the interrupt status is non-zero.
"""

from __future__ import annotations

from .pci import DmaError, PciConfig, PciFunction

BAR_SIZE = 1 << 20
ID = 0x010000ED
BUF_BASE = 0x40000
BUF_SIZE = 4096
DMA_MASK = (1 << 28) - 1
STATUS_COMPUTING, STATUS_IRQ_FACT = 0x01, 0x80
CMD_START, CMD_FROM_DEVICE, CMD_IRQ = 0x1, 0x2, 0x4
IRQ_FACT, IRQ_DMA = 0x1, 0x100
REG_ID, REG_ALIVE, REG_FACT, REG_STATUS, REG_IRQ_STATUS = 0x00, 0x04, 0x08, 0x20, 0x24
REG_RAISE, REG_ACK, REG_SRC, REG_DST, REG_COUNT, REG_CMD = 0x60, 0x64, 0x80, 0x88, 0x90, 0x98
MASK32, MASK64 = 0xFFFFFFFF, (1 << 64) - 1


class Edu(PciFunction):
    """The edu device's registers, DMA engine and interrupt logic."""

    name = "edu"

    def __init__(self):
        super().__init__()
        self.pci = PciConfig(0x1234, 0x11E8, 0x00FF00, revision=0x10, bars=(BAR_SIZE,), msi_offset=0x40, int_pin=1)
        self.alive = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_regs = {REG_SRC: 0, REG_DST: 0, REG_COUNT: 0, REG_CMD: 0}
        self.buffer = bytearray(BUF_SIZE)
        # host-side account
        self.transfers: list[tuple[int, int, int, bool]] = []   # (src, dst, count, from_device) of the latest 16 done
        self.dma_errors: list[str] = []

    # ------------------------------------------------------------ registers
    def mmio_read(self, offset: int, size: int) -> int:
        """A register (see the module doc), or all ones for what the device does not decode."""
        if not self._sized(offset, size):
            return (1 << (8 * size)) - 1
        if offset == REG_ID:
            return ID
        if offset == REG_ALIVE:
            return ~self.alive & MASK32
        if offset == REG_FACT:
            return self.fact
        if offset == REG_STATUS:
            return self.status
        if offset == REG_IRQ_STATUS:
            return self.irq_status
        reg = offset & ~7
        if reg in self.dma_regs:
            value = self.dma_regs[reg] >> (8 * (offset & 7))
            return value & ((1 << (8 * size)) - 1)
        return (1 << (8 * size)) - 1

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Store a register and run what it starts."""
        if not self._sized(offset, size):
            return
        value &= (1 << (8 * size)) - 1
        if offset == REG_ALIVE:
            self.alive = value
        elif offset == REG_FACT:
            self._factorial(value)
        elif offset == REG_STATUS:
            self.status = (self.status & STATUS_COMPUTING) | (value & STATUS_IRQ_FACT)
        elif offset == REG_RAISE:
            self.raise_irq(value)
        elif offset == REG_ACK:
            self.lower_irq(value)
        elif offset & ~7 in self.dma_regs:
            reg, shift = offset & ~7, 8 * (offset & 7)
            mask = ((1 << (8 * size)) - 1) << shift
            new = (self.dma_regs[reg] & ~mask) | (value << shift)
            if reg == REG_CMD:
                if not self.dma_regs[REG_CMD] & CMD_START:       # a running command ignores writes
                    self.dma_regs[REG_CMD] = new & MASK64
                    if new & CMD_START:
                        self._dma()
            else:
                self.dma_regs[reg] = new & MASK64

    @staticmethod
    def _sized(offset: int, size: int) -> bool:
        if offset < 0x80:
            return size == 4 and not offset & 3
        return size in (4, 8) and not offset & (size - 1) and offset < 0x100

    # ------------------------------------------------------------ engines
    def _factorial(self, n: int) -> None:
        if self.status & STATUS_COMPUTING:
            return
        result = 1
        for k in range(2, min(n, 34) + 1):       # from 34! on the low 32 bits are all zero
            result = (result * k) & MASK32
        self.fact = result if n < 34 else 0
        if self.status & STATUS_IRQ_FACT:
            self.raise_irq(IRQ_FACT)

    def _dma(self) -> None:
        cmd = self.dma_regs[REG_CMD]
        src, dst, count = self.dma_regs[REG_SRC], self.dma_regs[REG_DST], self.dma_regs[REG_COUNT]
        from_device = bool(cmd & CMD_FROM_DEVICE)
        local, bus = (src, dst) if from_device else (dst, src)
        try:
            if not (BUF_BASE <= local and local + count <= BUF_BASE + BUF_SIZE):
                raise DmaError(f"buffer range {local:#x}+{count:#x} outside {BUF_BASE:#x}+{BUF_SIZE:#x}")
            if self.host is None:
                raise DmaError("not on a bus")
            at = local - BUF_BASE
            if from_device:
                self.host.dma_write(self, bus & DMA_MASK, bytes(self.buffer[at:at + count]))
            else:
                self.buffer[at:at + count] = self.host.dma_read(self, bus & DMA_MASK, count)
            self.transfers.append((src, dst, count, from_device))
            del self.transfers[:-16]              # the latest only: the guest starts as many as it likes
        except DmaError as e:
            self.dma_errors.append(str(e)[:200])
            del self.dma_errors[:-16]
        self.dma_regs[REG_CMD] = cmd & ~CMD_START
        if cmd & CMD_IRQ:
            self.raise_irq(IRQ_DMA)

    # ------------------------------------------------------------ interrupts
    def raise_irq(self, bits: int) -> None:
        """Set interrupt status bits; an MSI goes out, or INTx rises."""
        self.irq_status |= bits & MASK32
        if not self.irq_status:
            return
        msi = self.pci.msi()
        if msi is not None:
            if self.host is not None:
                self.host.msi(self, *msi)
        else:
            self.set_intx(1)

    def lower_irq(self, bits: int) -> None:
        """Clear interrupt status bits; INTx falls once none is left."""
        self.irq_status &= ~bits & MASK32
        if not self.irq_status and self.pci.msi() is None:
            self.set_intx(0)

    def config_written(self, off: int, size: int) -> None:
        """With MSI enabled the INTx pin is released."""
        if self.pci.msi() is not None:
            self.set_intx(0)

    # ------------------------------------------------------------ state
    def get_state(self) -> dict:
        """Registers, buffer and configuration space."""
        return {"alive": self.alive, "fact": self.fact, "status": self.status, "irq_status": self.irq_status,
                "dma": {str(k): v for k, v in self.dma_regs.items()}, "buffer": self.buffer.hex(),
                "config": self.pci.data.hex()}
