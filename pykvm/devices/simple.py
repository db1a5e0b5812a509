"""Small fixed-function devices: isa-debug-exit, pvpanic, power-off, and the firmware trap port."""

from __future__ import annotations

from .. import abi
from .device import Device
from .events import FirmwareTrap, GuestCrash, GuestExit


class DebugExit(Device):
    """QEMU's isa-debug-exit: writing v exits the VMM with status (v << 1) | 1, any access size."""

    name = "debug-exit"

    def __init__(self, port: int = abi.PYKVM_PORT_DEBUG_EXIT, width: int = 4):
        super().__init__()
        self.ports = [(port, width)]

    def io_read(self, offset: int, size: int) -> int:
        """Reads return zero, as QEMU's device does."""
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Exit with the encoded status."""
        raise GuestExit(((value << 1) | 1) & 0xFF, f"debug-exit value {value:#x}")


class PvPanic(Device):
    """pvpanic ISA device: reads give the supported events; 'panicked' stops the VM, 'crash loaded' is recorded."""

    name = "pvpanic"
    SUPPORTED = abi.PYKVM_PVPANIC_PANICKED | abi.PYKVM_PVPANIC_CRASH_LOADED

    def __init__(self, port: int = abi.PYKVM_PORT_PVPANIC, on_crash_loaded=None):
        super().__init__()
        self.ports = [(port, 1)]
        self.events: list[int] = []
        self.on_crash_loaded = on_crash_loaded

    def io_read(self, offset: int, size: int) -> int:
        """Supported-events bitmask."""
        return self.SUPPORTED

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Record the event; 'panicked' ends the guest as a crash."""
        self.events.append(value)
        if value & abi.PYKVM_PVPANIC_PANICKED:
            raise GuestCrash("pvpanic", f"guest reported a panic through pvpanic (event {value:#x})")
        if value & abi.PYKVM_PVPANIC_CRASH_LOADED and self.on_crash_loaded:
            self.on_crash_loaded(value)


class PowerOff(Device):
    """ACPI PM1a control as QEMU places it: a write with SLP_EN set powers the VM off (exit 0)."""

    name = "poweroff"
    SLP_EN = 1 << 13

    def __init__(self, port: int = abi.PYKVM_PORT_POWEROFF):
        super().__init__()
        self.ports = [(port, 2)]

    def io_read(self, offset: int, size: int) -> int:
        """Nothing pending."""
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        """SLP_EN ends the VM cleanly."""
        if value & self.SLP_EN:
            raise GuestExit(0, "power-off")


class PostCode(Device):
    """Port 0x80, the POST-code port: writes are latched and otherwise ignored (Linux uses it as an I/O delay)."""

    name = "post-code"

    def __init__(self, port: int = 0x80):
        super().__init__()
        self.ports = [(port, 1)]
        self.last = 0

    def io_read(self, offset: int, size: int) -> int:
        """The last code written."""
        return self.last

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Latch the code."""
        self.last = value


class FirmwareTrapPort(Device):
    """Where pykvm's exception stubs report; the vCPU loop reads the trap frame from the stack."""

    name = "firmware-trap"

    def __init__(self, port: int = abi.PYKVM_PORT_FW_TRAP):
        super().__init__()
        self.ports = [(port, 1)]

    def io_write(self, offset: int, size: int, value: int) -> None:
        """A guest exception reached the firmware."""
        raise FirmwareTrap()
