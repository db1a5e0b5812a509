"""16550A UART: enough for tiny kernels' polling output and Linux's 8250 probe."""

from __future__ import annotations

import collections
import os
import threading

from .. import abi
from .device import Device
from .threadguard import ThreadGuard

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
IER_RDI = 0x01
IER_THRI = 0x02
IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO = 0xC0
LCR_DLAB = 0x80
MCR_LOOP = 0x10
TAIL_BYTES = 8192


class Serial16550(Device):
    """COM port whose transmitter is always empty; output goes to a file descriptor, input comes from one."""

    name = "serial"

    def __init__(self, base: int = abi.PYKVM_PORT_COM1, out_fd: int | None = 1, in_fd: int | None = None,
                 irq=None, unbuffered: bool = False):
        super().__init__()
        # unbuffered: every byte reaches out_fd at once, so a reader waiting for a prompt without
        # a newline (the Python API's expect) sees it; otherwise output is written per line
        self.flush_at = 1 if unbuffered else 4096
        self.ports = [(base, 8)]
        self.out_fd = out_fd
        self.in_fd = in_fd
        self.irq = irq  # callable(level) or None when no interrupt controller takes it
        self._guard = ThreadGuard(self.name)
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 0x01, 0x00
        self.thr_irq_pending = False
        self.rx = collections.deque(maxlen=4096)
        self.tail = bytearray()
        self.pending = bytearray()
        self.total_out = 0
        self._reader = None
        self._stop_r = None

    # -- lifecycle --
    def prepare_hardware(self) -> None:
        """Start the stdin reader thread when input is connected."""
        if self.in_fd is not None:
            self._stop_r, stop_w = os.pipe()
            self._stop_w = stop_w
            self._reader = threading.Thread(target=self._read_input, name="serial-input", daemon=True)
            self._reader.start()

    def release_hardware(self) -> None:
        """Flush output and stop the reader."""
        self.flush()
        if self._reader is not None:
            os.write(self._stop_w, b"x")
            self._reader.join(timeout=1)
            os.close(self._stop_w)
            os.close(self._stop_r)
            self._reader = None

    def _read_input(self) -> None:
        import select

        while True:
            r, _, _ = select.select([self.in_fd, self._stop_r], [], [])
            if self._stop_r in r:
                return
            try:
                data = os.read(self.in_fd, 256)
            except OSError:
                return
            if not data:
                return
            self.rx.extend(data)
            self._guard.call(self._update_irq)    # the interrupt is raised from this thread: it must outlive a failure

    # -- state (saved VMs) --
    def get_state(self) -> dict:
        """Register values the guest programmed and unread input."""
        return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "scr": self.scr, "fcr": self.fcr,
                "dll": self.dll, "dlm": self.dlm, "thr_irq_pending": self.thr_irq_pending, "rx": list(self.rx)}

    def set_state(self, state: dict) -> None:
        """Load registers saved by get_state() (validated: they may come from a file)."""
        regs = {k: state.get(k, 0) for k in ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm")}
        rx = state.get("rx", [])
        if not all(isinstance(v, int) and 0 <= v <= 0xFF for v in [*regs.values(), *rx]):
            raise ValueError("serial state: registers and input must be bytes")
        self.ier, self.lcr, self.mcr, self.scr = regs["ier"] & 0x0F, regs["lcr"], regs["mcr"] & 0x1F, regs["scr"]
        self.fcr, self.dll, self.dlm = regs["fcr"] & 0xC9, regs["dll"], regs["dlm"]
        self.thr_irq_pending = bool(state.get("thr_irq_pending", False))
        self.rx.clear()
        self.rx.extend(rx)

    # -- output --
    def _emit(self, byte: int) -> None:
        self.total_out += 1
        self.tail.append(byte)
        if len(self.tail) > 2 * TAIL_BYTES:
            del self.tail[:-TAIL_BYTES]
        if self.out_fd is None:
            return
        self.pending.append(byte)
        if byte == 0x0A or len(self.pending) >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        """Write buffered output to the sink."""
        if self.pending and self.out_fd is not None:
            data, self.pending = bytes(self.pending), bytearray()
            try:
                while data:
                    data = data[os.write(self.out_fd, data):]
            except OSError:
                self.out_fd = None  # sink gone (closed pipe): keep the guest running, keep the tail

    def output_tail(self, n: int = TAIL_BYTES) -> bytes:
        """The last `n` bytes the guest wrote."""
        return bytes(self.tail[-n:])

    # -- registers --
    def _update_irq(self) -> None:
        if self.irq is not None:
            self.irq(1 if self._iir() != IIR_NO_INT else 0)

    def _iir(self) -> int:
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_irq_pending:
            return IIR_THRI
        return IIR_NO_INT

    def io_read(self, offset: int, size: int) -> int:
        """Register read."""
        if offset == RBR_THR:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._update_irq()
            return value
        if offset == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_irq_pending = False  # reading IIR acknowledges THRE
                self._update_irq()
            return iir | (IIR_FIFO if self.fcr & 1 else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:  # loopback: modem outputs wired to inputs (8250 probe relies on it)
                m = self.mcr
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            return 0xB0  # DCD, DSR, CTS
        return self.scr

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Register write."""
        value &= 0xFF
        if offset == RBR_THR:
            if self.lcr & LCR_DLAB:
                self.dll = value
            elif self.mcr & MCR_LOOP:
                self.rx.append(value)
            else:
                self._emit(value)
                self.thr_irq_pending = True
            self._update_irq()
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
            else:
                self.ier = value & 0x0F
                self.thr_irq_pending = bool(self.ier & IER_THRI)
                self._update_irq()
        elif offset == IIR_FCR:
            self.fcr = value & 0xC9
            if value & 0x02:
                self.rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
