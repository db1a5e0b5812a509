"""A minimal PCI host: configuration mechanism #1 (0xcf8/0xcfc) over bus 0, a q35-style host bridge at 00:00.0.

Functions plug in with `attach`: the host gives each the next free slot, and, standing in for the
firmware a PC would run first, places its memory BARs in the PCI hole (below the IOAPIC), sets
memory decode and writes its INTx GSI into the Interrupt Line register (pin A of slot s is GSI
16 + (s & 3), the IOAPIC's PCI pins). After that the guest owns the configuration space: sizing,
moving or disabling a BAR moves the function's MMIO range through `DeviceManager.set_mmio`, and a
32-bit BAR whose range would reach 4 GiB (what BAR sizing writes) decodes nowhere, as in QEMU.

`PciConfig` is one function's 256-byte configuration space (type 0 header, an MSI capability when
asked for), with per-byte write masks so read-only fields stay what the device says they are.
DMA and MSIs of a function go through `host.dma(...)` and `host.msi(...)`: through the IOMMU when
one is attached, else straight to guest RAM and the local APICs.
"""

from __future__ import annotations

import threading

from ..errors import DeviceConfigError
from .device import Device
from .vtd_tables import VtdFault

CONFIG_ADDRESS = 0xCF8
CONFIG_PORTS = 8               # 0xcf8..0xcff: the address register and the four data bytes
SLOTS = 32
HOLE_START = 0xFE800000        # where the "firmware" places BARs (above the identity device's default)
HOLE_END = 0xFEC00000          # the IOAPIC

# configuration-space offsets
VENDOR, DEVICE, COMMAND, STATUS, REVISION, CLASS = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
HEADER_TYPE, BAR0, SUBSYS_VENDOR, SUBSYS, CAP_PTR, INT_LINE, INT_PIN = 0x0E, 0x10, 0x2C, 0x2E, 0x34, 0x3C, 0x3D
CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 1 << 0, 1 << 1, 1 << 2, 1 << 10
STATUS_INTX, STATUS_CAP_LIST = 1 << 3, 1 << 4
STATUS_MASTER_ABORT = 1 << 13          # Received Master Abort: a DMA of the function reached nothing
STATUS_ERRORS = 0xF900                 # the error bits (parity, target/master aborts, SERR): write 1 to clear
MSI_CAP_ID = 0x05
MSI_ENABLE, MSI_64BIT = 1 << 0, 1 << 7
BAR_MEM64 = 0x4


class PciConfig:
    """One function's configuration space: header fields, memory BARs, optional 64-bit MSI capability."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 bars: tuple[int, ...] = (), msi_offset: int | None = None, int_pin: int = 0):
        self.data = bytearray(256)
        self.wmask = bytearray(256)
        self.w1c = bytearray(256)
        self.bar_sizes = list(bars) + [0] * (6 - len(bars))
        self._put(VENDOR, vendor, 2)
        self._put(DEVICE, device, 2)
        self._put(REVISION, revision, 1)
        self._put(CLASS, class_code, 3)
        self._mask(COMMAND, CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE, 2)
        self.w1c[STATUS:STATUS + 2] = STATUS_ERRORS.to_bytes(2, "little")
        self._put(0x0C, 0, 1)
        self._mask(0x0C, 0xFF, 1)                       # cache line size
        self._mask(0x0D, 0xFF, 1)                       # latency timer
        for n, size in enumerate(self.bar_sizes):
            if size:
                if size & (size - 1) or not 16 <= size <= 1 << 31:
                    raise ValueError(f"BAR {n} size {size:#x} is not a power of two in 16..2 GiB")
                self._mask(BAR0 + 4 * n, ~(size - 1) & 0xFFFFFFF0, 4)   # 32-bit, non-prefetchable memory
        self._mask(INT_LINE, 0xFF, 1)
        self._put(INT_PIN, int_pin, 1)
        self.msi_offset = msi_offset
        if msi_offset is not None:
            self._put(STATUS, STATUS_CAP_LIST, 2)
            self._put(CAP_PTR, msi_offset, 1)
            self._put(msi_offset, MSI_CAP_ID, 1)
            self._put(msi_offset + 2, MSI_64BIT, 2)     # one vector, 64-bit address, no per-vector masking
            self._mask(msi_offset + 2, MSI_ENABLE, 2)
            self._mask(msi_offset + 4, 0xFFFFFFFC, 4)
            self._mask(msi_offset + 8, 0xFFFFFFFF, 4)
            self._mask(msi_offset + 12, 0xFFFF, 2)

    def _put(self, off: int, value: int, size: int) -> None:
        self.data[off:off + size] = value.to_bytes(size, "little")

    def _mask(self, off: int, mask: int, size: int) -> None:
        self.wmask[off:off + size] = mask.to_bytes(size, "little")

    def get(self, off: int, size: int) -> int:
        """Little-endian bytes of the configuration space (the caller keeps off + size <= 256)."""
        return int.from_bytes(self.data[off:off + size], "little")

    def read(self, off: int, size: int) -> int:
        """A guest read."""
        return self.get(off, size)

    def write(self, off: int, size: int, value: int) -> None:
        """A guest write: only the writable bits change."""
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            o = off + i
            self.data[o] = ((self.data[o] & ~self.wmask[o]) | (b & self.wmask[o])) & ~(b & self.w1c[o]) & 0xFF

    def bar_address(self, n: int) -> int | None:
        """Where memory BAR n decodes now: None when memory decode is off or the BAR is being sized."""
        size = self.bar_sizes[n]
        if not size or not self.get(COMMAND, 2) & CMD_MEMORY:
            return None
        base = self.get(BAR0 + 4 * n, 4) & ~0xF
        if base == 0 or base + size > 0xFFFFFFFF:       # unassigned, or all ones written to size it
            return None
        return base

    def set_bar(self, n: int, base: int) -> None:
        """Firmware placement of BAR n."""
        self._put(BAR0 + 4 * n, base & ~(self.bar_sizes[n] - 1), 4)

    @property
    def bus_master(self) -> bool:
        """Whether the function may start DMA (and MSIs, which are DMA writes)."""
        return bool(self.get(COMMAND, 2) & CMD_MASTER)

    def msi(self) -> tuple[int, int] | None:
        """The (address, data) the MSI capability holds when enabled, else None."""
        o = self.msi_offset
        if o is None or not self.get(o + 2, 2) & MSI_ENABLE:
            return None
        return self.get(o + 4, 4) | (self.get(o + 8, 4) << 32), self.get(o + 12, 2)


class PciFunction(Device):
    """A device model that is a PCI function: `pci` is its configuration space, `host` its bus."""

    pci: PciConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.host = None
        self.devfn = None
        self.mmio = []

    @property
    def sid(self) -> int:
        """Requester ID (bus 0, device, function)."""
        return self.devfn or 0

    def config_written(self, off: int, size: int) -> None:
        """Hook after a guest configuration write (MSI enable, command changes)."""

    def master_abort(self) -> None:
        """A DMA of this function reached no memory: flag Received Master Abort in its status."""
        self.pci._put(STATUS, self.pci.get(STATUS, 2) | STATUS_MASTER_ABORT, 2)

    def set_intx(self, level: int) -> None:
        """Drive the function's INTx pin (unless the guest disabled INTx)."""
        host = self.host
        if host is None:
            return
        if self.pci.get(COMMAND, 2) & CMD_INTX_DISABLE:
            level = 0
        status = self.pci.get(STATUS, 2)
        self.pci._put(STATUS, (status | STATUS_INTX) if level else (status & ~STATUS_INTX), 2)
        host.intx(self.pci.get(INT_LINE, 1), level)


class HostBridge:
    """00:00.0: the q35 memory controller hub's identity, nothing behind it."""

    def __init__(self):
        self.pci = PciConfig(0x8086, 0x29C0, 0x060000)
        self.devfn = 0

    def config_written(self, off: int, size: int) -> None:
        """Nothing to do."""


class PciHost(Device):
    """Configuration mechanism #1 over bus 0; owns the function table and places BARs."""

    name = "pci-host"

    def __init__(self, irq_line=None, msi=None, memory=None):
        super().__init__()
        self.ports = [(CONFIG_ADDRESS, CONFIG_PORTS)]
        self.lock = threading.RLock()
        self.address = 0
        self.functions: dict[int, object] = {0: HostBridge()}
        self.irq_line = irq_line           # (gsi, level)
        self.deliver = msi                 # (address, data): KVM_SIGNAL_MSI
        self.memory = memory
        self.iommu = None                  # an IntelIommu once attached
        self.moves = 0                     # host-side account: BAR windows moved by the guest

    # ------------------------------------------------------------ plugging functions in
    def attach(self, fn: PciFunction, placed=None) -> None:
        """Give `fn` the next free slot and place its BARs where `placed(base, size)` says the range is free."""
        with self.lock:
            slot = next((s for s in range(1, SLOTS) if s << 3 not in self.functions), None)
            if slot is None:
                raise ValueError("pci-host: bus 0 has no free slot")
            fn.devfn = slot << 3
            fn.host = self
            self.functions[fn.devfn] = fn
            cfg = fn.pci
            if cfg.get(INT_PIN, 1):
                cfg._put(INT_LINE, 16 + ((slot + cfg.get(INT_PIN, 1) - 1) & 3), 1)
            for n, size in enumerate(cfg.bar_sizes):
                if size:
                    cfg.set_bar(n, self._place(size, placed))
            if any(cfg.bar_sizes):
                cfg._put(COMMAND, cfg.get(COMMAND, 2) | CMD_MEMORY, 2)
            fn.mmio = self._ranges(fn)

    def _place(self, size: int, placed) -> int:
        taken = [r for f in self.functions.values() if isinstance(f, PciFunction) for r in f.mmio]
        base = HOLE_START
        while base + size <= HOLE_END:
            if not any(base < b + n and b < base + size for b, n in taken) and (placed is None or placed(base, size)):
                return base
            base += size
        raise ValueError(f"pci-host: no room for a {size:#x}-byte BAR below {HOLE_END:#x}")

    @staticmethod
    def _ranges(fn) -> list[tuple[int, int]]:
        return [(base, fn.pci.bar_sizes[n]) for n in range(6) if (base := fn.pci.bar_address(n)) is not None]

    # ------------------------------------------------------------ configuration mechanism #1
    def _target(self, offset: int):
        addr = self.address
        if not addr >> 31 or (addr >> 16) & 0xFF:      # disabled, or a bus we do not have
            return None, 0
        fn = self.functions.get((addr >> 8) & 0xFF)
        # the register's low bits may come from CONFIG_ADDRESS as well as the data port (QEMU honours
        # both, and kvm-unit-tests selects PCI_DEVICE_ID as register 2 then reads 0xcfc)
        return fn, (addr & 0xFF) | (offset - 4)

    def io_read(self, offset: int, size: int) -> int:
        """CONFIG_ADDRESS, or the selected function's configuration bytes (absent: all ones)."""
        with self.lock:
            if offset < 4:
                return (self.address >> (8 * offset)) & ((1 << (8 * size)) - 1)
            fn, reg = self._target(offset)
            if fn is None or reg + size > 256:
                return (1 << (8 * size)) - 1
            return fn.pci.read(reg, size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Select a register (a 32-bit write to 0xcf8) or write configuration bytes."""
        with self.lock:
            if offset < 4:
                if offset == 0 and size == 4:
                    self.address = value & 0x80FFFFFF
                return
            fn, reg = self._target(offset)
            if fn is None or reg + size > 256:
                return
            fn.pci.write(reg, size, value)
            fn.config_written(reg, size)
            if isinstance(fn, PciFunction) and (reg < BAR0 + 24 and reg + size > COMMAND):
                self._remap(fn)

    def _remap(self, fn: PciFunction) -> None:
        ranges = self._ranges(fn)
        if ranges == fn.mmio:
            return
        mgr = fn.manager
        try:
            if mgr is not None:
                mgr.set_mmio(fn, ranges)
            else:
                fn.mmio = ranges
            self.moves += 1
        except DeviceConfigError:
            # the guest placed a BAR over something else: like an unroutable BAR, it decodes nowhere
            if mgr is not None:
                mgr.set_mmio(fn, [])

    # ------------------------------------------------------------ what functions do on the bus
    def intx(self, gsi: int, level: int) -> None:
        """An INTx pin changed: its GSI (the Interrupt Line the firmware wrote) follows."""
        if self.irq_line is not None and 0 <= gsi < 24:
            self.irq_line(gsi, level)

    def msi(self, fn: PciFunction, address: int, data: int) -> None:
        """A function's MSI write: remapped by the IOMMU if present, else delivered as it is."""
        if not fn.pci.bus_master:
            return
        if (address >> 20) != 0xFEE or address >> 32:
            # not the interrupt window: a plain memory write, which a write to nothing turns into a
            # master abort (dropped, flagged in the function's status by dma_write), never an error of ours
            try:
                self.dma_write(fn, address, (data & 0xFFFFFFFF).to_bytes(4, "little"))
            except DmaError:
                pass
            return
        if self.iommu is not None:
            self.iommu.interrupt(address, data, fn.sid)
        elif self.deliver is not None:
            self.deliver(address, data)

    def _pieces(self, fn: PciFunction, address: int, length: int, write: bool) -> list[tuple[int, int]]:
        if self.iommu is not None:
            return self.iommu.dma(fn.sid, address, length, write)
        if self.memory is None or address < 0 or self.memory.region_of(address, length) is None:
            raise DmaError(f"{address:#x}+{length:#x} is not guest RAM")
        return [(address, length)]

    def _checked_pieces(self, fn: PciFunction, address: int, length: int, write: bool) -> list[tuple[int, int]]:
        if not fn.pci.bus_master:
            raise DmaError("bus mastering is off")
        try:
            return self._pieces(fn, address, length, write)
        except VtdFault as f:
            fn.master_abort()
            raise DmaError(str(f)) from None
        except DmaError:
            fn.master_abort()
            raise

    def dma_read(self, fn: PciFunction, address: int, length: int) -> bytes:
        """`length` bytes a function reads at its DMA address; DmaError (the function's status flags it) if refused."""
        return b"".join(self.memory.read(gpa, n) for gpa, n in self._checked_pieces(fn, address, length, False))

    def dma_write(self, fn: PciFunction, address: int, data: bytes) -> None:
        """Write `data` at a function's DMA address (all pieces are checked before any byte lands)."""
        pieces = self._checked_pieces(fn, address, len(data), True)
        pos = 0
        for gpa, n in pieces:
            self.memory.write(gpa, data[pos:pos + n])
            pos += n

    def get_state(self) -> dict:
        """The selected configuration address."""
        return {"address": self.address}


class DmaError(Exception):
    """A DMA the bus refused (no bus mastering, not RAM, or an IOMMU fault)."""
