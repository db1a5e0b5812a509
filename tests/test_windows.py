"""Memory-backed device windows, the identity device and the coalesced-MMIO ring."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.devices import DeviceManager, State, memwindow
from pykvm.devices.device import Device, Window
from pykvm.devices.identity import Identity, log_hash
from pykvm.devices.memwindow import RING_ENTRY, RING_HEADER, RING_MAX, RingStats, drain_ring
from pykvm.kvm import constants as C

from .helpers import WINDOW_POLL_DEVICES, guest, pykvm

BASE = abi.PYKVM_IDENT_BASE
POLL_OUTPUT = (b"window-poll: poll\n"
               b"ident: vendor=0x7079 device=0x6b76 version=1.2 caps=0xf serial=PYKVM-IDENT-0001\n"
               b"reads: 100000 ok\n"
               b"config: 16 words landed, generation 16\n"
               b"status: running, tick advances\n"
               b"log: 1000 coalesced writes, count 1000 hash ok\n"
               b"control: status trapped, reads counted\n"
               b"control: status backed, reads not counted\n"
               b"window-poll: ok\n")
READS_OUTPUT = (b"ident: vendor=0x7079 device=0x6b76 version=1.2 caps=0xf serial=PYKVM-IDENT-0001\n"
                b"reads: 100000 ok\n")


def config_word(i):
    return (0xC0F10000 + i * 0x111) & 0xFFFFFFFF


def log_value(i):
    return (i * 0x9E3779B1 + 7) & 0xFFFFFFFF


# ------------------------------------------------------------------ coalesced ring (no KVM)
RING = 4096


def ring(entries, first=0, last=None, page_at=0, size=None):
    buf = bytearray(size or page_at + RING)
    for i, (addr, length, data) in enumerate(entries):
        RING_ENTRY.pack_into(buf, page_at + RING_HEADER.size + ((first + i) % RING_MAX) * RING_ENTRY.size,
                             addr, length, 0, data)
    RING_HEADER.pack_into(buf, page_at, first, (first + len(entries)) % RING_MAX if last is None else last)
    return buf


def drain(buf, zones=((0x1000, 8),), page_at=0, limit=RING_MAX):
    got, stats = [], RingStats()
    n = drain_ring(buf, page_at, list(zones), lambda a, n, v: got.append((a, n, v)), stats, limit)
    assert n == len(got)
    return got, stats


def test_ring_applies_writes_in_order_and_advances_first():
    entries = [(0x1000, 4, struct.pack("<Q", v)) for v in (5, 6, 7)]
    buf = ring(entries, first=RING_MAX - 2)    # wraps around the end of the ring
    got, stats = drain(buf)
    assert got == [(0x1000, 4, 5), (0x1000, 4, 6), (0x1000, 4, 7)]
    assert stats.applied == 3
    first, last = RING_HEADER.unpack_from(buf, 0)
    assert first == last == 1


def test_ring_masks_values_to_their_length():
    got, _ = drain(ring([(0x1000, 1, b"\xaa\xbb\xcc\xdd\xee\xff\x11\x22"),
                         (0x1000, 8, b"\x01\x02\x03\x04\x05\x06\x07\x08")]))
    assert got == [(0x1000, 1, 0xAA), (0x1000, 8, 0x0807060504030201)]


def test_ring_drops_bad_lengths_and_addresses_outside_zones():
    entries = [(0x1000, 0, bytes(8)), (0x1000, 9, bytes(8)), (0x1000, 0xFFFFFFFF, bytes(8)),
               (0x2000, 4, bytes(8)), (0x1006, 4, bytes(8)),   # straddles the zone's end
               (0x1004, 4, struct.pack("<Q", 42))]
    got, stats = drain(ring(entries))
    assert got == [(0x1004, 4, 42)]
    assert (stats.bad_length, stats.outside_zone, stats.applied) == (3, 2, 1)


@pytest.mark.parametrize("first,last", [(RING_MAX, 0), (0, RING_MAX), (0xFFFFFFFF, 3), (5, 0x80000000)])
def test_ring_indices_out_of_range_are_not_followed(first, last):
    buf = ring([(0x1000, 4, bytes(8))] * 3, first=0)
    RING_HEADER.pack_into(buf, 0, first, last)
    got, stats = drain(buf)
    assert got == [] and stats.bad_index == 1
    new_first, new_last = RING_HEADER.unpack_from(buf, 0)
    assert new_first < RING_MAX   # resynchronised inside the ring


def test_ring_page_outside_the_buffer_is_ignored():
    buf = ring([(0x1000, 4, bytes(8))])
    assert drain(buf, page_at=1)[0] == []          # page would run past the end
    assert drain(buf, page_at=-4096)[0] == []


def test_ring_draining_is_bounded_per_call():
    buf = ring([(0x1000, 4, struct.pack("<Q", i)) for i in range(RING_MAX - 1)])
    got, _ = drain(buf, limit=10)
    assert [v for _a, _n, v in got] == list(range(10))
    got, _ = drain(buf)
    assert [v for _a, _n, v in got] == list(range(10, RING_MAX - 1))


def test_a_write_that_drains_again_never_sees_an_entry_twice():
    buf = ring([(0x1000, 4, struct.pack("<Q", i)) for i in range(6)])
    seen, stats = [], RingStats()

    def apply(addr, n, value):
        seen.append(value)
        if value == 2:  # e.g. a device model that switches modes, whose hook drains
            drain_ring(buf, 0, [(0x1000, 8)], apply, stats)

    drain_ring(buf, 0, [(0x1000, 8)], apply, stats)
    assert seen == [0, 1, 2, 3, 4, 5]


_index = st.integers(0, RING_MAX + 2) | st.integers(0, 2**32 - 1)
_entry = st.tuples(st.sampled_from([0, 0x1000, 0x1004, 0x1007, 0xFE002000, 0xFE001FFE, 2**64 - 1]) | st.integers(0, 2**64 - 1),
                   st.integers(0, 10) | st.integers(0, 2**32 - 1), st.integers(0, 1) | st.integers(0, 2**32 - 1),
                   st.binary(min_size=8, max_size=8))


@settings(max_examples=300, deadline=None)
@given(_index, _index, st.lists(_entry, max_size=RING_MAX))
def test_garbage_rings_never_escape_their_bounds(first, last, entries):
    buf = bytearray(RING)
    for i, e in enumerate(entries):
        RING_ENTRY.pack_into(buf, RING_HEADER.size + i * RING_ENTRY.size, *e)
    RING_HEADER.pack_into(buf, 0, first, last)
    got, stats = drain(buf, zones=((0x1000, 8), (0xFE002000, 4)))
    assert len(got) <= RING_MAX
    for addr, n, value in got:
        assert 1 <= n <= 8 and value < 1 << (8 * n)
        assert 0x1000 <= addr and addr + n <= 0x1008 or 0xFE002000 <= addr and addr + n <= 0xFE002004
    first, _last = RING_HEADER.unpack_from(buf, 0)
    assert first < RING_MAX


# ------------------------------------------------------------------ windows and the identity model (no KVM)
def test_window_image_is_a_memfd_region_the_model_writes():
    w = Window("regs", 0x10000, 0x2000)
    region = memwindow.attach_image(w, b"\x01\x02")
    try:
        assert region.fd >= 0 and region.host_addr and w.backing is region
        assert memwindow.read_reg(w, 0, 4) == 0x0201
        memwindow.write_reg(w, 0x1FFE, 4, 0xAABBCCDD)          # clipped at the end
        assert memwindow.read_reg(w, 0x1FFE, 4) == 0xFFFFCCDD  # bytes past the window read as ones
        assert bytes(region.mm[0x1FFE:0x2000]) == b"\xdd\xcc"
    finally:
        memwindow.release_image(w)
    assert w.backing is None and region.fd < 0
    assert bytes(w.image[:2]) == b"\x01\x02" and len(w.image) == 0x2000   # a plain copy remains


@pytest.mark.parametrize("gpa,size", [(0x10001, 0x1000), (0x10000, 0x800), (0x10000, 0)])
def test_window_images_must_be_whole_pages(gpa, size):
    with pytest.raises(ValueError, match="page"):
        memwindow.attach_image(Window("bad", gpa, size))


def test_set_mode_asks_the_hook_only_for_a_live_owner():
    dm = DeviceManager()
    calls = []
    dm.window_hook = lambda dev, live: calls.append((dev.name, live, [w.mode for w in dev.windows]))
    dev = Identity()
    dm.add(dev)
    memwindow.set_mode(dev, dev.status, "trapped")          # not started: just remembered
    assert calls == [] and dev.status.mode == "trapped"
    dm.start_all()
    assert calls == [("identity", True, ["backed", "trapped"])]
    memwindow.set_mode(dev, dev.status, "backed")
    assert calls[-1] == ("identity", True, ["backed", "backed"])
    with pytest.raises(ValueError):
        memwindow.set_mode(dev, dev.status, "cached")
    dm.stop_all()
    assert calls[-1][:2] == ("identity", False)


def test_hook_follows_the_lifecycle_hot_plug_and_power():
    dm = DeviceManager()
    calls = []
    dm.window_hook = lambda dev, live: calls.append((dev.name, live, dev.state))
    dm.start_all()
    dev = dm.hot_add(Identity(base=0xFE100000, name="id2"))
    assert calls == [("id2", True, State.D0)]
    dm.set_power(dev, False)
    assert calls[-1] == ("id2", False, State.D0)             # unmapped before the model leaves D0
    dm.set_power(dev, True)
    assert calls[-1] == ("id2", True, State.D0)
    dm.hot_remove("id2")
    assert calls[3] == ("id2", False, State.D0)
    assert all(not live for _n, live, _s in calls[4:])          # disowning unlinks again: idempotent


def test_hook_is_not_called_for_devices_without_windows_or_for_unowned_replacements():
    dm = DeviceManager()
    calls = []
    dm.window_hook = lambda dev, live: calls.append(dev)
    dm.add(Device())
    dm.start_all()
    assert calls == []
    owner = dm.add(Identity())
    replacement = Identity()                                    # prepared aside, owns nothing yet
    dm._link(replacement, True)
    assert calls == [owner]


def started_identity():
    dev = Identity()
    dev.prepare_hardware()
    dev.d0_entry(State.PREPARED)
    return dev


def test_identity_image_holds_what_the_hardware_returns():
    dev = started_identity()
    try:
        r = lambda off, n=4: memwindow.read_reg(dev.ident, off, n)
        assert (r(0), r(4), r(8), r(12)) == (0x7079, 0x6B76, 0x00010002, 0xF)
        assert bytes(dev.ident.image[0x10:0x30]).rstrip(b"\0") == b"PYKVM-IDENT-0001"
        assert dev.mmio_read(abi.PYKVM_IDENT_VENDOR_ID, 4) == 0x7079    # the trapped path reads the same
        for i in range(16):
            dev.mmio_write(abi.PYKVM_IDENT_CONFIG + 4 * i, 4, config_word(i))
        dev.mmio_write(abi.PYKVM_IDENT_CONFIG + 1, 2, 0xBEEF)          # a narrow, unaligned write
        assert r(abi.PYKVM_IDENT_CONFIG) == (config_word(0) & 0xFF0000FF) | 0xBEEF00
        assert dev.config_words[0] == r(abi.PYKVM_IDENT_CONFIG)
        assert r(abi.PYKVM_IDENT_CONFIG_GEN) == 17
        dev.mmio_write(abi.PYKVM_IDENT_VENDOR_ID, 4, 0)                # read-only: ignored
        assert r(0) == 0x7079 and dev.ignored_writes == 1
        values = [log_value(i) for i in range(10)]
        for v in values:
            dev.mmio_write(abi.PYKVM_IDENT_LOG, 4, v)
        assert dev.mmio_read(abi.PYKVM_IDENT_FLUSH, 4) == 10
        assert memwindow.read_reg(dev.status, abi.PYKVM_IDENT_LOG_HASH - 0x1000, 4) == log_hash(values)
        assert log_hash(values) != log_hash(values[::-1])               # the hash sees the order
    finally:
        dev.release_hardware()


def test_identity_trapped_status_reads_have_a_side_effect():
    dev = started_identity()
    try:
        off = abi.PYKVM_IDENT_TRAPPED_READS
        assert dev.mmio_read(off, 4) == 0 and dev.mmio_read(off, 4) == 0   # backed: no side effect
        dev.mmio_write(abi.PYKVM_IDENT_CONTROL, 4, abi.PYKVM_IDENT_CTL_TRAP_STATUS | 0xF0)
        assert dev.status.mode == "trapped" and dev.ident.mode == "backed"
        assert memwindow.read_reg(dev.ident, abi.PYKVM_IDENT_CONTROL, 4) == 1
        assert dev.mmio_read(abi.PYKVM_IDENT_STATUS, 4) & abi.PYKVM_IDENT_ST_STATUS_TRAPPED
        assert dev.mmio_read(off, 4) == 1 and dev.mmio_read(off, 4) == 2
        dev.mmio_write(abi.PYKVM_IDENT_CONTROL, 4, abi.PYKVM_IDENT_CTL_TRAP_IDENT)
        assert (dev.status.mode, dev.ident.mode) == ("backed", "trapped")
    finally:
        dev.release_hardware()


def test_identity_tick_runs_between_io_start_and_io_suspend():
    dev = started_identity()
    try:
        tick = lambda: struct.unpack_from("<Q", dev.status.image, 0)[0]
        dev.io_start()
        t0 = tick()
        time.sleep(0.05)
        assert tick() > t0
        assert memwindow.read_reg(dev.status, 8, 4) & abi.PYKVM_IDENT_ST_RUNNING
        dev.io_suspend()
        t1 = tick()
        time.sleep(0.02)
        assert tick() == t1 and not memwindow.read_reg(dev.status, 8, 4) & abi.PYKVM_IDENT_ST_RUNNING
    finally:
        dev.release_hardware()


def test_identity_state_round_trip_and_validation():
    dev = started_identity()
    try:
        for i in range(16):
            dev.mmio_write(abi.PYKVM_IDENT_CONFIG + 4 * i, 4, config_word(i))
        dev.mmio_write(abi.PYKVM_IDENT_LOG, 4, 99)
        dev.mmio_write(abi.PYKVM_IDENT_CONTROL, 4, 1)
        state = dev.get_state()
    finally:
        dev.release_hardware()
    fresh = Identity()
    fresh.set_state(state)           # before prepare_hardware, as the supervisor and restore do
    assert fresh.status.mode == "trapped"
    fresh.prepare_hardware()
    try:
        assert bytes(fresh.ident.image) == bytes(dev.ident.image)
        assert fresh.get_state()["log_hash"] == log_hash([99])
    finally:
        fresh.release_hardware()
    for bad in ({"config": [0] * 15}, {"config": [-1] * 16}, {"config": [0] * 16, "control": "x"},
                {"config": [0] * 16, "tick": -5}):
        with pytest.raises(ValueError):
            Identity().set_state(bad)


# ------------------------------------------------------------------ with KVM
def run_guest(tmp_path, cmdline, prepare=None, **overrides):
    """Run window-poll in-process; returns (machine outcome, serial bytes, vCPU 0 MMIO exits, machine)."""
    from pykvm.machine import Machine, MachineConfig

    log = tmp_path / "serial.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        cfg = MachineConfig(kernel=guest("window-poll"), cmdline=cmdline, serial_out=fd, timeout=120,
                            crash_dir=None, devices=WINDOW_POLL_DEVICES, **overrides)
        with Machine(cfg) as m:
            if prepare:
                prepare(m)
            outcome = m.run()
            mmio = m.exit_counts[0].get(C.KVM_EXIT_MMIO, 0)
    finally:
        os.close(fd)
    return outcome, log.read_bytes(), mmio, m


@pytest.mark.kvm
def test_backed_window_reads_cost_no_exit(tmp_path):
    outcome, out, mmio, _m = run_guest(tmp_path, "reads")
    assert out == b"window-poll: reads\n" + READS_OUTPUT
    assert outcome.status == 39, outcome.reason
    # 100 000 verified reads plus ~50 more (ident line, set-up): none of them exits
    assert mmio < 5


@pytest.mark.kvm
def test_trapped_window_reads_exit_every_time(tmp_path):
    outcome, out, mmio, m = run_guest(tmp_path, "reads trapped")
    assert out == b"window-poll: reads trapped\n" + READS_OUTPUT
    assert outcome.status == 39, outcome.reason
    assert mmio >= 100_000
    assert m.stats()["exits"][0]["KVM_EXIT_MMIO"] == mmio


@pytest.mark.kvm
def test_poll_guest_writes_land_in_the_image(tmp_path):
    outcome, out, mmio, m = run_guest(tmp_path, "poll")
    assert out == POLL_OUTPUT
    assert outcome.status == 39, outcome.reason
    # the writes exit (16 config, 2 control, a few trapped reads, flushes, a ring-full exit per
    # ~170 coalesced log writes); the 100 000 reads do not
    assert mmio < 100
    dev = m.identity
    image = bytes(dev.ident.image)      # the last contents, kept after the device was released
    words = struct.unpack_from("<16I", image, abi.PYKVM_IDENT_CONFIG)
    assert list(words) == [config_word(i) for i in range(16)]
    assert struct.unpack_from("<I", image, abi.PYKVM_IDENT_CONFIG_GEN)[0] == 16
    assert dev.log_tail == [log_value(i) for i in range(1000)]          # coalesced, applied in order
    status = bytes(dev.status.image)
    assert struct.unpack_from("<II", status, abi.PYKVM_IDENT_LOG_COUNT - 0x1000) == (
        1000, log_hash(log_value(i) for i in range(1000)))
    assert m.ring_stats.applied > 0 and m.ring_stats.bad_index == m.ring_stats.outside_zone == 0


@pytest.mark.kvm
def test_without_readonly_memslots_windows_fall_back_to_trapped(tmp_path, capfd):
    def no_readonly(m):
        m.windows.readonly_mem = False

    outcome, out, mmio, _m = run_guest(tmp_path, "reads", prepare=no_readonly)
    assert out == b"window-poll: reads\n" + READS_OUTPUT
    assert outcome.status == 39
    assert mmio >= 100_000
    assert "KVM_CAP_READONLY_MEM" in capfd.readouterr().err


@pytest.mark.kvm
def test_windows_map_on_d0_and_unmap_on_leaving_it_with_hot_plug(tmp_path):
    seen = {}

    def work(m):
        def go():
            deadline = time.monotonic() + 30
            log = tmp_path / "serial.log"
            while b"configured" not in log.read_bytes():
                assert time.monotonic() < deadline
                time.sleep(0.01)

            def inspect():
                seen["boot"] = m.window_info()
                dev = m.devices.hot_add(Identity(base=0xFE100000, name="id2"))
                seen["added"] = m.window_info()
                m.devices.set_power(dev, False)
                seen["d3"] = m.window_info()
                m.devices.set_power(dev, True)
                seen["d0"] = m.window_info()
                m.devices.hot_remove("id2")
                seen["removed"] = m.window_info()

            m.call(inspect)

        threading.Thread(target=go, daemon=True).start()

    outcome, out, _mmio, _m = run_guest(tmp_path, "save", prepare=work)
    assert outcome.status == 39, (outcome.reason, out)
    slots = lambda info: {(e["device"], e["window"]): e["slot"] for e in info if "window" in e}
    # the guest switched its status window to trapped mode before printing "configured"
    assert slots(seen["boot"]) == {("identity", "ident"): 64}
    assert {"device": "identity", "coalesced": BASE + abi.PYKVM_IDENT_LOG, "size": 4} in seen["boot"]
    assert slots(seen["added"]) == {("identity", "ident"): 64, ("id2", "ident"): 65, ("id2", "status"): 66}
    assert slots(seen["d3"]) == {("identity", "ident"): 64}
    assert not any(e.get("device") == "id2" for e in seen["d3"])
    assert slots(seen["d0"]) == slots(seen["added"])
    assert seen["removed"] == seen["boot"]


@pytest.mark.kvm
def test_existing_guests_do_not_notice_the_identity_device():
    r = pykvm("run", "hello", "--device", "identity", "--timeout", "30")
    assert r.stdout == b"Hello from pykvm!\ncpus=1 ram=128M\ncmdline=\n" and r.returncode == 0
