"""The partition bus's connect registers: the one trapped path of the bus, used once per boot.

The guest writes the guest-physical address of its management rings (GPA_LO, GPA_HI),
then CONNECT | target vCPU << 8 to COMMAND, and reads COMMAND back for the result. All
later traffic is on rings and doorbells that cost no exit. The model holds no KVM
objects: the machine lends it the bus (`connect`, `disconnect`) through DeviceContext.
"""

from __future__ import annotations

from .. import abi
from .device import Device


class BusControl(Device):
    """Connect/disconnect registers of the partition bus."""

    name = "bus"

    def __init__(self, bus=None, base: int = abi.PYKVM_PORT_BUS):
        super().__init__(base=base)
        self.bus = bus                  # bus.host.BusHost (lent by the machine)
        self.ports = [(base, abi.PYKVM_BUS_PORTS)]
        self.gpa = 0
        self.status = abi.PYKVM_BUS_STATE_IDLE

    def io_read(self, offset: int, size: int) -> int:
        """GPA halves as written; COMMAND reads the connection state."""
        if offset == abi.PYKVM_BUS_CTL_GPA_LO:
            return self.gpa & 0xFFFFFFFF
        if offset == abi.PYKVM_BUS_CTL_GPA_HI:
            return self.gpa >> 32
        if offset == abi.PYKVM_BUS_CTL_COMMAND:
            if self.status == abi.PYKVM_BUS_STATE_CONNECTED and self.bus is not None and self.bus.state == "idle":
                return abi.PYKVM_BUS_STATE_IDLE     # the host disconnected the guest (violations, unload)
            return self.status
        return 0xFFFFFFFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Latch the GPA; run CONNECT or DISCONNECT."""
        if offset == abi.PYKVM_BUS_CTL_GPA_LO:
            self.gpa = (self.gpa & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
        elif offset == abi.PYKVM_BUS_CTL_GPA_HI:
            self.gpa = (self.gpa & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
        elif offset == abi.PYKVM_BUS_CTL_COMMAND and self.bus is not None:
            cmd, vcpu = value & 0xFF, (value >> 8) & 0xFF
            if cmd == abi.PYKVM_BUS_CMD_CONNECT:
                self.status = self.bus.connect(self.gpa, vcpu)
            elif cmd == abi.PYKVM_BUS_CMD_DISCONNECT:
                self.bus.disconnect()
                self.status = abi.PYKVM_BUS_STATE_IDLE

    def save_refusal(self) -> str | None:
        """Saving a VM whose bus is connected is not supported (GPADL views and channels live in this process)."""
        if self.bus is not None and self.bus.state != "idle":
            return "the partition bus is connected (saving bus channels is not supported)"
        return None
