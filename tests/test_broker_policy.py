"""A compromised partition VMM against the broker (issue 19 finding 3): its policy holds where it cannot reach.

The broker runs in this process; the partitions it starts are real `pykvm run` VMMs, except
the one under attack, which tests/partition_attacker.py replaces: it gets exactly what a
compromised VMM of that partition has (its environment and its link) and speaks the
broker protocol directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from pykvm import abi
from pykvm.bus import wire
from pykvm.bus.services.proxy import FLOOD_STREAK
from pykvm.partitions import topology
from pykvm.partitions.broker import Broker

from .helpers import ROOT

ATTACKER = str(ROOT / "tests" / "partition_attacker.py")


def run_broker(tmp_path, monkeypatch, text: str, replace: dict[str, dict], timeout: float = 300.0):
    """Run a topology's broker to the end, starting the partitions in `replace` as the attacker script
    (with the extra environment given); (broker, statuses, broker log lines)."""
    monkeypatch.chdir(ROOT)
    path = tmp_path / "topo.toml"
    path.write_text(text)
    real = subprocess.Popen

    def popen(argv, *args, env=None, **kw):
        who = (env or {}).get("PYKVM_PARTITION", "").partition("@")[0]
        if who in replace:
            argv = [sys.executable, ATTACKER]
            env = dict(env, **replace[who])
        return real(argv, *args, env=env, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)
    logs: list[str] = []
    broker = Broker(topology.load(path), tmp_path / "run", log=logs.append)
    watchdog = threading.Timer(timeout, broker.kill_stragglers)
    watchdog.start()
    try:
        broker.start()
        statuses = broker.run()
    finally:
        watchdog.cancel()
        broker.close()
    return broker, statuses, logs


TWO = """
[[partition]]
name = "a"
kernel = "bus-echo"

[[partition]]
name = "b"
kernel = "bus-echo"
"""


def test_no_process_can_take_a_partition_name(tmp_path, monkeypatch):
    """Not on its own link (made for another name), not through any socket of the run directory."""
    run = tmp_path / "run"
    a_out, b_out = tmp_path / "a.json", tmp_path / "b.json"
    broker, statuses, logs = run_broker(tmp_path, monkeypatch, TWO, {
        "a": {"ATTACK_MODE": "impersonate", "ATTACK_AS": "b", "ATTACK_RUNDIR": str(run), "ATTACK_OUT": str(a_out)},
        "b": {"ATTACK_MODE": "hello", "ATTACK_AFTER": str(a_out), "ATTACK_OUT": str(b_out)}}, timeout=60)
    a, b = json.loads(a_out.read_text()), json.loads(b_out.read_text())
    assert a == {"own_link_welcome": False, "sockets_welcomed": []}
    assert b == {"welcome": True}                   # the real b still gets its name
    assert "a: link dropped: hello as 'b' on the link made for a" in logs
    assert statuses == {"a": 0, "b": 0}


def _pattern(seed, s):
    """Sector s of bus-block's write pattern for seed (seed 0: the service's initial disk)."""
    return bytes((seed * 73 + s * 151 + i * 7 + (i >> 8)) & 0xff for i in range(512))


ATTACKED = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
provides = "disk0"
disk = "{store}"
cmdline = "store=disk"

[[partition]]
name = "client1"
kernel = "bus-block"
cmdline = "wsec=100 wcount=40 seed=3"
uses = ["disk0"]

[[partition]]
name = "client2"
kernel = "bus-block"
trust = "untrusted"
uses = ["disk0"]

[policy.partition.client2]
versions = ["1.0"]
"""


@pytest.mark.kvm
def test_compromised_untrusted_client_gets_its_guests_refusals_and_the_trusted_one_its_data(tmp_path, monkeypatch):
    store = tmp_path / "store.img"
    store.write_bytes(b"".join(_pattern(0, s) for s in range(2048)))
    run = tmp_path / "run"
    out = tmp_path / "client2.json"
    broker, statuses, logs = run_broker(tmp_path, monkeypatch, ATTACKED.format(store=store), {
        "client2": {"ATTACK_OUT": str(out), "ATTACK_WAIT_FOR": f"{run / 'client1.serial'}|block: "}})
    got = json.loads(out.read_text())
    assert got["welcome"]["name"] == "client2" and got["welcome"]["trust"] == "untrusted"
    # exactly what its guest hears from an honest VMM's policy agent
    assert got["write"] == {"status": abi.PYKVM_BUS_E_READ_ONLY, "flags": abi.PYKVM_BLK_FLAG_READ_ONLY, "data": ""}
    assert got["read"]["status"] == abi.PYKVM_BUS_OK and bytes.fromhex(got["read"]["data"]) == _pattern(0, 5)
    assert got["big"]["status"] == abi.PYKVM_BUS_E_LIMIT
    assert got["version"]["status"] == abi.PYKVM_BUS_E_VERSION
    assert got["remap"] == {"status": abi.PYKVM_BUS_E_IO, "index": wire.DECLINED}    # its guest's copy path
    assert got["remap_memfd_untouched"] and broker.counts["remapped"] == 0
    # the flood: at most its 16 outstanding were taken, then refusals, then its link is cut as flooding
    flood = got["flood"]
    assert flood["limit"] == FLOOD_STREAK - 1 and flood["ok"] <= 16 and flood["other"] == 0 and flood["eof"], flood
    assert any("client2: link dropped: flooding: 64 requests in a row over its policy's limits on disk0" in m
               for m in logs), logs
    # the service was never declared silent, and the trusted client read back all it wrote
    assert statuses["storage"] == 0 and statuses["client1"] == 0, (statuses, logs)
    assert broker.counts["timeouts"] == 0 and broker.counts["rescinds"] == 0 and broker.counts["restarts"] == 0
    c1 = (run / "client1.serial").read_text()
    assert "block: read back 40 sectors at 100: pattern ok\n" in c1 and c1.endswith("block: done\n"), c1
    assert "rescinded" not in c1 and "error" not in c1.lower(), c1
    disk = store.read_bytes()
    for s in range(2048):
        want = _pattern(3, s) if 100 <= s < 140 else _pattern(0, s)
        assert disk[s * 512:(s + 1) * 512] == want, f"sector {s}"
    # the decisions, where the user reads them
    pol = json.loads((run / "broker-policy.json").read_text())["policy"]
    assert pol["client1"]["refusals"] == 0 and pol["client1"]["allowed"]["may_request"] >= 1
    refused = pol["client2"]["refused"]
    assert refused["may_write"] == 1 and refused["may_open"] == 1 and refused["may_remap"] == 1
    assert refused["may_request"] == 1 + FLOOD_STREAK
    assert "client2 may not write to disk0" in pol["client2"]["last_refusals"]
