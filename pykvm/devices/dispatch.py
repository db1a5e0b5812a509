"""Routes port and MMIO accesses to devices by address range; owns device lifecycles."""

from __future__ import annotations

import bisect
import sys
from collections import Counter

from ..errors import DeviceConfigError
from .device import Device, State
from .events import StrictIoViolation


class DeviceManager:
    """All devices of a VM: range registration with overlap checks, lifecycle, and dispatch.

    Port lookups go through a dict keyed by port (ranges are small and the
    16-bit space is bounded), so a port exit costs one dict lookup.
    """

    def __init__(self, trace_io=None, strict_io: bool = False):
        self.devices: list[Device] = []
        self.port_map: dict[int, tuple[Device, int]] = {}
        # Hot-path tables: port -> (bound callback, range base), holding only devices in D0,
        # so the vCPU loop needs no state check; anything else takes the slow path.
        self.live_port_reads: dict[int, tuple] = {}
        self.live_port_writes: dict[int, tuple] = {}
        self._mmio_starts: list[int] = []
        self._mmio: list[tuple[int, int, Device]] = []
        self.unclaimed: Counter = Counter()
        self.outside_d0: Counter = Counter()
        self.trace = trace_io
        self.strict = strict_io

    def add(self, dev: Device) -> Device:
        """Register a device's ranges; refuses any overlap with a clear error."""
        for base, length in dev.ports:
            if length <= 0 or base < 0 or base + length > 0x10000:
                raise DeviceConfigError(f"{dev.name}: I/O port range {base:#x}+{length} is outside 0-0xffff")
            for p in range(base, base + length):
                if p in self.port_map:
                    other = self.port_map[p][0]
                    raise DeviceConfigError(f"{dev.name}: I/O port {p:#x} already belongs to {other.name}")
        for base, length in dev.mmio:
            if length <= 0:
                raise DeviceConfigError(f"{dev.name}: empty MMIO range at {base:#x}")
            for b, n, other in self._mmio:
                if base < b + n and b < base + length:
                    raise DeviceConfigError(f"{dev.name}: MMIO {base:#x}+{length:#x} overlaps {other.name} "
                                            f"at {b:#x}+{n:#x}")
        for base, length in dev.ports:
            for p in range(base, base + length):
                self.port_map[p] = (dev, base)
        for base, length in dev.mmio:
            i = bisect.bisect(self._mmio_starts, base)
            self._mmio_starts.insert(i, base)
            self._mmio.insert(i, (base, length, dev))
        self.devices.append(dev)
        return dev

    def start_all(self) -> None:
        """prepare_hardware then d0_entry for every device, in registration order."""
        for dev in self.devices:
            self._transition(dev, dev.prepare_hardware, State.ADDED, State.PREPARED)
            self._transition(dev, dev.d0_entry, State.PREPARED, State.D0)

    def stop_all(self) -> None:
        """d0_exit then release_hardware, in reverse order; never twice, never after a failed D0 entry."""
        for dev in reversed(self.devices):
            if dev.state is State.D0:
                self._transition(dev, dev.d0_exit, State.D0, State.STOPPED, quiet=True)
            if dev.state is not State.D0:
                self._relink(dev)
            if dev.state in (State.PREPARED, State.STOPPED, State.FAILED):
                try:
                    dev.release_hardware()
                except Exception as e:  # release must happen for all; report and go on
                    print(f"pykvm: {dev.name}: release failed: {e}", file=sys.stderr)
                dev.state = State.RELEASED

    def _transition(self, dev: Device, callback, frm: State, to: State, quiet: bool = False) -> None:
        if dev.state is not frm:
            return
        try:
            callback()
        except Exception as e:
            dev.state = State.FAILED
            self._relink(dev)
            if quiet:
                print(f"pykvm: {dev.name}: {callback.__name__} failed: {e}", file=sys.stderr)
                return
            raise DeviceConfigError(f"{dev.name}: {callback.__name__} failed: {e}") from e
        dev.state = to
        self._relink(dev)

    def _relink(self, dev: Device) -> None:
        """Put the device's ports in (D0) or take them out of (any other state) the hot-path tables."""
        live = dev.state is State.D0
        for base, length in dev.ports:
            for p in range(base, base + length):
                if live:
                    self.live_port_reads[p] = (dev.io_read, base)
                    self.live_port_writes[p] = (dev.io_write, base)
                else:
                    self.live_port_reads.pop(p, None)
                    self.live_port_writes.pop(p, None)

    def mmio_lookup(self, addr: int) -> tuple[Device, int] | None:
        """(device, base) decoding this guest-physical address, or None."""
        i = bisect.bisect_right(self._mmio_starts, addr) - 1
        if i >= 0:
            base, length, dev = self._mmio[i]
            if addr < base + length:
                return dev, base
        return None

    # -- slow paths: unclaimed addresses and devices outside D0 --
    def unclaimed_access(self, kind: str, addr: int, size: int, is_write: bool, value: int = 0) -> int:
        """Real-hardware behaviour for an address no device decodes: reads all ones, writes dropped."""
        self.unclaimed[(kind, addr, "w" if is_write else "r")] += 1
        if self.trace:
            what = f"write {value:#x}" if is_write else "read"
            self.trace(f"{kind} {addr:#x} size {size} {what}: unclaimed")
        if self.strict:
            raise StrictIoViolation(kind, addr, size, is_write, value)
        return (1 << (8 * size)) - 1

    def inactive_access(self, dev: Device, size: int, is_write: bool) -> int:
        """A device outside D0 answers like nothing is there; the access is counted."""
        self.outside_d0[(dev.name, "w" if is_write else "r")] += 1
        return (1 << (8 * size)) - 1
