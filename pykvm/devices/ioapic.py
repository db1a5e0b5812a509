"""A userspace I/O APIC (82093AA-style, version 0x20) for the split irqchip: pins become MSIs to the in-kernel LAPICs.

The guest programs redirection entries through IOREGSEL (0x00) / IOWIN (0x10) and may end a
level-triggered interrupt through the EOI register (0x40) or, as usual, by EOI of its LAPIC: KVM
then exits with KVM_EXIT_IOAPIC_EOI and the machine calls `eoi(vector)`. KVM only exits for the
vectors it finds in the GSI routing table as level-triggered MSI routes of pins below 24, so every
redirection write hands the machine the pin's MSI through `route(pin, address, data)`; delivery is
`deliver(address, data)` (KVM_SIGNAL_MSI). The model itself never touches an ioctl.

Some hosts lose that exit: a KVM that emulates a run of guest instructions in one go (PVM batches
them) can take the EOI and then a HLT in the same batch, and the vCPU blocks with the exit still
queued, so Remote IRR would stay set and a line still high never fires again. `outstanding()` and
`recover()` let the machine finish such an EOI itself once it has seen the vector in no LAPIC's
ISR or IRR (see machine/eoi_watch.py); `on_level_sent()` tells it a level interrupt went out.
"""

from __future__ import annotations

import threading

from .device import Device

BASE = 0xFEC00000
SIZE = 0x100
PINS = 24
VERSION = 0x20
IOREGSEL, IOWIN, EOI = 0x00, 0x10, 0x40
REG_ID, REG_VERSION, REG_ARB, REG_REDIR = 0x00, 0x01, 0x02, 0x10

MASKED = 1 << 16
LEVEL = 1 << 15
REMOTE_IRR = 1 << 14
POLARITY_LOW = 1 << 13
DELIVERY_STATUS = 1 << 12
RO_BITS = REMOTE_IRR | DELIVERY_STATUS   # the guest cannot write these
ID_MASK = 0x0F000000
REMAPPABLE = 1 << 48                      # interrupt format bit of a VT-d remappable entry


def msi_of(entry: int) -> tuple[int, int]:
    """The (address, data) of the MSI a redirection entry describes (dest id, dest mode, mode, trigger, vector)."""
    dest = (entry >> 56) & 0xFF
    logical = (entry >> 11) & 1
    address = 0xFEE00000 | (dest << 12) | (logical << 2)
    if entry & REMAPPABLE:
        # remappable format (VT-d): bits 63:48 carry the IRTE handle and land in address bits 19:4,
        # bit 11 is handle[15] in address bit 2, so the IOMMU reads the handle as from any MSI
        address = 0xFEE00000 | (((entry >> 48) & 0xFFFF) << 4) | (logical << 2)
    data = (entry & 0xFF) | (((entry >> 8) & 7) << 8)
    if entry & LEVEL:
        data |= LEVEL | (1 << 14)                # level-triggered, asserted
    return address, data


class IoApic(Device):
    """24 pins; `set_irq(pin, level)` is the input side (called from any thread)."""

    name = "ioapic"

    def __init__(self, base: int = BASE, deliver=None, route=None, on_level_sent=None):
        super().__init__(base=base)
        self.mmio = [(base, SIZE)]
        self.deliver = deliver or (lambda address, data: None)
        self.route = route or (lambda pin, address, data: None)
        self.on_level_sent = on_level_sent or (lambda: None)
        self.lock = threading.RLock()
        self.ioregsel = 0
        self.id = 0
        self.redir = [MASKED] * PINS
        self.levels = [0] * PINS
        self.delivered = 0
        self.sent_at = [0] * PINS      # per pin, the value of `delivered` when its level interrupt last went out
        self.recovered = 0             # EOIs finished by recover() rather than by an EOI exit

    def prepare_hardware(self) -> None:
        """Tell the machine every pin's (masked) route, so KVM's table matches the model from the start."""
        for pin in range(PINS):
            self._publish(pin)

    # ---------------------------------------------------------------- input side
    def set_irq(self, pin: int, level: int) -> None:
        """Drive input `pin`: edge pins fire on a rising edge, level pins while high and not in service."""
        if not 0 <= pin < PINS:
            return
        with self.lock:
            old = self.levels[pin]
            self.levels[pin] = level = 1 if level else 0
            entry = self.redir[pin]
            if entry & LEVEL:
                self._service(pin)
            elif level and not old and not entry & MASKED:
                self._send(pin, entry)

    def eoi(self, vector: int) -> None:
        """A LAPIC ended `vector`: clear Remote IRR of the level pins using it, and refire lines still high."""
        with self.lock:
            for pin, entry in enumerate(self.redir):
                if entry & LEVEL and entry & REMOTE_IRR and entry & 0xFF == vector:
                    self.redir[pin] = entry & ~REMOTE_IRR
                    self._service(pin)

    def outstanding(self) -> dict[int, int]:
        """{pin: delivery number} of every level pin whose interrupt awaits its EOI (Remote IRR set)."""
        with self.lock:
            return {pin: self.sent_at[pin] for pin, e in enumerate(self.redir) if e & REMOTE_IRR}

    def recover(self, stale: dict[int, int], held: set[int]) -> list[int]:
        """End the deliveries in `stale` ({pin: delivery number}) whose vector is not in `held` (the vectors
        some LAPIC still has in its IRR or ISR): the guest EOI'd them; returns the pins so ended."""
        done = []
        with self.lock:
            for pin, number in stale.items():
                if not 0 <= pin < PINS:
                    continue
                entry = self.redir[pin]
                if entry & REMOTE_IRR and self.sent_at[pin] == number and entry & 0xFF not in held:
                    self.redir[pin] = entry & ~REMOTE_IRR
                    self.recovered += 1
                    done.append(pin)
                    self._service(pin)
        return done

    def _service(self, pin: int) -> None:
        entry = self.redir[pin]
        if self.levels[pin] and entry & LEVEL and not entry & (MASKED | REMOTE_IRR):
            self.redir[pin] = entry | REMOTE_IRR
            self._send(pin, entry)
            self.sent_at[pin] = self.delivered
            self.on_level_sent()

    def _send(self, pin: int, entry: int) -> None:
        self.delivered += 1
        self.deliver(*msi_of(entry))

    def _publish(self, pin: int) -> None:
        self.route(pin, *msi_of(self.redir[pin] & ~MASKED))

    # ---------------------------------------------------------------- registers
    def mmio_read(self, offset: int, size: int) -> int:
        """IOREGSEL, or the selected register through IOWIN (other offsets read 0)."""
        with self.lock:
            if offset == IOREGSEL:
                return self.ioregsel
            if offset == IOWIN:
                return self._read_reg(self.ioregsel)
            return 0

    def _read_reg(self, reg: int) -> int:
        if reg == REG_ID or reg == REG_ARB:
            return self.id
        if reg == REG_VERSION:
            return ((PINS - 1) << 16) | VERSION
        if REG_REDIR <= reg < REG_REDIR + 2 * PINS:
            entry = self.redir[(reg - REG_REDIR) >> 1]
            return (entry >> 32) & 0xFFFFFFFF if reg & 1 else entry & 0xFFFFFFFF
        return 0xFFFFFFFF

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Select a register, write it through IOWIN, or EOI a vector."""
        with self.lock:
            if offset == IOREGSEL:
                self.ioregsel = value & 0xFF
            elif offset == IOWIN:
                self._write_reg(self.ioregsel, value & 0xFFFFFFFF)
            elif offset == EOI:
                self.eoi(value & 0xFF)

    def _write_reg(self, reg: int, value: int) -> None:
        if reg == REG_ID:
            self.id = value & ID_MASK
            return
        if not REG_REDIR <= reg < REG_REDIR + 2 * PINS:
            return                                    # version and arbitration are read-only
        pin = (reg - REG_REDIR) >> 1
        old = self.redir[pin]
        if reg & 1:
            new = (old & 0xFFFFFFFF) | (value << 32)
        else:
            new = (old & ~0xFFFFFFFF & ((1 << 64) - 1)) | (value & ~RO_BITS) | (old & RO_BITS)
        if not new & LEVEL:
            new &= ~REMOTE_IRR                        # an edge pin has nothing in service
        self.redir[pin] = new
        self._publish(pin)
        self._service(pin)

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict:
        """ID, selector, redirection table and input levels."""
        with self.lock:
            return {"id": self.id, "ioregsel": self.ioregsel, "redir": list(self.redir), "levels": list(self.levels)}

    def set_state(self, state: dict) -> None:
        """Reload what get_state saved (bounded to the pin count and register widths)."""
        with self.lock:
            self.id = int(state.get("id", 0)) & ID_MASK
            self.ioregsel = int(state.get("ioregsel", 0)) & 0xFF
            for pin, e in enumerate(list(state.get("redir", []))[:PINS]):
                self.redir[pin] = int(e) & ((1 << 64) - 1)
            for pin, lv in enumerate(list(state.get("levels", []))[:PINS]):
                self.levels[pin] = 1 if lv else 0
