"""The device model base class and the lifecycle the framework drives it through."""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where a device is in its life; only the framework moves it."""

    ADDED = "added"
    PREPARED = "hardware-prepared"
    D0 = "D0"
    STOPPED = "stopped"
    RELEASED = "released"
    FAILED = "failed"


class Device:
    """A device model: declares its port/MMIO ranges and implements small callbacks.

    Models never see lifecycle events directly: the framework calls
    prepare_hardware → d0_entry on start and d0_exit → release_hardware on stop,
    each at most once per transition, and only routes I/O to a device in D0.
    """

    name = "device"
    #: [(base, length)] of I/O ports and guest-physical MMIO ranges the device decodes
    ports: list[tuple[int, int]] = []
    mmio: list[tuple[int, int]] = []

    def __init__(self):
        self.state = State.ADDED

    # -- lifecycle callbacks (override what you need) --
    def prepare_hardware(self) -> None:
        """Acquire host resources (files, threads)."""

    def d0_entry(self) -> None:
        """Become operational."""

    def d0_exit(self) -> None:
        """Stop operating; keep resources."""

    def release_hardware(self) -> None:
        """Give back host resources."""

    # -- I/O callbacks: offset is relative to the range base --
    def io_read(self, offset: int, size: int) -> int:
        """Port read; returns the value (masked to `size` bytes by the bus)."""
        return 0xFFFFFFFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Port write."""

    def mmio_read(self, offset: int, size: int) -> int:
        """MMIO read."""
        return (1 << (8 * size)) - 1

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """MMIO write."""

    def describe(self) -> str:
        """One line for listings and crash reports."""
        rng = [f"io {b:#x}+{n}" for b, n in self.ports] + [f"mmio {b:#x}+{n:#x}" for b, n in self.mmio]
        return f"{self.name} ({', '.join(rng)}) [{self.state.value}]"
