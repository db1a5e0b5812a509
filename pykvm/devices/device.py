"""The device model base class: declared ranges, small callbacks, configuration and state."""

from __future__ import annotations

import enum
from ..record import record, field


class State(enum.Enum):
    """Where a device instance is in its life; only the framework (lifecycle.py) moves it."""

    ADDED = "added"
    PREPARED = "hardware-prepared"
    D0 = "D0"
    LOW_POWER = "low-power"
    STOPPED = "stopped"
    REMOVED = "removed"
    SURPRISE_REMOVED = "surprise-removed"
    FAILED = "failed"
    RESTARTING = "restarting"


@record
class Window:
    """A guest-physical register window backed by memory holding what the hardware would return.

    In "backed" mode KVM serves reads from a read-only memslot over `image` (no exit) and
    writes trap to the device; in "trapped" mode every access exits, for registers whose
    reads have side effects. The image is part of the device's saved state.
    """

    name: str
    gpa: int
    size: int
    mode: str = "backed"
    image: bytearray | None = field(default=None, repr=False)


class Device:
    """A device model: declares its ranges and implements small callbacks.

    Models never see lifecycle events: the framework calls prepare_hardware before the
    first d0_entry, never d0_exit after a failed d0_entry, and release_hardware exactly
    once per instance; I/O reaches a model only while it is in D0.
    """

    name = "device"
    #: [(base, length)] of I/O ports and guest-physical MMIO ranges the device decodes
    ports: list[tuple[int, int]] = []
    mmio: list[tuple[int, int]] = []
    #: memory-backed register windows (each must lie inside one of `mmio`)
    windows: list[Window] = []
    #: whether a failure of this model is recovered by the supervisor instead of stopping the VM
    supervised = False

    def __init__(self, **config):
        self.config = dict(config)   # what a fresh instance is built from
        self.state = State.ADDED
        self.generation = 0
        self.manager = None          # set by DeviceManager.add

    # -- lifecycle callbacks (override what you need) --
    def prepare_hardware(self) -> None:
        """Acquire host resources (files, threads, window images)."""

    def d0_entry(self, previous: State) -> None:
        """Become operational, coming from `previous` (PREPARED or LOW_POWER)."""

    def d0_exit(self, target: State) -> None:
        """Stop operating, going to `target` (LOW_POWER, STOPPED, REMOVED, ...); keep resources."""

    def release_hardware(self) -> None:
        """Give back host resources."""

    def io_start(self) -> None:
        """Self-managed I/O (worker threads, timers) may run."""

    def io_suspend(self) -> None:
        """Self-managed I/O must stop touching the guest."""

    # -- state that survives a restart or a move to another process --
    def get_state(self) -> dict:
        """Guest-visible state as JSON-able data (register values the guest programmed)."""
        return {}

    def set_state(self, state: dict) -> None:
        """Load state produced by get_state() of an earlier instance."""

    def check(self) -> None:
        """Raise if the model's internal state is inconsistent (the supervisor calls this)."""

    # -- I/O callbacks: offset is relative to the range base --
    def io_read(self, offset: int, size: int) -> int:
        """Port read; returns the value (masked to `size` bytes by the dispatcher)."""
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
        return f"{self.name} ({', '.join(rng)}) [{self.state.value}, generation {self.generation}]"
