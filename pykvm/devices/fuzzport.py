"""The fuzz port: the guest's side of snapshot fuzzing (registers in pykvm_abi.h, PYKVM_PORT_FUZZ).

The guest names its input buffer and calls "snapshot here", "done" and "crash" by port writes.
The model only keeps the registers; a driver (pykvm/fuzz/) that the machine layer puts in
DeviceContext.fuzz acts on the calls. Without one, calls are ignored and COMMAND
reads PYKVM_FUZZ_STATE_IDLE, so a fuzz target also runs under plain `pykvm run`.
"""

from __future__ import annotations

from .. import abi
from .device import Device

MASK32 = 0xFFFFFFFF


class FuzzPort(Device):
    """Input-buffer registers and the snapshot/done/crash calls."""

    name = "fuzz"

    def __init__(self, base: int = abi.PYKVM_PORT_FUZZ, ctx=None):
        super().__init__(base=base)
        self.ports = [(base, abi.PYKVM_FUZZ_PORTS)]
        self._ctx = ctx                   # read at each call: the driver is set after the machine is built
        self.input_lo = self.input_hi = self.input_size = 0

    def _driver(self):
        return self._ctx.fuzz if self._ctx is not None else None

    @property
    def input_gpa(self) -> int:
        """Guest-physical address of the struct pykvm_fuzz_input the guest named."""
        return (self.input_hi << 32) | self.input_lo

    def get_state(self) -> dict:
        """The input buffer's registers."""
        return {"input_lo": self.input_lo, "input_hi": self.input_hi, "input_size": self.input_size}

    def set_state(self, state: dict) -> None:
        """Load registers saved by get_state() (32-bit values)."""
        values = {k: state.get(k, 0) for k in ("input_lo", "input_hi", "input_size")}
        if not all(isinstance(v, int) and 0 <= v <= MASK32 for v in values.values()):
            raise ValueError("fuzz port state: registers must be 32-bit values")
        for k, v in values.items():
            setattr(self, k, v)

    def io_read(self, offset: int, size: int) -> int:
        """The registers; COMMAND reads whether a driver listens."""
        if offset == abi.PYKVM_FUZZ_COMMAND:
            return abi.PYKVM_FUZZ_STATE_DRIVEN if self._driver() is not None else abi.PYKVM_FUZZ_STATE_IDLE
        return {abi.PYKVM_FUZZ_INPUT_LO: self.input_lo, abi.PYKVM_FUZZ_INPUT_HI: self.input_hi,
                abi.PYKVM_FUZZ_INPUT_SIZE: self.input_size}.get(offset, MASK32)

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Set a register, or make a call to the driver (on the vCPU thread)."""
        value &= MASK32
        if offset == abi.PYKVM_FUZZ_INPUT_LO:
            self.input_lo = value
        elif offset == abi.PYKVM_FUZZ_INPUT_HI:
            self.input_hi = value
        elif offset == abi.PYKVM_FUZZ_INPUT_SIZE:
            self.input_size = value
        elif offset == abi.PYKVM_FUZZ_COMMAND:
            driver = self._driver()
            if driver is not None and value in (abi.PYKVM_FUZZ_CMD_SNAPSHOT, abi.PYKVM_FUZZ_CMD_DONE,
                                                abi.PYKVM_FUZZ_CMD_CRASH):
                driver.command(value)
