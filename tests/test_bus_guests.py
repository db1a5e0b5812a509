"""The bundled bus guests end to end: bus-echo (versions, refusals, interrupts, windows, rescind) and bus-shutdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from pykvm.control.client import request

from .helpers import ROOT, pykvm

pytestmark = pytest.mark.kvm

CONNECTED = "bus: connected, version 1.0, 3 offers\n"


def echo(cmdline: str = ""):
    return pykvm("run", "bus-echo", "--bus", "--timeout", "60", *(["--cmdline", cmdline] if cmdline else []))


def status(code: int) -> int:
    """The exit status of a guest's exit_code(code)."""
    return (code << 1) | 1


class BusVM:
    """`pykvm run GUEST --bus --control SOCK --serial FILE` in the background."""

    def __init__(self, tmp_path, guest: str, cmdline: str = ""):
        self.sock = str(tmp_path / "vm.sock")
        self.serial = tmp_path / "serial.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pykvm", "run", guest, "--bus", "--control", self.sock, "--serial",
             str(self.serial), "--timeout", "60", "--no-dump", "--cmdline", cmdline],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serial.exists() and text in self.serial.read_text() and os.path.exists(self.sock):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the VM ended early: {self.proc.returncode} {self.proc.stderr.read()!r}")
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} on the guest's serial")

    def bus(self) -> dict:
        reply = request(self.sock, {"cmd": "stats"})
        assert reply["ok"], reply
        return reply["bus"]

    def channel(self, service: str) -> dict:
        (ch,) = [c for c in self.bus()["channels"] if c["service"] == service]
        return ch

    def finish(self, timeout: float = 30):
        _out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode(), self.serial.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def vm_factory(tmp_path):
    vms = []

    def make(guest, cmdline=""):
        vm = BusVM(tmp_path, guest, cmdline)
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.kill()


# ---------------------------------------------------------------- bus-echo
def test_echo_negotiates_1_1_with_a_new_guest():
    r = echo()
    assert r.stdout.decode() == (CONNECTED + "echo: open, version 1.1\n"
                                 "echo: 100 messages of 64 bytes ok\n"
                                 "echo: host counted 100\n"), r.stderr
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""


def test_echo_still_serves_an_old_guest_at_1_0():
    r = echo("versions=old n=20 size=200")
    assert r.stdout.decode() == (CONNECTED + "echo: open, version 1.0\n"
                                 "echo: 20 messages of 200 bytes ok\n"), r.stderr
    assert r.returncode == 0, r.stderr


def test_echo_refuses_an_incompatible_major_on_both_sides():
    r = echo("versions=major2")
    assert r.stdout.decode() == (CONNECTED +
                                 "echo: open refused: no common version; we speak 2.0, the service speaks 1.1, 1.0\n")
    assert r.returncode == status(4)
    assert r.stderr.decode() == ("pykvm: bus: refused: channel 1 (echo): the guest speaks 2.0, "
                                 "the service 1.1, 1.0: no common major version\n")


def test_bus_contact_at_an_unknown_version_is_refused():
    r = echo("bus=2")
    assert r.stdout.decode() == "bus: connect refused (-11); the host speaks 1.0\n"
    assert r.returncode == status(2)
    assert r.stderr.decode() == "pykvm: bus: refused: bus versions 2.0 proposed; this host speaks 1.0\n"


def test_echo_waiting_on_the_bus_interrupt():
    r = echo("irq=1 n=50 size=1000")
    assert r.stdout.decode() == (CONNECTED + "echo: open, version 1.1\n"
                                 "echo: 50 messages of 1000 bytes ok\n"
                                 "echo: host counted 50\n"), r.stderr
    assert r.returncode == 0, r.stderr


def test_echo_with_sixteen_messages_in_flight():
    # 16 packets of 832 bytes do not fit a 12 KiB ring: the guest waits for room, and the
    # host holds replies back until the guest drains them (pending_send_sz both ways)
    r = echo("window=16 n=80 size=800")
    assert r.stdout.decode() == (CONNECTED + "echo: open, version 1.1\n"
                                 "echo: 80 messages of 800 bytes ok\n"
                                 "echo: host counted 80\n"), r.stderr
    assert r.returncode == 0, r.stderr


def test_rescind_of_the_echo_channel_and_its_stats(vm_factory):
    vm = vm_factory("bus-echo", "n=30 rescind=1")
    vm.wait_for("echo: waiting for a rescind\n")
    bus = vm.bus()
    assert bus["state"] == "contact" and bus["version"] == "1.0"
    chans = {c["service"]: c for c in bus["channels"]}
    assert set(chans) == {"echo", "shutdown", "heartbeat"}
    e = chans["echo"]
    assert e["state"] == "open" and e["version"] == 0x10001
    assert (e["packets_in"], e["packets_out"]) == (31, 31)       # 30 echoes and one count
    assert e["session"] == {"echoed": 30}
    assert chans["shutdown"]["state"] == chans["heartbeat"]["state"] == "offered"
    assert chans["shutdown"]["packets_in"] == chans["heartbeat"]["packets_in"] == 0

    ctl = pykvm("ctl", vm.sock, "rescind", f"relid={e['relid']}")
    assert ctl.returncode == 0, ctl
    assert json.loads(ctl.stdout) == {"ok": True, "rescinded": e["relid"]}
    code, err, serial = vm.finish()
    assert serial == (CONNECTED + "echo: open, version 1.1\n"
                      "echo: 30 messages of 64 bytes ok\n"
                      "echo: host counted 30\n"
                      "echo: waiting for a rescind\n"
                      f"echo: channel {e['relid']} rescinded; send now fails: yes\n")
    assert code == 0, err


def test_rescind_of_an_unknown_channel_is_an_error(vm_factory):
    vm = vm_factory("bus-echo", "n=1 rescind=1")
    vm.wait_for("echo: waiting for a rescind\n")
    ctl = pykvm("ctl", vm.sock, "rescind", "relid=99")
    assert ctl.returncode == 1
    assert json.loads(ctl.stdout) == {"ok": False, "error": "ValueError: no channel 99 to rescind"}
    assert vm.channel("echo")["state"] == "open"


# ---------------------------------------------------------------- bus-shutdown
def test_shutdown_over_the_bus_after_heartbeats(vm_factory):
    vm = vm_factory("bus-shutdown", "every=10")
    vm.wait_for("shutdown: waiting for the host\n")
    deadline = time.monotonic() + 30
    while True:
        hb = vm.channel("heartbeat")
        if hb["session"]["beats"] >= 3:
            break
        assert time.monotonic() < deadline, hb
        time.sleep(0.02)
    # beats carry 1, 2, 3, ...: the last one seen is the count of beats, none lost or repeated
    assert hb["session"]["last_seq"] == hb["session"]["beats"]
    assert hb["state"] == "open" and hb["packets_in"] == hb["session"]["beats"] and hb["packets_out"] == 0
    sd = vm.channel("shutdown")
    assert sd["state"] == "open" and sd["session"] == {"requested": 0, "acknowledged": 0}

    ctl = pykvm("ctl", vm.sock, "shutdown")
    assert ctl.returncode == 0, ctl
    assert json.loads(ctl.stdout) == {"ok": True, "requested": True}
    code, err, serial = vm.finish()
    assert serial == (CONNECTED + "shutdown: open, version 1.0\n"
                      "heartbeat: open, version 1.0\n"
                      "shutdown: waiting for the host\n"
                      "shutdown: requested by the host\n")
    assert code == 0, err


def test_shutdown_needs_an_open_shutdown_channel(vm_factory):
    vm = vm_factory("bus-echo", "n=1 rescind=1")
    vm.wait_for("echo: waiting for a rescind\n")
    reply = request(vm.sock, {"cmd": "shutdown"})
    assert reply == {"ok": False, "error": "ValueError: the guest has no open shutdown channel"}
