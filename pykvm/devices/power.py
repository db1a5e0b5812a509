"""The guest's power-control register block: pick a device by its base address, read or set its power state."""

from __future__ import annotations

from .. import abi
from .device import Device, State
from .lifecycle import CallbackFailed, LifecycleError

_STATE_CODES = {State.D0: abi.PYKVM_POWER_D0, State.LOW_POWER: abi.PYKVM_POWER_D3,
                State.STOPPED: abi.PYKVM_POWER_D3, State.FAILED: abi.PYKVM_POWER_FAILED,
                State.RESTARTING: abi.PYKVM_POWER_FAILED}


class PowerControl(Device):
    """SELECT (device base), STATE (0 = D0, 3 = low power, 0xfe failed/restarting, 0xff absent), GENERATION.

    Requests go through the framework's lifecycle, so the model only sees d0_exit/d0_entry.
    """

    name = "power-control"

    def __init__(self, base: int = abi.PYKVM_PORT_POWERCTL):
        super().__init__(base=base)
        self.ports = [(base, 12)]
        self.selected = 0
        self.errors = 0

    def _target(self) -> Device | None:
        mgr = self.manager
        dev = None
        ent = mgr.port_map.get(self.selected)
        if ent is not None and ent[1] == self.selected:
            dev = ent[0]
        else:
            hit = mgr.mmio_lookup(self.selected)
            if hit is not None and hit[1] == self.selected:
                dev = hit[0]
        return None if dev is self else dev

    def io_read(self, offset: int, size: int) -> int:
        """SELECT, STATE or GENERATION of the selected device."""
        reg = offset & ~3
        if reg == abi.PYKVM_POWERCTL_SELECT:
            return self.selected
        dev = self._target()
        if reg == abi.PYKVM_POWERCTL_STATE:
            return abi.PYKVM_POWER_ABSENT if dev is None else _STATE_CODES.get(dev.state, abi.PYKVM_POWER_ABSENT)
        if reg == abi.PYKVM_POWERCTL_GENERATION:
            return 0xFFFFFFFF if dev is None else dev.generation & 0xFFFFFFFF
        return 0xFFFFFFFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        """SELECT a device, or ask for D0 (0) / low power (3)."""
        reg = offset & ~3
        if reg == abi.PYKVM_POWERCTL_SELECT:
            self.selected = value
        elif reg == abi.PYKVM_POWERCTL_STATE:
            dev = self._target()
            if dev is None or value not in (abi.PYKVM_POWER_D0, abi.PYKVM_POWER_D3):
                self.errors += 1
                return
            try:
                self.manager.set_power(dev, value == abi.PYKVM_POWER_D0)
            except (LifecycleError, CallbackFailed):
                self.errors += 1  # the device reports FAILED through STATE; the guest decides
