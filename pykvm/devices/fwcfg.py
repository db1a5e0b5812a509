"""QEMU fw_cfg (legacy port interface): selector at 0x510, byte-wide data at 0x511."""

from __future__ import annotations

import struct

from .. import abi
from .device import Device


class FwCfg(Device):
    """Answers the items tiny kernels ask for: signature, RAM size, CPU counts, MAX_RAM."""

    name = "fw_cfg"

    def __init__(self, ram_size: int, ram_top: int, nr_cpus: int, base: int = abi.PYKVM_PORT_FWCFG_CTL):
        super().__init__()
        self.ports = [(base, 2)]
        self.items: dict[int, bytes] = {
            abi.PYKVM_FWCFG_SIGNATURE: b"QEMU",
            abi.PYKVM_FWCFG_ID: struct.pack("<I", 1),            # traditional interface only, no DMA
            abi.PYKVM_FWCFG_RAM_SIZE: struct.pack("<Q", ram_size),
            abi.PYKVM_FWCFG_NB_CPUS: struct.pack("<H", nr_cpus),
            abi.PYKVM_FWCFG_MAX_CPUS: struct.pack("<H", nr_cpus),
            abi.PYKVM_FWCFG_MAX_RAM: struct.pack("<Q", ram_top),
        }
        self.selected = b""
        self.key = None
        self.offset = 0

    def get_state(self) -> dict:
        """The selected item and the read position in it."""
        return {"key": self.key, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        """Select the saved item again and seek to the saved position."""
        key, offset = state.get("key"), state.get("offset", 0)
        if (key is not None and not isinstance(key, int)) or not isinstance(offset, int) or offset < 0:
            raise ValueError("fw_cfg state: key and offset must be integers")
        self.key = key
        self.selected = b"" if key is None else self.items.get(key, b"")
        self.offset = offset

    def io_read(self, offset: int, size: int) -> int:
        """Data port: successive bytes of the selected item, zero past its end."""
        if offset != 1:
            return 0
        value = 0
        for i in range(size):  # wider reads return consecutive bytes, as QEMU does
            b = self.selected[self.offset] if self.offset < len(self.selected) else 0
            self.offset += 1
            value |= b << (8 * i)
        return value

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Selector port: choose an item and rewind."""
        if offset == 0:
            self.key = value & 0x3FFF
            self.selected = self.items.get(self.key, b"")
            self.offset = 0
