"""Routes port and MMIO accesses to devices by address range; owns device instances and their lifecycles."""

from __future__ import annotations

import bisect
import sys
import threading

from ..errors import DeviceConfigError
from .device import Device, State
from .events import StrictIoViolation
from .lifecycle import CallbackFailed, Lifecycle
from .tally import BoundedTally


# Distinct unclaimed addresses remembered; past this a guest walking the address space only
# raises `unclaimed_other`, so the VMM's memory stays bounded whatever the guest touches.
UNCLAIMED_KEYS = 64
MMIO_LIMIT = 1 << 52           # guest-physical addresses x86-64 can express


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class DeviceManager:
    """All devices of a VM: range ownership with overlap checks, lifecycles, and dispatch tables.

    The vCPU loop reads `live_port_reads` / `live_port_writes` (port -> (callback, base)) without
    locks. They hold only devices in D0, so an access to a device in any other state falls to the
    slow path, which answers like an absent device and counts it. Tables change by dict.update /
    pop, each atomic under the GIL, so a vCPU sees either the old or the new instance, never a mix
    within one port.
    """

    def __init__(self, trace_io=None, strict_io: bool = False, access_filter=None):
        self.devices: list[Device] = []
        self.lifecycles: dict[Device, Lifecycle] = {}
        self.port_map: dict[int, tuple[Device, int]] = {}
        self.live_port_reads: dict[int, tuple] = {}
        self.live_port_writes: dict[int, tuple] = {}
        self._mmio_starts: list[int] = []
        self._mmio: list[list] = []               # [base, length, owner, read_cb | None, write_cb | None]
        # what the access paths read: one attribute holding both lists, replaced whole after each
        # change of ranges, so a vCPU never pairs one version's starts with another's entries
        self._mmio_index: tuple[list[int], list[list]] = ([], [])
        self.reserved: list[tuple[int, int, str]] = []   # guest-physical ranges no device may claim
        # the guest picks these keys: bounded, and readable while vCPU threads count
        self.unclaimed = BoundedTally(UNCLAIMED_KEYS)
        self.outside_d0 = BoundedTally()
        self.trace = trace_io
        self.strict = strict_io
        # access_filter.wrap(dev, kind, base, read_cb, write_cb) -> (read_cb, write_cb): the policy hook
        self.access_filter = access_filter
        # window_hook(dev, live): set by the machine; maps/unmaps dev's memory-backed windows (per their
        # mode) and registers/drops its coalesced registers. Called after linking, before unlinking.
        self.window_hook = None
        self.lock = threading.RLock()
        self.started = False
        self.events: list[str] = []               # lifecycle/recovery log for the exit summary

    # ------------------------------------------------------------ registration
    def reserve(self, base: int, length: int, what: str) -> None:
        """Keep devices out of a guest-physical range the machine uses (RAM, the LAPIC page, ...)."""
        self.reserved.append((base, length, what))

    def _mmio_clash(self, base: int, length: int, entries) -> str | None:
        """Why [base, base + length) cannot be decoded next to `entries` (MMIO table rows), or None."""
        if length <= 0:
            return f"empty MMIO range at {base:#x}"
        if base < 0 or base + length > MMIO_LIMIT:
            return (f"MMIO {base:#x}+{length:#x} is outside the guest-physical address space "
                    f"(0-{MMIO_LIMIT - 1:#x})")
        for b, n, what in self.reserved:
            if base < b + n and b < base + length:
                return f"MMIO {base:#x}+{length:#x} overlaps {what} at {b:#x}+{n:#x}"
        for b, n, other, *_ in entries:
            if base < b + n and b < base + length:
                return f"MMIO {base:#x}+{length:#x} overlaps {other.name} at {b:#x}+{n:#x}"
        return None

    def _check_free(self, dev: Device) -> None:
        for base, length in dev.ports:
            if length <= 0 or base < 0 or base + length > 0x10000:
                raise DeviceConfigError(f"{dev.name}: I/O port range {base:#x}+{length} is outside 0-0xffff")
            for p in range(base, base + length):
                if p in self.port_map:
                    other = self.port_map[p][0]
                    raise DeviceConfigError(f"{dev.name}: I/O port {p:#x} already belongs to {other.name}")
        for base, length in dev.mmio:
            clash = self._mmio_clash(base, length, self._mmio)
            if clash:
                raise DeviceConfigError(f"{dev.name}: {clash}")
        for w in dev.windows:
            if not any(b <= w.gpa and w.gpa + w.size <= b + n for b, n in dev.mmio):
                raise DeviceConfigError(f"{dev.name}: window {w.name} lies outside the device's MMIO ranges")
        if any(d.name == dev.name for d in self.devices):
            raise DeviceConfigError(f"a device named {dev.name!r} already exists; choose another name")

    def add(self, dev: Device) -> Device:
        """Register a device's ranges (refusing overlaps); it starts with the others, or now if running.

        All or nothing: a device refused here, or whose start fails, leaves no trace (no ranges,
        no list entry, its hardware released), so a failed hot-add cannot half-add a device.
        """
        with self.lock:
            self._check_free(dev)
            self._own(dev)
            dev.manager = self
            self.devices.append(dev)
            self.lifecycles[dev] = Lifecycle(dev, link=self._link)
            if self.started:
                try:
                    self._start(dev)
                except BaseException:
                    self._remove(dev, surprise=False, quiet=True)
                    self.lifecycles.pop(dev, None)
                    raise
        return dev

    def _own(self, dev: Device) -> None:
        for base, length in dev.ports:
            for p in range(base, base + length):
                self.port_map[p] = (dev, base)
        for base, length in dev.mmio:
            i = bisect.bisect(self._mmio_starts, base)
            self._mmio_starts.insert(i, base)
            self._mmio.insert(i, [base, length, dev, None, None])
        self._mmio_index = (list(self._mmio_starts), list(self._mmio))

    def mmio_free(self, base: int, length: int) -> bool:
        """Whether [base, base + length) is neither reserved nor decoded by any device."""
        with self.lock:
            return self._mmio_clash(base, length, self._mmio) is None

    def set_mmio(self, dev: Device, ranges: list[tuple[int, int]]) -> None:
        """Move a device's MMIO ranges while it lives (a PCI BAR the guest reprograms): all or nothing.

        The new ranges get the checks `add` makes; a device in D0 is relinked at once, so the next
        access to the old addresses is unclaimed and the next to the new ones reaches the device.
        """
        with self.lock:
            if dev.windows:
                raise DeviceConfigError(f"{dev.name}: a device with memory-backed windows cannot move its MMIO")
            others = [e for e in self._mmio if e[2] is not dev]
            for base, length in ranges:
                clash = self._mmio_clash(base, length, others)
                if clash:
                    raise DeviceConfigError(f"{dev.name}: {clash}")
            entries = sorted(others + [[b, n, dev, None, None] for b, n in ranges], key=lambda e: e[0])
            dev.mmio = list(ranges)
            self._mmio_starts = [e[0] for e in entries]
            self._mmio = entries
            self._mmio_index = (list(self._mmio_starts), list(entries))
            if dev.state is State.D0:
                self._link(dev, True)

    def _disown(self, dev: Device) -> None:
        self._link(dev, False)
        for base, length in dev.ports:
            for p in range(base, base + length):
                if self.port_map.get(p, (None,))[0] is dev:
                    del self.port_map[p]
        keep = [(s, e) for s, e in zip(self._mmio_starts, self._mmio) if e[2] is not dev]
        self._mmio_starts = [s for s, _ in keep]
        self._mmio = [e for _, e in keep]
        self._mmio_index = (list(self._mmio_starts), list(self._mmio))

    def _link(self, dev: Device, live: bool) -> None:
        """Put (live) or take out the ranges `dev` owns in the hot tables."""
        with self.lock:
            hook = self.window_hook if dev.windows or getattr(dev, "coalesced", None) else None
            if hook is not None and not any(e[2] is dev for e in self._mmio):
                hook = None  # a replacement being prepared does not own its windows yet
            if hook is not None and not live:
                hook(dev, False)
            reads, writes = {}, {}
            for base, length in dev.ports:
                if self.port_map.get(base, (None,))[0] is not dev:
                    continue  # a replacement being prepared does not own its ranges yet
                if not live:  # taking out needs only the ports, not the policy's callbacks
                    reads.update(dict.fromkeys(range(base, base + length)))
                    continue
                rd, wr = self._wrap(dev, "port", base, dev.io_read, dev.io_write)
                for p in range(base, base + length):
                    reads[p] = (rd, base)
                    writes[p] = (wr, base)
            if live:
                self.live_port_reads.update(reads)
                self.live_port_writes.update(writes)
            else:
                for p in reads:
                    self.live_port_reads.pop(p, None)
                    self.live_port_writes.pop(p, None)
            for entry in self._mmio:
                if entry[2] is dev:
                    entry[3:5] = self._wrap(dev, "mmio", entry[0], dev.mmio_read, dev.mmio_write) if live else (None, None)
            if hook is not None and live:
                hook(dev, True)

    def _wrap(self, dev, kind, base, rd, wr):
        if self.access_filter is None:
            return rd, wr
        return self.access_filter.wrap(dev, kind, base, rd, wr)

    # ------------------------------------------------------------ lifecycle
    def _log(self, msg: str) -> None:
        self.events.append(msg)
        print(f"pykvm: {msg}", file=sys.stderr)

    def _start(self, dev: Device) -> None:
        try:
            self.lifecycles[dev].start()
        except CallbackFailed as e:
            raise DeviceConfigError(str(e)) from e

    def start_all(self) -> None:
        """Bring every device to D0, in registration order."""
        with self.lock:
            self.started = True
            for dev in list(self.devices):
                if dev.state is State.ADDED:
                    self._start(dev)

    def stop_all(self) -> None:
        """Remove every device, newest first; release runs exactly once per instance."""
        with self.lock:
            for dev in reversed(list(self.devices)):
                self._remove(dev, surprise=False, quiet=True)
            self.started = False

    def _remove(self, dev: Device, surprise: bool, quiet: bool = False) -> None:
        try:
            self.lifecycles[dev].remove(surprise=surprise)
        except Exception as e:
            print(f"pykvm: {dev.name}: removal: {e}", file=sys.stderr)
        self._disown(dev)
        if dev in self.devices:
            self.devices.remove(dev)

    def hot_remove(self, name: str, surprise: bool = False) -> Device:
        """Take a device away while the guest runs; its ranges then read as all ones."""
        with self.lock:
            dev = self.find(name)
            self._remove(dev, surprise)
            self._log(f"{'surprise-' if surprise else ''}removed device {name}")
            return dev

    def hot_add(self, dev: Device) -> Device:
        """Plug a device in while the guest runs."""
        self.add(dev)
        self._log(f"added device {dev.name}")
        return dev

    def find(self, name: str) -> Device:
        """The current instance of the device called `name`."""
        for d in self.devices:
            if d.name == name:
                return d
        raise DeviceConfigError(f"no device named {name!r}; devices: {', '.join(d.name for d in self.devices)}")

    def set_power(self, dev: Device, d0: bool) -> None:
        """Power a device up to D0 or down to low power (guest- or host-requested)."""
        lc = self.lifecycles[dev]
        if d0 and dev.state is State.LOW_POWER:
            lc.power_up()
        elif not d0 and dev.state is State.D0:
            lc.power_down()

    def replace(self, old: Device, new: Device) -> None:
        """Switch dispatch from `old` to an already-started `new` instance, atomically per port."""
        with self.lock:
            new.generation = old.generation + 1
            new.manager = self
            for base, length in old.ports:
                for p in range(base, base + length):
                    self.port_map[p] = (new, base)
            for entry in self._mmio:
                if entry[2] is old:
                    entry[2] = new
            self.devices[self.devices.index(old)] = new
            if new.state is State.D0:
                self._link(new, True)

    # ------------------------------------------------------------ slow paths
    def port_access(self, port: int, size: int, is_write: bool, value: int = 0) -> int:
        """A port access the hot tables did not take: unclaimed, or a device outside D0."""
        ent = self.port_map.get(port)
        if ent is None:
            return self.unclaimed_access("port", port, size, is_write, value)
        dev, base = ent
        live = (self.live_port_writes if is_write else self.live_port_reads).get(port)
        if live is None:
            return self.inactive_access(dev, size, is_write)
        if is_write:
            live[0](port - base, size, value)
            return 0
        return live[0](port - base, size) & _all_ones(size)

    def mmio_access(self, addr: int, size: int, is_write: bool, value: int = 0) -> int:
        """An MMIO access: to the owning device if it is in D0, else like nothing is there."""
        starts, entries = self._mmio_index
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            base, length, dev, rd, wr = entries[i]
            if addr < base + length:
                if rd is None:
                    return self.inactive_access(dev, size, is_write)
                if is_write:
                    wr(addr - base, size, value)
                    return 0
                return rd(addr - base, size) & _all_ones(size)
        return self.unclaimed_access("mmio", addr, size, is_write, value)

    def mmio_lookup(self, addr: int) -> tuple[Device, int] | None:
        """(device, base) decoding this guest-physical address, or None."""
        starts, entries = self._mmio_index
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            base, length, dev, *_ = entries[i]
            if addr < base + length:
                return dev, base
        return None

    def unclaimed_access(self, kind: str, addr: int, size: int, is_write: bool, value: int = 0) -> int:
        """Real-hardware behaviour for an address no device decodes: reads all ones, writes dropped."""
        self.unclaimed.add((kind, addr, "w" if is_write else "r"))
        if self.trace:
            what = f"write {value:#x}" if is_write else "read"
            self.trace(f"{kind} {addr:#x} size {size} {what}: unclaimed")
        if self.strict:
            raise StrictIoViolation(kind, addr, size, is_write, value)
        return _all_ones(size)

    def counters(self) -> dict:
        """Copies of the access counters, safe to take while vCPU threads add to them.

        dict(d) of a plain-keyed dict copies in C without running Python code, so no other
        thread can change the dict mid-copy; iterating the live dict could fail instead.
        """
        return {"unclaimed": dict(self.unclaimed.items()), "unclaimed_other": self.unclaimed.other,
                "outside_d0": dict(self.outside_d0.items()), "events": list(self.events)}

    @property
    def unclaimed_other(self) -> int:
        """Accesses counted to unclaimed addresses that are no longer listed one by one."""
        return self.unclaimed.other

    def inactive_access(self, dev: Device, size: int, is_write: bool) -> int:
        """A device outside D0 answers like nothing is there; the access is counted."""
        self.outside_d0.add((dev.name, "w" if is_write else "r"))
        return _all_ones(size)
