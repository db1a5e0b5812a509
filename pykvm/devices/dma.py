"""A small memory-to-memory DMA engine: copies LEN bytes of guest RAM from SRC to DST on START.

It is the device the access policy (policy.py, dma.toml) has something meaningful to bound: the
source and destination addresses, the bus-master (decode) enable, the interrupt routing and the
reset are system-scope registers; LEN, START and SCRATCH are the device's own business.

Registers: 32-bit I/O ports at PYKVM_PORT_DMA + offset (layout in guests/include/pykvm_abi.h,
PYKVM_DMA_*); narrower accesses read or write the bytes they cover.

    SRC_LO/SRC_HI  source guest-physical address          DST_LO/DST_HI  destination
    LEN            bytes to copy (the engine caps it at PYKVM_DMA_MAX_LEN)
    CTRL           bit 0 START (write 1: run the copy now; reads 0), bit 1 ENABLE (bus master),
                   bit 2 IRQ_EN (raise the line in bits 8-11 when a copy completes)
    STATUS         read-only: bit 0 DONE, bit 1 ERROR, bits 8-15 the error code
                   (PYKVM_DMA_ERR_DISABLED: START without ENABLE; PYKVM_DMA_ERR_RANGE: SRC or DST
                   range is not wholly guest RAM)
    RESET          write-only: any write returns every register to zero
    SCRATCH        a plain read/write register

The engine reaches guest memory only through `memory` (GuestMemory, or anything with
`region_of(gpa, length)`, `read(gpa, n)` and `write(gpa, data)`): a range that is not wholly RAM
sets ERROR and touches nothing, so a guest can never make it read or write host memory. Copies
are synchronous, on the vCPU thread that wrote START, and behave like memmove.
"""

from __future__ import annotations

from .. import abi
from .device import Device

MAX_LEN = abi.PYKVM_DMA_MAX_LEN
CTRL_START = abi.PYKVM_DMA_CTRL_START
CTRL_ENABLE = abi.PYKVM_DMA_CTRL_ENABLE
CTRL_IRQ_EN = abi.PYKVM_DMA_CTRL_IRQ_EN
CTRL_IRQ_MASK = abi.PYKVM_DMA_CTRL_IRQ_MASK
CTRL_IRQ_SHIFT = abi.PYKVM_DMA_CTRL_IRQ_SHIFT
CTRL_CONFIG = CTRL_ENABLE | CTRL_IRQ_EN | CTRL_IRQ_MASK    # what CTRL keeps (START is a command)
STATUS_DONE = abi.PYKVM_DMA_STATUS_DONE
STATUS_ERROR = abi.PYKVM_DMA_STATUS_ERROR
ERR_SHIFT = abi.PYKVM_DMA_ERR_SHIFT
ERR_DISABLED = abi.PYKVM_DMA_ERR_DISABLED
ERR_RANGE = abi.PYKVM_DMA_ERR_RANGE
MASK32 = 0xFFFFFFFF

# register offset -> attribute holding its 32-bit value
_REGS = {abi.PYKVM_DMA_SRC_LO: "src_lo", abi.PYKVM_DMA_SRC_HI: "src_hi", abi.PYKVM_DMA_DST_LO: "dst_lo",
         abi.PYKVM_DMA_DST_HI: "dst_hi", abi.PYKVM_DMA_LEN: "length", abi.PYKVM_DMA_CTRL: "ctrl",
         abi.PYKVM_DMA_STATUS: "status", abi.PYKVM_DMA_RESET: None, abi.PYKVM_DMA_SCRATCH: "scratch"}
_STATE = ("src_lo", "src_hi", "dst_lo", "dst_hi", "length", "ctrl", "status", "scratch")


class Dma(Device):
    """Memory-to-memory copy engine over guest RAM (see the module doc for the registers)."""

    name = "dma"

    def __init__(self, memory=None, base: int = abi.PYKVM_PORT_DMA, irq=None):
        super().__init__(memory=memory, base=base, irq=irq)
        self.ports = [(base, abi.PYKVM_DMA_PORTS)]
        self.memory = memory
        self.irq = irq                 # callable(line) or None: how a completion interrupt is raised
        self._zero()
        # host-side account (not guest-visible state)
        self.resets = 0
        self.transfers: list[tuple[int, int, int]] = []   # (src, dst, length) of the latest 16 copies
        self.errors = 0
        self.interrupts: list[int] = []                   # lines raised

    def _zero(self) -> None:
        self.src_lo = self.src_hi = self.dst_lo = self.dst_hi = 0
        self.length = self.ctrl = self.status = self.scratch = 0

    # -- what the engine acts on --
    @property
    def src(self) -> int:
        return (self.src_hi << 32) | self.src_lo

    @property
    def dst(self) -> int:
        return (self.dst_hi << 32) | self.dst_lo

    # -- state --
    def get_state(self) -> dict:
        """Every register the guest programmed."""
        return {k: getattr(self, k) for k in _STATE}

    def set_state(self, state: dict) -> None:
        """Load registers saved by get_state() (validated: they may come from a file)."""
        values = {k: state.get(k, 0) for k in _STATE}
        if not all(isinstance(v, int) and 0 <= v <= MASK32 for v in values.values()):
            raise ValueError("dma state: registers must be 32-bit values")
        if values["length"] > MAX_LEN:
            raise ValueError(f"dma state: length {values['length']:#x} exceeds the engine's {MAX_LEN:#x}")
        values["ctrl"] &= CTRL_CONFIG
        for k, v in values.items():
            setattr(self, k, v)

    def check(self) -> None:
        """LEN within the cap, CTRL holding no command bit."""
        if not 0 <= self.length <= MAX_LEN or self.ctrl & ~CTRL_CONFIG:
            raise ValueError(f"dma registers inconsistent: LEN {self.length:#x}, CTRL {self.ctrl:#x}")

    # -- registers --
    def io_read(self, offset: int, size: int) -> int:
        """The bytes of the 32-bit register(s) covering [offset, offset + size)."""
        if size == 4 and not offset & 3:
            attr = _REGS.get(offset, False)
            return getattr(self, attr) if attr else 0xFFFFFFFF if attr is False else 0
        value = 0
        for i in range(size):
            reg, byte = (offset + i) & ~3, (offset + i) & 3
            attr = _REGS.get(reg)
            b = (getattr(self, attr) >> (8 * byte)) & 0xFF if attr else (0 if reg in _REGS else 0xFF)
            value |= b << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Merge the bytes written into each register they cover, then apply that register's effect."""
        if size == 4 and not offset & 3:
            if offset in _REGS:
                self._store(offset, value & MASK32)
            return
        touched: dict[int, int] = {}
        for i in range(size):
            reg, byte = (offset + i) & ~3, (offset + i) & 3
            if reg not in _REGS:
                continue
            cur = touched.get(reg)
            if cur is None:
                attr = _REGS[reg]
                cur = getattr(self, attr) if attr else 0
            shift = 8 * byte
            touched[reg] = (cur & ~(0xFF << shift)) | (((value >> (8 * i)) & 0xFF) << shift)
        for reg, v in touched.items():
            self._store(reg, v & MASK32)

    def _store(self, reg: int, v: int) -> None:
        if reg == abi.PYKVM_DMA_RESET:
            self.reset()
        elif reg == abi.PYKVM_DMA_LEN:
            self.length = min(v, MAX_LEN)
        elif reg == abi.PYKVM_DMA_CTRL:
            self.ctrl = v & CTRL_CONFIG
            if v & CTRL_START:
                self.start()
        elif reg == abi.PYKVM_DMA_STATUS:
            pass  # read-only
        else:
            setattr(self, _REGS[reg], v)

    # -- the engine --
    def reset(self) -> None:
        """Every register back to zero."""
        self._zero()
        self.resets += 1

    def _ram(self, gpa: int, n: int) -> bool:
        mem = self.memory
        return mem is not None and mem.region_of(gpa, n) is not None

    def start(self) -> None:
        """Run one copy of LEN bytes SRC -> DST now; STATUS says how it went."""
        if not self.ctrl & CTRL_ENABLE:
            self._fail(ERR_DISABLED)
            return
        src, dst, n = self.src, self.dst, self.length
        if n:
            if not (self._ram(src, n) and self._ram(dst, n)):
                self._fail(ERR_RANGE)
                return
            self.memory.write(dst, self.memory.read(src, n))
        self.transfers.append((src, dst, n))
        del self.transfers[:-16]                  # the latest only: the guest starts as many as it likes
        self.status = STATUS_DONE
        if self.ctrl & CTRL_IRQ_EN:
            line = (self.ctrl & CTRL_IRQ_MASK) >> CTRL_IRQ_SHIFT
            self.interrupts.append(line)
            if self.irq is not None:
                self.irq(line)

    def _fail(self, code: int) -> None:
        self.errors += 1
        self.status = STATUS_ERROR | (code << ERR_SHIFT)
