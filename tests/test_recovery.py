"""Recovery by re-enumeration, power requests and hot-plug, with the mailbox guest using the device."""

import os
import threading
import time

import pytest

from pykvm.crash.reader import open_core
from pykvm.devices import State
from pykvm.devices.mailbox import Mailbox

from .helpers import MAILBOX_ARGS, MAILBOX_DEVICES, guest, pykvm

pytestmark = pytest.mark.kvm


def machine(tmp_path, cmdline="work", **overrides):
    from pykvm.machine import Machine, MachineConfig

    out = os.open(tmp_path / "serial.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    cfg = MachineConfig(kernel=guest("mailbox"), cmdline=cmdline, serial_out=out, timeout=60,
                        crash_dir=tmp_path / "cores", devices=MAILBOX_DEVICES, **overrides)
    return Machine(cfg), out


def serial(tmp_path) -> str:
    return (tmp_path / "serial.log").read_text()


def current(m) -> Mailbox:
    return m.devices.find("mailbox")


def wait_generation_above(m, gen, timeout=10.0) -> Mailbox:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dev = current(m)
        if dev.generation > gen and dev.state is State.D0:
            return dev
        time.sleep(0.0005)
    raise AssertionError(f"mailbox did not come back above generation {gen}")


def resources():
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return len(os.listdir("/proc/self/fd")), threading.active_count(), rss_pages * os.sysconf("SC_PAGE_SIZE")


def in_background(fn):
    errors = []

    def wrapped():
        try:
            fn()
        except BaseException as e:  # surfaced by the test after run() returns
            errors.append(e)

    t = threading.Thread(target=wrapped, daemon=True)
    t.start()
    return t, errors


def test_power_state_requests_through_the_register():
    r = pykvm("run", "mailbox", *MAILBOX_ARGS, "--cmdline", "power", "--timeout", "30")
    assert r.stdout == b"mailbox: power test\nd3 state=3 data=0xffffffff\nd0 state=0 data=0x1234\nmailbox: power ok\n"
    assert r.returncode == 37


@pytest.mark.parametrize("cmdline", [None, "bogus", "workx", "powerless"])
def test_mailbox_without_a_known_command_line_says_what_it_needs(cmdline):
    """`pykvm run mailbox` alone used to run "work" forever, silently, waiting for a host stop flag."""
    args = ("--cmdline", cmdline) if cmdline else ()
    r = pykvm("run", "mailbox", *args, "--timeout", "20", "--no-dump")
    got = cmdline or ""
    assert r.stdout.decode() == f'mailbox: needs --cmdline power, work or "work rounds=N" (got "{got}")\n'
    assert r.returncode == (0x31 << 1) | 1 == 99, r.stderr


def test_a_thousand_faults_while_the_guest_works(tmp_path):
    m, fd = machine(tmp_path, restart_intensity=100_000, device_deadline=0.2)
    samples = {}

    def inject():
        try:
            _inject()
        finally:
            current(m).host_flags |= 1  # tell the guest to finish, whatever happened

    def _inject():
        time.sleep(0.2)  # let the guest start using the device
        for i in range(1000):
            dev = current(m)
            kind = "hang" if i % 100 == 50 else "corrupt" if i % 10 == 5 else "raise"
            if kind == "hang":
                dev.hang_seconds = 3.0
            dev.inject(kind)
            wait_generation_above(m, dev.generation)
            if i in (100, 999):
                time.sleep(0.3)  # let the last replaced instance's release finish
                samples[i] = resources()

    t, errs = in_background(inject)
    with m:
        outcome = m.run()
        recoveries = list(m.supervisor.recoveries)
    os.close(fd)
    t.join(5)
    assert not errs, (errs, outcome, outcome.details.get("traceback"))
    assert serial(tmp_path) == "mailbox: work\nmailbox: work done, data verified\n"
    assert outcome.status == 33, outcome.reason
    assert len(recoveries) == 1000
    assert [r["generation"] for r in recoveries] == list(range(1, 1001))
    assert sum("hung" in r["reason"] for r in recoveries) == 10
    # corruption is caught by the periodic check() or, if the guest touches it first, by the raise
    assert sum("consistency" in r["reason"] or "IndexError" in r["reason"] for r in recoveries) == 100
    fds0, threads0, rss0 = samples[100]
    fds1, threads1, rss1 = samples[999]
    assert fds1 == fds0 and threads1 == threads0
    assert rss1 - rss0 < 16 << 20, f"RSS grew by {(rss1 - rss0) >> 20} MiB over 900 restarts"


def _kill_n(m, n):
    def inject():
        time.sleep(0.1)
        for _ in range(n):
            dev = current(m)
            gen = dev.generation
            dev.inject("raise")
            if _ < n - 1:
                wait_generation_above(m, gen)
    return inject


def test_sixth_fault_in_the_window_surprise_removes(tmp_path):
    m, fd = machine(tmp_path)           # default intensity: 5 restarts in 60 s
    t, errs = in_background(_kill_n(m, 6))
    with m:
        outcome = m.run()
        events = list(m.devices.events)
        gave_up = list(m.supervisor.failed_for_good)
    os.close(fd)
    t.join(5)
    assert not errs, errs
    assert serial(tmp_path) == "mailbox: work\nmailbox: device removed\n"
    assert outcome.status == 35
    assert gave_up == ["mailbox"]   # the guest saw it as a surprise removal (power state 0xff)
    assert sum(e.startswith("recovered device mailbox") for e in events) == 5
    assert any("failed 6 times within 60s" in e and "escalating: remove" in e for e in events)


def test_escalation_can_stop_the_vm_with_a_core(tmp_path):
    m, fd = machine(tmp_path, on_device_failure="crash")
    t, errs = in_background(_kill_n(m, 6))
    with m:
        outcome = m.run()
    os.close(fd)
    t.join(5)
    assert not errs, errs
    assert outcome.status == 16 and outcome.trigger == "device-failure"
    assert open_core(outcome.core_path).info["trigger"] == "device-failure"


def test_hot_remove_while_the_guest_runs(tmp_path):
    m, fd = machine(tmp_path)

    def unplug():
        time.sleep(0.3)
        m.call(lambda: m.devices.hot_remove("mailbox", surprise=True))

    t, errs = in_background(unplug)
    with m:
        outcome = m.run()
    os.close(fd)
    t.join(5)
    assert not errs, errs
    assert serial(tmp_path) == "mailbox: work\nmailbox: device removed\n"
    assert outcome.status == 35


def test_hot_add_through_the_control_channel(tmp_path):
    import subprocess
    import sys

    from pykvm.control.client import request

    sock = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "mailbox", *MAILBOX_ARGS, "--cmdline", "work", "--control", sock,
                             "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        added = request(sock, {"cmd": "hot-add", "type": "mailbox", "base": 0x5D0, "name": "mailbox2"})
        assert added["ok"], added
        devs = {d["name"]: d for d in request(sock, {"cmd": "devices"})["devices"]}
        assert devs["mailbox2"]["state"] == "D0"
        clash = request(sock, {"cmd": "hot-add", "type": "mailbox", "base": 0x5C4, "name": "bad"})
        assert not clash["ok"] and "already belongs to mailbox" in clash["error"]
        inj = request(sock, {"cmd": "inject", "name": "mailbox", "kind": "raise"})
        assert inj["ok"], inj
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            devs = {d["name"]: d for d in request(sock, {"cmd": "devices"})["devices"]}
            if devs["mailbox"]["generation"] == 1:
                break
            time.sleep(0.02)
        assert devs["mailbox"]["generation"] == 1 and devs["mailbox"]["state"] == "D0"
        gone = request(sock, {"cmd": "hot-remove", "name": "mailbox", "surprise": True})
        assert gone["ok"] and gone["state"] == "surprise-removed"
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out == b"mailbox: work\nmailbox: device removed\n", err
    assert proc.returncode == 35
    assert b"recovered device mailbox: generation 1" in err


def test_cli_restart_budget_and_escalation(tmp_path):
    import subprocess
    import sys

    from pykvm.control.client import request

    sock = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "mailbox", *MAILBOX_ARGS, "--cmdline", "work", "--control", sock, "--timeout", "30",
                             "--restart-intensity", "0/60", "--on-device-failure", "crash",
                             "--crash-dir", str(tmp_path / "cores")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert request(sock, {"cmd": "inject", "name": "mailbox", "kind": "raise"})["ok"]
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 16, err
    assert b"escalating: crash" in err and b"core written to" in err
