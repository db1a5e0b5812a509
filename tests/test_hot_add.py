"""Hot-add through the control socket adds a device whole or refuses it whole (issue 9)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pykvm import abi
from pykvm.devices import DeviceManager
from pykvm.devices.device import Device
from pykvm.errors import DeviceConfigError
from pykvm.control.client import request

from .helpers import MAILBOX_ARGS, ROOT, pykvm


class FailsToStart(Device):
    name = "fails"
    ports = [(0x700, 4)]
    mmio = [(0xD0000000, 0x1000)]

    def prepare_hardware(self):
        raise RuntimeError("no hardware today")


def test_a_device_that_fails_to_start_leaves_no_trace():
    dm = DeviceManager()
    dm.start_all()
    with pytest.raises(DeviceConfigError):
        dm.add(FailsToStart())
    assert dm.devices == [] and dm.port_map == {} and dm.mmio_lookup(0xD0000000) is None
    assert 0x700 not in dm.live_port_writes


def test_reserved_ranges_and_duplicate_names_are_refused():
    dm = DeviceManager()
    dm.reserve(0, 128 << 20, "guest RAM (ram0)")

    class Mmio(Device):
        name = "m"

        def __init__(self, base, name="m"):
            super().__init__()
            self.mmio = [(base, 0x1000)]
            self.name = name

    with pytest.raises(DeviceConfigError, match="overlaps guest RAM"):
        dm.add(Mmio(0x1000))
    with pytest.raises(DeviceConfigError, match="outside the guest-physical address space"):
        dm.add(Mmio(1 << 64))
    dm.add(Mmio(0xD0000000))
    with pytest.raises(DeviceConfigError, match="already exists"):
        dm.add(Mmio(0xD0001000))
    assert [d.name for d in dm.devices] == ["m"]


@pytest.fixture
def running(tmp_path):
    """`pykvm run mailbox --control SOCK` (the mailbox guest idles without a command line)."""
    sock = str(tmp_path / "vm.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "mailbox", *MAILBOX_ARGS, "--cmdline", "work", "--control", sock,
                             "--timeout", "60", "--no-dump"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            if all(d["state"] == "D0" for d in request(sock, {"cmd": "devices"}, timeout=5)["devices"]):
                break
        except OSError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "VM did not come up"
        time.sleep(0.1)
    yield sock
    proc.kill()
    proc.wait()


def names(sock):
    return [d["name"] for d in request(sock, {"cmd": "devices"})["devices"]]


@pytest.mark.kvm
def test_readme_hot_add_works_and_bad_ones_are_refused_whole(running):
    sock = running
    r = pykvm("ctl", sock, "hot-add", "type=mailbox", "base=0x5d0", "name=mb2")    # as README shows
    assert r.returncode == 0, r.stdout
    before = names(sock)
    assert before[-1] == "mb2"
    bad = [{"type": "mailbox", "base": 0x6d0, "name": ["x"]},
           {"type": "mailbox", "base": 1 << 64, "name": "mb3"},
           {"type": "mailbox", "base": 0x5d0, "name": "mb4"},                 # overlaps mb2
           {"type": "mailbox", "base": 0x7d0, "name": "mb2"},                 # name taken
           {"type": "identity", "base": 0x1000, "name": "id2"},               # inside RAM
           {"type": "identity", "base": abi.PYKVM_LAPIC_BASE, "name": "id3"},  # the LAPIC page
           {"type": "serial", "name": "s2"},                                  # not hot-pluggable
           {"type": ["mailbox"]}]
    for req in bad:
        reply = request(sock, {"cmd": "hot-add", **req})
        assert reply["ok"] is False and reply["error"], (req, reply)
        assert names(sock) == before, req
    assert request(sock, {"cmd": "stats"})["ok"]      # the VM and its channel still work
