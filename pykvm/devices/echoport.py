"""The trapped echo device: the bus echo service's function through port I/O, every byte an exit's work.

It exists as the reference the bus benchmark measures against (scripts/bench_bus.py).
"""

from __future__ import annotations

from collections import deque

from .. import abi
from .device import Device


class EchoPort(Device):
    """Bytes written to the data port come back, in order, from reads of it."""

    name = "echo-port"

    def __init__(self, base: int = abi.PYKVM_PORT_ECHO):
        super().__init__(base=base)
        self.ports = [(base, 1)]
        self.fifo: deque = deque(maxlen=abi.PYKVM_ECHO_PORT_FIFO)

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Queue one byte (the oldest is dropped when full)."""
        self.fifo.append(value & 0xFF)

    def io_read(self, offset: int, size: int) -> int:
        """The oldest queued byte, or 0xff."""
        return self.fifo.popleft() if self.fifo else 0xFF
