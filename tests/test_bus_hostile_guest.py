"""A hostile guest against the real bus (guests/bus-hostile): 10^5 operations, then clean echo still works.

The guest scribbles its ring headers, publishes lying descriptors and range lists, changes
packets after publishing them, sends bad management messages and floods doorbells; the
host closes its channel or refuses the message each time, it reopens or reconnects, and
at the end a clean channel must echo. The VM runs in this process so the host's open file
descriptors and threads can be watched while it does. Also: a crash with a channel open
leaves the bus state (channel, ring indices, GPADLs) in the core and in `pykvm inspect`.
"""

from __future__ import annotations

import os
import threading

import pytest

from pykvm import abi
from pykvm.crash.reader import CoreFile
from tests.helpers import guest, pykvm

OPS_TOTAL = 100_000
SEEDS = (11, 22, 33, 44)
GUEST_OK = (0x2a << 1) | 1          # exit_code(0x2a)
STATUS_CRASH = 16


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _run_in_process(tmp_path, cmdline):
    """Run bus-hostile in a Machine here; (outcome, serial text, bus snapshot, peak fd and thread growth)."""
    from pykvm.machine import Machine, MachineConfig

    serial = tmp_path / f"serial-{abs(hash(cmdline))}.out"
    out_fd = os.open(serial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    machine = Machine(MachineConfig(kernel=guest("bus-hostile"), cmdline=cmdline, bus=True, serial_out=out_fd,
                                    timeout=900, crash_dir=tmp_path / "crashes"))
    fds, threads = _fds(), threading.active_count()
    peak = {"fds": 0, "threads": 0}
    stop = threading.Event()

    def watch():
        while not stop.wait(0.05):
            peak["fds"] = max(peak["fds"], _fds() - fds)
            peak["threads"] = max(peak["threads"], threading.active_count() - threads)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        outcome = machine.run()
        bus = machine.bus.snapshot() if machine.bus is not None else machine.bus_final
    finally:
        stop.set()
        watcher.join()
        machine.close()
        os.close(out_fd)
    return outcome, serial.read_text(), bus, peak


@pytest.mark.kvm
def test_a_hostile_guest_gets_refusals_and_the_bus_keeps_serving(tmp_path, capfd):
    # what a short run costs the host (the machine's own threads and fds, one channel's eventfds)
    outcome, _serial, _bus, usual = _run_in_process(tmp_path, "seed=1 ops=300")
    assert outcome.status == GUEST_OK and usual["threads"] >= 1
    per_seed = OPS_TOTAL // len(SEEDS)
    done = 0
    for seed in SEEDS:
        outcome, serial, bus, peak = _run_in_process(tmp_path, f"seed={seed} ops={per_seed}")
        err = capfd.readouterr().err
        assert outcome.status == GUEST_OK, (outcome.reason, serial, err[-2000:])
        lines = serial.splitlines()
        assert lines[0] == f"hostile: seed={seed} ops={per_seed}" and lines[-1] == "hostile: clean echo ok", serial
        assert "internal error" not in err.lower() and "Traceback" not in err
        # what it did was refused, counted and said; the doorbell thread never lost a channel to an exception
        assert bus["refusals"] > 100 and bus["violations"] > 10, bus
        assert "channel 1 (echo)" in err and "; channel closed" in err
        assert bus["doorbells"]["failures"] == []
        echo = next(c for c in bus["channels"] if c["service"] == "echo")
        assert echo["opens"] > 100
        # thousands of opens, closes, GPADLs and reconnects later the host holds what a short run held
        assert peak["fds"] <= usual["fds"] + 2 and peak["threads"] <= usual["threads"], (peak, usual)
        assert len(bus["gpadls"]) <= 64
        done += per_seed
    assert done >= OPS_TOTAL


@pytest.mark.kvm
def test_a_crash_with_a_channel_open_keeps_the_bus_state_in_the_core(tmp_path):
    crashes = tmp_path / "crashes"
    r = pykvm("run", "bus-hostile", "--bus", "--cmdline", "seed=5 crash=1", "--crash-dir", str(crashes), timeout=120)
    assert r.returncode == STATUS_CRASH, r.stderr.decode()
    [core] = list(crashes.iterdir())
    with CoreFile(core) as c:
        bus = c.info["bus"]
    assert bus["state"] == "contact" and bus["violations"] == 0
    [echo] = [ch for ch in bus["channels"] if ch["service"] == "echo"]
    # three echoes of 11, 14 and 17 bytes: packets of 48, 48 and 56 bytes (descriptor, padded payload, trailer)
    assert echo["state"] == "open" and echo["packets_in"] == 3 and echo["packets_out"] == 3
    assert echo["guest_to_host"] == {"write_index": 152, "read_index": 152, "interrupt_mask": 0,
                                     "data_size": 3 * 4096}
    assert echo["host_to_guest"] == {"write_index": 152, "read_index": 152, "interrupt_mask": 1,
                                     "data_size": 3 * 4096}
    [gpadl] = [g for g in bus["gpadls"] if g["id"] == echo["gpadl"]]
    assert gpadl["pages"] == 8
    text = pykvm("inspect", str(core)).stdout.decode()
    assert "partition bus:" in text and "state contact, version 1.0, 0 violations" in text
    assert (f"channel 1 echo: open v1.1 gpadl {echo['gpadl']} in 3 out 3 "
            "guest_to_host w=152 r=152 host_to_guest w=152 r=152") in text
    assert f"gpadl {echo['gpadl']}: 8 pages" in text
