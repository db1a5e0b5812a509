"""A supervised mailbox: 256 32-bit slots the guest writes and reads back, with host-set flags.

It is the device pykvm's recovery machinery is exercised on: its whole guest-visible state is
get_state()/set_state() data, so a replacement built from the last good state picks up where
the failed instance stopped. `inject(kind)` lets tests and the host break it on purpose.
"""

from __future__ import annotations

import time

from .. import abi
from .device import Device

SLOTS = abi.PYKVM_MAILBOX_SLOTS


class InjectedFault(RuntimeError):
    """A failure injected on purpose (tests, `pykvm ctl ... inject`)."""


class Mailbox(Device):
    """Index/data register pair over a slot array, a status word and host flags."""

    name = "mailbox"
    supervised = True

    def __init__(self, base: int = abi.PYKVM_PORT_MAILBOX, hang_seconds: float = 2.0, name: str = "mailbox"):
        super().__init__(base=base, hang_seconds=hang_seconds, name=name)
        self.name = name
        self.ports = [(base, 16)]
        self.slots = [0] * SLOTS
        self.index = 0
        self.host_flags = 0
        self.hang_seconds = hang_seconds
        self._fault: str | None = None

    # -- state --
    def get_state(self) -> dict:
        """Slots, index and host flags."""
        return {"slots": list(self.slots), "index": self.index, "host_flags": self.host_flags}

    def set_state(self, state: dict) -> None:
        """Load the state of an earlier instance (validated: it may come from a file)."""
        slots = state.get("slots", [])
        if len(slots) != SLOTS or not all(isinstance(v, int) and 0 <= v <= 0xFFFFFFFF for v in slots):
            raise ValueError("mailbox state: slots must be 256 32-bit values")
        self.slots = list(slots)
        self.index = int(state.get("index", 0)) % SLOTS
        self.host_flags = int(state.get("host_flags", 0)) & 0xFFFFFFFF

    def check(self) -> None:
        """The index must address a slot and the slot array must be whole."""
        if not 0 <= self.index < SLOTS or len(self.slots) != SLOTS:
            raise ValueError(f"mailbox index {self.index} / {len(self.slots)} slots is inconsistent")

    # -- fault injection --
    def inject(self, kind: str) -> None:
        """Break this instance: 'raise' on the next access, 'hang' in it, or 'corrupt' its state."""
        if kind == "corrupt":
            self.slots = self.slots[:-1]  # nothing the guest does can repair this
        elif kind in ("raise", "hang"):
            self._fault = kind
        else:
            raise ValueError(f"unknown fault {kind!r}: raise, hang or corrupt")

    def _maybe_fail(self) -> None:
        fault, self._fault = self._fault, None
        if fault == "raise":
            raise InjectedFault("injected fault")
        if fault == "hang":
            deadline = time.monotonic() + self.hang_seconds
            while time.monotonic() < deadline:  # a Python-level hang the supervisor can interrupt
                pass

    # -- registers --
    def io_read(self, offset: int, size: int) -> int:
        """INDEX, DATA (slot[INDEX]), STATUS (magic << 16 | generation), HOST_FLAGS."""
        if self._fault:
            self._maybe_fail()
        reg = offset & ~3
        if reg == abi.PYKVM_MAILBOX_INDEX:
            return self.index
        if reg == abi.PYKVM_MAILBOX_DATA:
            return self.slots[self.index]
        if reg == abi.PYKVM_MAILBOX_STATUS:
            return (abi.PYKVM_MAILBOX_MAGIC << 16) | (self.generation & 0xFFFF)
        return self.host_flags

    def io_write(self, offset: int, size: int, value: int) -> None:
        """INDEX selects a slot (mod 256); DATA stores into it; the rest is read-only."""
        if self._fault:
            self._maybe_fail()
        reg = offset & ~3
        if reg == abi.PYKVM_MAILBOX_INDEX:
            self.index = value % SLOTS
        elif reg == abi.PYKVM_MAILBOX_DATA:
            self.slots[self.index] = value & 0xFFFFFFFF
