"""vNUMA end to end: node 1 fills while node 0 idles; the balancer grows 1 and reclaims from 0.

One run of the numa-mem guest (module fixture) is inspected by several tests: its exit
status and checksums, the memory log's decisions and host-memory numbers, and what
`pykvm ctl SOCK numa` printed while it ran.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from .helpers import ROOT, pykvm

pytestmark = pytest.mark.kvm
M = 1 << 20
NODES = ["--numa-node", "mem=32M,cpus=0", "--numa-node", "mem=32M,cpus=1"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("numa")
    log, sock = tmp / "memory.jsonl", tmp / "ctl.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "numa-mem", *NODES, "-a", "grow=48",
                             "--memory-log", str(log), "--control", str(sock), "--timeout", "300"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    table = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if sock.exists() and log.exists() and b'"hotadd"' in log.read_bytes():
            r = pykvm("ctl", str(sock), "numa", timeout=30)
            if r.returncode == 0:
                table = r.stdout.decode()
                break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=300)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    return proc.returncode, out.decode(), err.decode(), events, table


def test_guest_finishes_with_its_checksums_holding(scenario):
    rc, out, err, _events, _table = scenario
    assert rc == 0, out + err
    assert "numa-mem: checksums ok:" in out
    assert "node 1: total 8192 pages" not in out           # node 1 grew past its boot size


def test_balancer_reclaimed_node0_and_grew_node1(scenario):
    _rc, _out, _err, events, _table = scenario
    decisions = [(e["event"], e["node"]) for e in events if e["event"] in ("balloon", "hotadd", "unballoon")]
    assert ("balloon", 0) in decisions
    assert ("hotadd", 1) in decisions
    assert ("balloon", 1) not in decisions                  # the busy node is never shrunk
    acks = [e for e in events if e["event"] == "hotadd-ack"]
    assert acks and all(e["status"] == 0 and e["node"] == 1 for e in acks)
    assert not [e for e in events if e["event"] in ("reject", "timeout")]


def test_host_memory_fell_by_at_least_90_percent_of_what_was_ballooned(scenario):
    _rc, _out, _err, events, _table = scenario
    released = [e for e in events if e["event"] == "released"]
    pages = sum(e["pages"] for e in released)
    freed = sum(e["host_bytes_freed"] for e in released)
    assert pages * 4096 >= 16 * M
    assert freed >= 0.9 * pages * 4096, (freed, pages)


def test_vm_never_exceeds_its_maximum_and_nodes_stay_above_minimum(scenario):
    _rc, _out, _err, events, _table = scenario
    size = {0: 32 * M, 1: 32 * M}
    for e in events:
        if e.get("node") in size and "size" in e:
            size[e["node"]] = e["size"]
            assert sum(size.values()) <= 128 * M
            assert size[e["node"]] >= 8 * M


def test_ctl_numa_prints_the_node_table(scenario):
    _rc, _out, _err, _events, table = scenario
    assert table is not None
    lines = table.splitlines()
    assert lines[0].split()[:8] == ["node", "size", "committed", "free", "pressure", "ballooned", "hot-added", "host"]
    assert [ln.split()[0] for ln in lines[1:]] == ["0", "1"]


def test_acpi_guest_sees_the_nodes_from_the_command_line():
    r = pykvm("run", "acpi", "--numa-node", "mem=64M,cpus=0,hotadd=128M", "--numa-node", "mem=64M,cpus=1",
              "--numa-distance", "0-1=31", "--timeout", "60")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "srat: cpu apic 1 node 1" in out
    assert "srat: mem 0x0+0x4000000 node 0 enabled\n" in out
    assert "srat: mem 0x4000000+0x4000000 node 1 enabled\n" in out
    assert "srat: mem 0x100000000+0x8000000 node 0 enabled hotplug" in out
    assert "slit: 10 31\nslit: 31 10\n" in out


def test_without_a_numa_block_the_guest_says_so():
    r = pykvm("run", "numa-mem", "--timeout", "60")
    assert r.returncode == (2 << 1) | 1
    assert b"no NUMA block" in r.stdout


def test_memory_log_needs_a_writable_path(tmp_path):
    r = pykvm("run", "numa-mem", *NODES, "--memory-log", str(tmp_path / "no" / "such" / "dir"), "--timeout", "30")
    assert r.returncode == 2 and b"--memory-log" in r.stderr
    assert not os.path.exists(tmp_path / "no")
