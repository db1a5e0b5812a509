"""Crash triggers that need no crash guest: host-requested dumps, VMM errors, pvpanic events."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykvm.crash.reader import open_core
from pykvm.devices import Device

from .helpers import ROOT, pykvm
from .test_fault_reporting import flat

pytestmark = pytest.mark.kvm

COUNTER = 0x200000
# print "R\n", then count forever at physical COUNTER (identity-mapped at entry)
COUNTING = f"""
mov $0x3f8, %dx
mov $'R', %al
out %al, %dx
mov $'\\n', %al
out %al, %dx
movabs ${COUNTER:#x}, %rbx
1: incq (%rbx)
jmp 1b
"""


def counter_in(core: Path) -> int:
    return struct.unpack("<Q", open_core(core).read_physical(COUNTER, 8))[0]


def test_host_requested_dump_keeps_the_guest_running(tmp_path):
    image = flat(tmp_path, COUNTING, 64)
    cores = tmp_path / "cores"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", image, "--load-addr", "0x100000",
                             "--timeout", "3", "--crash-dir", str(cores)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"R\n"   # the guest is running
        time.sleep(0.3)
        r = pykvm("dump", str(proc.pid))
        assert r.returncode == 0, r.stderr
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 18, err                       # it went on until the timeout
    assert "host-requested core: " in err
    dumped = sorted(cores.glob("*.core"), key=lambda p: p.stat().st_mtime)
    assert len(dumped) == 2
    first, last = (open_core(p).info for p in dumped)
    assert first["trigger"] == "host-request" and last["trigger"] == "timeout"
    assert 0 < counter_in(dumped[0]) < counter_in(dumped[1])


class Exploding(Device):
    """A device model with a bug: any write raises."""

    name = "exploding"
    ports = [(0x700, 1)]

    def io_write(self, offset, size, value):
        raise RuntimeError("model bug")


def test_device_model_bug_dumps_the_guest_then_reports(tmp_path):
    from pykvm.machine import Machine, MachineConfig

    image = flat(tmp_path, "mov $0xabcdef, %r12\nmov $0x700, %dx\nout %al, %dx\nhlt", 64)
    cfg = MachineConfig(kernel=Path(image), flat_addr=0x100000, timeout=20, crash_dir=tmp_path / "cores")
    with Machine(cfg) as m:
        m.devices.add(Exploding())
        outcome = m.run()
    assert outcome.status == 20 and outcome.kind == "vmm-error"
    assert "RuntimeError: model bug" in outcome.reason
    core = open_core(outcome.core_path)
    assert core.info["trigger"] == "vmm-error"
    assert core.vcpus[0]["regs"]["r12"] == 0xABCDEF


def test_pvpanic_crash_loaded_only_records(tmp_path):
    image = flat(tmp_path, "mov $0x505, %dx\nmov $2, %al\nout %al, %dx\nmov $0xf4, %dx\nmov $3, %al\nout %al, %dx",
                 64)
    r = pykvm("run", image, "--load-addr", "0x100000", "--timeout", "20", "--crash-dir", str(tmp_path / "c"))
    assert r.returncode == 7, r.stderr
    assert b"crash loaded" in r.stderr
    assert not (tmp_path / "c").exists() or not os.listdir(tmp_path / "c")   # no core (the sandbox makes the dir at start)


def test_pvpanic_panicked_stops_with_a_core(tmp_path):
    image = flat(tmp_path, "mov $0x505, %dx\nmov $1, %al\nout %al, %dx\nhlt", 64)
    r = pykvm("run", image, "--load-addr", "0x100000", "--timeout", "20", "--crash-dir", str(tmp_path / "c"))
    assert r.returncode == 16, r.stderr
    (core,) = (tmp_path / "c").glob("*.core")
    rep = json.loads(pykvm("inspect", str(core), "--json").stdout)
    assert rep["trigger"] == "pvpanic"


def test_unwritable_crash_dir_still_reports_the_crash(tmp_path):
    """The CLI refuses such a directory at start (status 28); one that breaks during the run still gets the crash reported."""
    from pykvm.machine import Machine, MachineConfig

    image = flat(tmp_path, "ud2", 64)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = pykvm("run", image, "--load-addr", "0x100000", "--timeout", "20", "--crash-dir", str(blocker / "sub"))
    assert r.returncode == 28 and b"--crash-dir" in r.stderr, r.stderr
    cfg = MachineConfig(kernel=Path(image), flat_addr=0x100000, timeout=20, crash_dir=blocker / "sub")
    with Machine(cfg) as m:
        outcome = m.run()
    assert outcome.status == 16 and "#UD invalid opcode" in outcome.reason
    assert outcome.core_path is None and "cannot create crash directory" in outcome.core_error
