"""vNUMA across save/restore and in crash cores: topology, hot-added regions and ballooned pages survive.

The numa-mem guest grows node 1 (hot-add) and gives node 0 back (balloon), disconnects its
bus (saving a connected bus is not supported) and waits ("parked"). The host writes a core
of it, saves it, and restores it; the restored guest verifies every page's checksum.
"""

import json
import subprocess
import sys
import time

import pytest
from elftools.elf.elffile import ELFFile

from pykvm.snapshot.state import load_state

from .helpers import ROOT, guest, pykvm
from .test_crash_support import gdb_or_skip

pytestmark = pytest.mark.kvm
M = 1 << 20


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("numa-state")
    serial, sock, state, crashes = tmp / "serial.txt", tmp / "ctl.sock", tmp / "vm.state", tmp / "crashes"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "numa-mem",
                             "--numa-node", "mem=16M,cpus=0", "--numa-node", "mem=16M,cpus=1,hotadd=16M",
                             "-a", "grow=20 settle=20 park=800", "--serial", str(serial), "--control", str(sock),
                             "--crash-dir", str(crashes), "--timeout", "300"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 200
    while b"parked" not in (serial.read_bytes() if serial.exists() else b""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    dump = pykvm("ctl", str(sock), "dump", timeout=60)
    numa = pykvm("ctl", str(sock), "numa", "json=true", timeout=60)
    save = pykvm("ctl", str(sock), "save", f"path={state}", "stop=true", timeout=60)
    out, err = proc.communicate(timeout=60)
    assert save.returncode == 0, save.stdout + save.stderr + err
    return {"state": state, "core": json.loads(dump.stdout)["core"], "numa": json.loads(numa.stdout),
            "run_rc": proc.returncode, "tmp": tmp}


def test_state_carries_topology_and_balloon_state(saved):
    s = load_state(saved["state"])
    try:
        h = s.header
        nodes = h["config"]["numa"]["nodes"]
        assert [n["mem"] for n in nodes] == [16 * M, 16 * M] and [n["cpus"] for n in nodes] == [[0], [1]]
        st = h["numa"]["nodes"]
        assert st[1]["hot"] and st[1]["hot"][0][0] == 0x140000000
        ballooned = sum(c for _p, c in st[0]["ballooned"])
        assert ballooned * 4096 == saved["numa"]["nodes"][0]["ballooned"] > 0
        assert 0x140000000 in [r["gpa"] for r in h["memory"]["regions"]]
    finally:
        s.close()


def test_restored_guest_verifies_every_page(saved, tmp_path):
    r = pykvm("restore", str(saved["state"]), "--trust", "trusted", "--timeout", "200", timeout=260)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "numa-mem: checksums ok:" in out


def test_restore_refuses_tampered_balloon_state(saved, tmp_path):
    """A ballooned range outside its node in the state file: exit 26 with a reason, not a crash."""
    from pykvm.snapshot import state as st

    s = load_state(saved["state"])
    try:
        header = json.loads(json.dumps(s.header))
        header["numa"]["nodes"][0]["ballooned"] = [[0x140000, 1]]          # node 1's hot-added page
        payload = s.section(0, s.payload_len) if hasattr(s, "payload_len") else None
    finally:
        s.close()
    if payload is None:
        pytest.skip("state payload not readable here")
    bad = tmp_path / "bad.state"
    st.write_file(bad, header, [payload])
    r = pykvm("restore", str(bad), "--trust", "trusted", "--timeout", "30", timeout=60)
    assert r.returncode == 26, r.stderr
    assert b"vNUMA" in r.stderr and b"not inside node 0" in r.stderr


def test_core_load_segments_follow_the_nodes(saved):
    with open(saved["core"], "rb") as f:
        elf = ELFFile(f)
        loads = [(s["p_paddr"], s["p_memsz"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert (0, 16 * M) in loads
    assert (16 * M, 16 * M) in loads
    assert any(p == 0x140000000 for p, _n in loads)                        # node 1's hot-added region


def test_gdb_opens_the_core(saved):
    gdb = gdb_or_skip()
    elf = guest("numa-mem")
    r = subprocess.run([gdb, "-nx", "-batch", "-ex", "p/x $rip", "-ex", "p nr_nodes", str(elf), saved["core"]],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "$1 = 0x" in r.stdout and "$2 = 2" in r.stdout
