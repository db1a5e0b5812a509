"""The PC's cascaded 8259A interrupt controllers: master at 0x20 (IRQ 0-7), slave at 0xa0 (IRQ 8-15) on master IRQ 2.

Each chip has a command port (+0: ICW1, OCW2, OCW3; reads IRR or ISR) and a data port (+1: ICW2-4
during initialisation, then the mask register). Inputs are edge-triggered as on ISA: a rising edge
latches the IRR bit until the CPU acknowledges it. Priority is fixed (IRQ 0 highest), as every PC
firmware and Linux leave it; the rotate commands end the interrupt without rotating.

pykvm has no BIOS, so both chips start as a PC firmware leaves them initialised: master vectors
0x08-0x0f, slave 0x70-0x77 (what real-mode code expects of IRQ 8-15), masks clear as ICW1 leaves
them. The pair's output goes to the BSP's LINT0 (ExtINT): the machine polls `output` and calls
`ack()` when the vCPU can take the vector (KVM_INTERRUPT under the split irqchip), and `notify`
tells it the output went up.
"""

from __future__ import annotations

import threading

from .device import Device

MASTER_BASE, SLAVE_BASE = 0x20, 0xA0
CASCADE = 2                    # the master input the slave's output drives
ICW1_INIT, ICW1_IC4, ICW1_SNGL = 0x10, 0x01, 0x02
OCW3_SEL, OCW3_RR, OCW3_RIS, OCW3_POLL = 0x08, 0x02, 0x01, 0x04
ICW4_AEOI = 0x02
EOI_NONSPECIFIC, EOI_SPECIFIC = 0x20, 0x60   # OCW2 bits 7-5 with EOI set; bit 6 is SL (specific level)


class Chip:
    """One 8259A's registers; the pair drives the cascade."""

    def __init__(self, vector_base: int):
        self.irr = self.isr = self.imr = 0
        self.lines = 0                 # input levels last seen (edge detection)
        self.vector_base = vector_base
        self.icw3 = 0
        self.aeoi = False
        self.init_step = 0             # 0 normal; 2, 3, 4: the ICW expected next
        self.needs_icw3 = self.needs_icw4 = False
        self.read_isr = False
        self.poll = False

    def set_line(self, n: int, level: int) -> None:
        """Drive input n; a rising edge latches IRR."""
        bit = 1 << n
        if level and not self.lines & bit:
            self.irr |= bit
        self.lines = (self.lines | bit) if level else (self.lines & ~bit)

    def pending(self) -> int | None:
        """The input the chip would present now: the highest-priority unmasked request above everything in service."""
        req = self.irr & ~self.imr
        if not req:
            return None
        irq = (req & -req).bit_length() - 1
        if self.isr and (self.isr & -self.isr).bit_length() - 1 <= irq:
            return None
        return irq

    def acknowledge(self, irq: int) -> None:
        """INTA: the request moves from IRR to ISR (not with automatic EOI)."""
        self.irr &= ~(1 << irq)
        if not self.aeoi:
            self.isr |= 1 << irq

    def write_command(self, value: int) -> None:
        """ICW1 starts initialisation; OCW2 ends interrupts; OCW3 picks the register reads return, or polls."""
        if value & ICW1_INIT:
            self.irr = self.isr = self.imr = 0
            self.lines = 0
            self.aeoi = self.read_isr = self.poll = False
            self.needs_icw3 = not value & ICW1_SNGL
            self.needs_icw4 = bool(value & ICW1_IC4)
            self.init_step = 2
        elif value & OCW3_SEL:
            if value & OCW3_RR:
                self.read_isr = bool(value & OCW3_RIS)
            self.poll = bool(value & OCW3_POLL)
        else:
            cmd = value & 0xE0
            if cmd & 0x20 == 0:
                return                  # set-priority / rotate-in-AEOI: fixed priority here
            if cmd & 0x40:              # specific: the level in bits 2-0
                self.isr &= ~(1 << (value & 7))
            elif self.isr:
                self.isr &= self.isr - 1  # the highest-priority bit in service (lowest number)

    def write_data(self, value: int) -> None:
        """ICW2-4 while initialising, the mask register (OCW1) after."""
        if self.init_step == 2:
            self.vector_base = value & 0xF8
            self.init_step = 3 if self.needs_icw3 else (4 if self.needs_icw4 else 0)
        elif self.init_step == 3:
            self.icw3 = value
            self.init_step = 4 if self.needs_icw4 else 0
        elif self.init_step == 4:
            self.aeoi = bool(value & ICW4_AEOI)
            self.init_step = 0
        else:
            self.imr = value

    def state(self) -> dict:
        """Registers as plain integers."""
        return {k: int(getattr(self, k)) for k in ("irr", "isr", "imr", "lines", "vector_base", "icw3", "aeoi",
                                                   "init_step", "needs_icw3", "needs_icw4", "read_isr", "poll")}

    def load(self, st: dict) -> None:
        """Registers back from state(), each bounded to its width."""
        for k in ("irr", "isr", "imr", "lines", "icw3"):
            setattr(self, k, int(st.get(k, 0)) & 0xFF)
        self.vector_base = int(st.get("vector_base", self.vector_base)) & 0xF8
        step = int(st.get("init_step", 0))
        self.init_step = step if step in (0, 2, 3, 4) else 0
        for k in ("aeoi", "needs_icw3", "needs_icw4", "read_isr", "poll"):
            setattr(self, k, bool(st.get(k, False)))


class PicPair:
    """Master and slave wired as on a PC; thread-safe (device I/O on vCPU threads, inputs from any thread)."""

    def __init__(self, notify=None):
        self.master, self.slave = Chip(0x08), Chip(0x70)
        self.master.icw3, self.slave.icw3 = 1 << CASCADE, CASCADE
        self.lock = threading.RLock()
        self.notify = notify or (lambda: None)
        self.output = False

    def set_irq(self, line: int, level: int) -> None:
        """ISA line 0-15 (others ignored); IRQ 2 itself is the cascade and cannot be driven."""
        if not 0 <= line < 16 or line == CASCADE:
            return
        with self.lock:
            if line < 8:
                self.master.set_line(line, level)
            else:
                self.slave.set_line(line - 8, level)
            self._update()

    def _update(self) -> None:
        # the slave's INT is a level on master IRQ 2: it latches on each rise, as on the board
        self.master.set_line(CASCADE, 1 if self.slave.pending() is not None else 0)
        was, self.output = self.output, self.master.pending() is not None
        if self.output and not was:
            self.notify()

    def ack(self) -> int:
        """The CPU's interrupt acknowledge: the vector to deliver (the chip's spurious IRQ 7 vector if none)."""
        with self.lock:
            vector = self._ack_locked()
            self._update()
            return vector

    def _ack_locked(self) -> int:
        m = self.master
        irq = m.pending()
        if irq is None:
            return m.vector_base | 7
        m.acknowledge(irq)
        if irq != CASCADE:
            return m.vector_base | irq
        s = self.slave
        sirq = s.pending()
        if sirq is None:
            return s.vector_base | 7
        s.acknowledge(sirq)
        return s.vector_base | sirq

    def read(self, chip: Chip, port: int) -> int:
        """A byte read of a chip's command (0) or data (1) port."""
        with self.lock:
            if port == 1:
                return chip.imr
            if chip.poll:
                chip.poll = False
                irq = chip.pending()
                if irq is None:
                    return 0
                chip.acknowledge(irq)
                self._update()
                return 0x80 | irq
            return chip.isr if chip.read_isr else chip.irr

    def write(self, chip: Chip, port: int, value: int) -> None:
        """A byte write of a chip's command (0) or data (1) port."""
        with self.lock:
            (chip.write_data if port == 1 else chip.write_command)(value & 0xFF)
            self._update()


class I8259(Device):
    """One chip's two ports; the master (name "pic") also owns the pair and builds the slave as `companion`."""

    name = "pic"

    def __init__(self, notify=None, *, pair: PicPair | None = None, slave: bool = False):
        base = SLAVE_BASE if slave else MASTER_BASE
        super().__init__(base=base)
        self.ports = [(base, 2)]
        self.pair = pair or PicPair(notify)
        self.chip = self.pair.slave if slave else self.pair.master
        if slave:
            self.name = "pic-slave"
            self.companion = None
        else:
            self.companion = I8259(pair=self.pair, slave=True)

    def io_read(self, offset: int, size: int) -> int:
        """IRR/ISR or poll at +0, the mask at +1 (the chip has an 8-bit bus: wider reads give the byte)."""
        if not 0 <= offset < 2:
            return 0xFF
        return self.pair.read(self.chip, offset)

    def io_write(self, offset: int, size: int, value: int) -> None:
        """ICW1/OCW2/OCW3 at +0, ICW2-4 or the mask at +1 (the low byte of a wider write)."""
        if 0 <= offset < 2:
            self.pair.write(self.chip, offset, value)

    def get_state(self) -> dict:
        """This chip's registers."""
        with self.pair.lock:
            return self.chip.state()

    def set_state(self, state: dict) -> None:
        """Reload this chip's registers."""
        with self.pair.lock:
            self.chip.load(state)
            self.pair._update()
