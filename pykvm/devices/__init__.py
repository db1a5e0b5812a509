"""The device framework (lifecycle, dispatch) and the device models."""

from .device import Device, State
from .dispatch import DeviceManager
from .events import FirmwareTrap, GuestCrash, GuestExit, StrictIoViolation, VmEvent

__all__ = ["Device", "DeviceManager", "FirmwareTrap", "GuestCrash", "GuestExit", "State",
           "StrictIoViolation", "VmEvent"]
