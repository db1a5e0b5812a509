"""Device framework and models, driven directly (no KVM)."""

import os

import pytest

from pykvm.devices import Device, DeviceManager, GuestCrash, GuestExit, State, StrictIoViolation
from pykvm.devices.fwcfg import FwCfg
from pykvm.devices.serial import Serial16550
from pykvm.devices.simple import DebugExit, PowerOff, PvPanic
from pykvm.errors import DeviceConfigError


class Recorder(Device):
    name = "rec"

    def __init__(self, ports=(), mmio=(), fail_in=None):
        super().__init__()
        self.ports, self.mmio, self.calls, self.fail_in = list(ports), list(mmio), [], fail_in

    def _cb(self, name):
        self.calls.append(name)
        if name == self.fail_in:
            raise RuntimeError("boom")

    def prepare_hardware(self): self._cb("prepare")
    def d0_entry(self, previous): self._cb("d0_entry")
    def d0_exit(self, target): self._cb("d0_exit")
    def release_hardware(self): self._cb("release")


def test_overlapping_ports_refused():
    dm = DeviceManager()
    dm.add(Recorder(ports=[(0x3F8, 8)]))
    with pytest.raises(DeviceConfigError, match="0x3fc already belongs to rec"):
        dm.add(Recorder(ports=[(0x3FC, 2)]))


def test_overlapping_mmio_refused_and_lookup():
    dm = DeviceManager()
    a = dm.add(Recorder(mmio=[(0xD0000000, 0x1000)]))
    with pytest.raises(DeviceConfigError, match="overlaps"):
        dm.add(Recorder(mmio=[(0xD0000800, 0x1000)]))
    assert dm.mmio_lookup(0xD0000FFF) == (a, 0xD0000000)
    assert dm.mmio_lookup(0xD0001000) is None
    assert dm.mmio_lookup(0xCFFFFFFF) is None


def test_lifecycle_order_and_release_once():
    dm = DeviceManager()
    r = dm.add(Recorder(ports=[(0x10, 1)]))
    dm.start_all()
    assert r.state is State.D0
    dm.stop_all()
    dm.stop_all()
    assert r.calls == ["prepare", "d0_entry", "d0_exit", "release"]


def test_failed_d0_entry_gets_no_d0_exit_but_is_released():
    dm = DeviceManager()
    r = dm.add(Recorder(ports=[(0x10, 1)], fail_in="d0_entry"))
    with pytest.raises(DeviceConfigError, match="d0_entry failed"):
        dm.start_all()
    dm.stop_all()
    assert r.calls == ["prepare", "d0_entry", "release"]


def test_unclaimed_reads_all_ones_and_strict_mode():
    dm = DeviceManager()
    assert dm.unclaimed_access("port", 0x80, 1, False) == 0xFF
    assert dm.unclaimed_access("mmio", 0xD0000000, 8, False) == (1 << 64) - 1
    assert dm.unclaimed[("port", 0x80, "r")] == 1
    strict = DeviceManager(strict_io=True)
    with pytest.raises(StrictIoViolation, match="claimed by no device"):
        strict.unclaimed_access("port", 0x80, 2, True, 5)


def test_unclaimed_addresses_are_bounded_and_keep_the_heavy_hitters():
    """A guest touching 100 k distinct addresses must not grow the VMM (issue 9: 26 -> 38.5 MB RSS)."""
    dm = DeviceManager()
    for i in range(100_000):
        dm.unclaimed_access("mmio", 0xD0000000 + 8 * i, 4, False)
        if i % 10 == 0:
            dm.unclaimed_access("port", 0x80, 1, True, 0)
    listed = dict(dm.unclaimed.items())
    assert len(listed) <= 64
    assert listed[("port", 0x80, "w")] == 10_000
    assert dm.unclaimed.total == 110_000 == sum(listed.values()) + dm.unclaimed.other
    assert sorted(dm.unclaimed.items())  # the exit summary sorts (key, count) pairs
    assert {f"{k} {a:#x} {rw}": n for (k, a, rw), n in dm.unclaimed.items()}  # machine.stats() reads it so


def test_unclaimed_can_be_read_while_vcpus_count():
    """stats() iterates the counts while vCPU threads add new addresses ('dictionary changed size')."""
    import threading

    dm = DeviceManager()
    stop = threading.Event()

    def guest():
        i = 0
        while not stop.is_set():
            dm.unclaimed_access("mmio", 0xD0000000 + i, 1, False)
            dm.inactive_access(Recorder(), 1, i & 1 == 0)
            i += 1

    t = threading.Thread(target=guest)
    t.start()
    try:
        for _ in range(2000):
            sum(n for _, n in dm.unclaimed.items())
            dict(dm.outside_d0.items())
    finally:
        stop.set()
        t.join()


def test_debug_exit_status_encoding():
    with pytest.raises(GuestExit) as e:
        DebugExit().io_write(0, 4, 0x21)
    assert e.value.status == 0x43
    with pytest.raises(GuestExit) as e:
        DebugExit().io_write(0, 1, 0)
    assert e.value.status == 1


def test_poweroff_needs_slp_en():
    p = PowerOff()
    p.io_write(0, 2, 0x0)
    with pytest.raises(GuestExit) as e:
        p.io_write(0, 2, 0x2000)
    assert e.value.status == 0


def test_pvpanic_semantics():
    seen = []
    p = PvPanic(on_crash_loaded=seen.append)
    assert p.io_read(0, 1) == 3
    p.io_write(0, 1, 2)
    assert seen == [2]
    with pytest.raises(GuestCrash, match="pvpanic"):
        p.io_write(0, 1, 1)


def test_fwcfg_items():
    f = FwCfg(ram_size=128 << 20, ram_top=128 << 20, nr_cpus=3)
    f.io_write(0, 2, 0x00)
    assert bytes(f.io_read(1, 1) for _ in range(4)) == b"QEMU"
    f.io_write(0, 2, 0x05)
    assert f.io_read(1, 1) | f.io_read(1, 1) << 8 == 3
    f.io_write(0, 2, 0x03)
    assert sum(f.io_read(1, 1) << (8 * i) for i in range(8)) == 128 << 20
    f.io_write(0, 2, 0x1234)
    assert f.io_read(1, 1) == 0


def test_serial_output_lsr_and_loopback():
    r, w = os.pipe()
    s = Serial16550(out_fd=w)
    assert s.io_read(5, 1) & 0x60 == 0x60           # THR empty and transmitter empty
    for ch in b"hi\n":
        s.io_write(0, 1, ch)
    os.close(w)
    assert os.read(r, 100) == b"hi\n"
    assert s.output_tail() == b"hi\n"
    s.io_write(4, 1, 0x10 | 0x02)                    # loopback, RTS
    assert s.io_read(6, 1) & 0x10                    # CTS mirrors RTS
    s.io_write(0, 1, 0x41)
    assert s.io_read(5, 1) & 1 and s.io_read(0, 1) == 0x41
    s.io_write(2, 1, 0x01)
    assert s.io_read(2, 1) & 0xC0 == 0xC0            # FIFO enabled: 16550A
    os.close(r)


def test_serial_survives_closed_sink():
    r, w = os.pipe()
    os.close(r)
    s = Serial16550(out_fd=w)
    import signal
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        for ch in b"x\n":
            s.io_write(0, 1, ch)
    finally:
        signal.signal(signal.SIGPIPE, old)
        os.close(w)
    assert s.output_tail() == b"x\n"
