"""A minimal i8042 keyboard controller: the status and command/data ports hobby kernels and Linux poll.

Enough for a guest to find a working controller that has no key to give: status reads say
"nothing pending, ready for input", the controller commands a kernel sends during probing
answer as a PC's do (self-test 0x55, interface test 0x00, configuration byte), the keyboard
acknowledges its commands, and command 0xfe (pulse the CPU reset line: how Linux's reboot=k
and many hobby kernels reboot) ends the VM as a reset. Ports 0x61-0x63 inside the decoded
range are not part of the controller: reads give 0xff, writes are dropped.
"""

from __future__ import annotations

from collections import deque

from .. import abi
from .device import Device
from .events import GuestExit

DATA, STATUS = 0, abi.PYKVM_PORT_I8042_CMD - abi.PYKVM_PORT_I8042_DATA
ST_OUTPUT_FULL = 1 << 0
ST_SYSTEM = 1 << 2            # set once the controller passed its self-test (always, here)
ST_COMMAND = 1 << 3           # the last write went to the command port
ST_AUX_DATA = 1 << 5
CMD_READ_CONFIG, CMD_WRITE_CONFIG = 0x20, 0x60
CMD_DISABLE_AUX, CMD_ENABLE_AUX, CMD_TEST_AUX = 0xA7, 0xA8, 0xA9
CMD_SELF_TEST, CMD_TEST_KBD, CMD_DISABLE_KBD, CMD_ENABLE_KBD = 0xAA, 0xAB, 0xAD, 0xAE
CMD_READ_OUTPUT_PORT, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_AUX = 0xD0, 0xD1, 0xD4
CMD_PULSE_RESET = 0xFE
KBD_ACK, KBD_RESET, KBD_IDENTIFY = 0xFA, 0xFF, 0xF2
QUEUE_MAX = 16                # replies a guest has not read yet; more are dropped


class GuestReset(GuestExit):
    """The guest pulsed the reset line: pykvm stops the VM (status 0) instead of rebooting it."""

    def __init__(self, how: str):
        super().__init__(0, "reset")
        self.detail = how


class I8042(Device):
    """Data port 0x60 and status/command port 0x64, no keys, reset through command 0xfe."""

    name = "i8042"

    def __init__(self, base: int = abi.PYKVM_PORT_I8042_DATA):
        super().__init__(base=base)
        self.ports = [(base, STATUS + 1)]
        self.out: deque[tuple[int, bool]] = deque()     # (byte, from the aux port)
        self.ccb = 0x45           # controller command byte: keyboard interrupt on, system flag, translation: a PC's default
        self.pending = None       # a controller command waiting for its data byte
        self.last_command = False
        self.output_port = 0x01   # bit 0: reset line not asserted

    def _push(self, byte: int, aux: bool = False) -> None:
        if len(self.out) < QUEUE_MAX:
            self.out.append((byte & 0xFF, aux))

    def io_read(self, offset: int, size: int) -> int:
        """Status, or the next reply byte (0 when none)."""
        if offset == STATUS:
            st = ST_SYSTEM | (ST_COMMAND if self.last_command else 0)
            if self.out:
                st |= ST_OUTPUT_FULL | (ST_AUX_DATA if self.out[0][1] else 0)
            return st
        if offset == DATA:
            return self.out.popleft()[0] if self.out else 0
        return 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        """A controller command (0x64) or a data byte (0x60): for a pending command, or to the keyboard."""
        value &= 0xFF
        if offset == STATUS:
            self.last_command = True
            self._command(value)
        elif offset == DATA:
            self.last_command = False
            pending, self.pending = self.pending, None
            if pending == CMD_WRITE_CONFIG:
                self.ccb = value
            elif pending == CMD_WRITE_OUTPUT_PORT:
                self.output_port = value
                if not value & 1:
                    raise GuestReset("i8042 output port write with the reset line asserted")
            elif pending == CMD_WRITE_AUX:
                self._push(0xFE, aux=True)            # no mouse: "resend"
            else:
                self._keyboard(value)

    def _command(self, cmd: int) -> None:
        if cmd == CMD_READ_CONFIG:
            self._push(self.ccb)
        elif cmd in (CMD_WRITE_CONFIG, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_AUX):
            self.pending = cmd
        elif cmd == CMD_SELF_TEST:
            self._push(0x55)
        elif cmd == CMD_TEST_KBD:
            self._push(0x00)
        elif cmd == CMD_TEST_AUX:
            self._push(0xFF)                          # no auxiliary device wired
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._push(self.output_port)
        elif cmd in (CMD_DISABLE_KBD, CMD_ENABLE_KBD, CMD_DISABLE_AUX, CMD_ENABLE_AUX):
            pass
        elif cmd & 0xF0 == 0xF0 and not cmd & 1:      # 0xf0-0xfe even: pulse output lines, bit 0 = reset
            raise GuestReset(f"i8042 command {cmd:#x}")

    def _keyboard(self, byte: int) -> None:
        self._push(KBD_ACK)
        if byte == KBD_RESET:
            self._push(0xAA)                          # basic assurance test passed
        elif byte == KBD_IDENTIFY:
            self._push(0xAB)
            self._push(0x83)

    def get_state(self) -> dict:
        """Queue, configuration byte, pending command, output port."""
        return {"out": [[b, a] for b, a in self.out], "config": self.ccb, "pending": self.pending,
                "output_port": self.output_port}

    def set_state(self, state: dict) -> None:
        """Restore what get_state saved (bounded, masked)."""
        self.out = deque((int(b) & 0xFF, bool(a)) for b, a in list(state.get("out", []))[:QUEUE_MAX])
        self.ccb = int(state.get("config", 0x45)) & 0xFF
        p = state.get("pending")
        self.pending = int(p) & 0xFF if p is not None else None
        self.output_port = int(state.get("output_port", 1)) & 0xFF
