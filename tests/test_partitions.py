"""Several partitions (issue 12): topology validation, policy agents, the broker wire, and `pykvm up` end to end."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import errors
from pykvm.bus import wire
from pykvm.bus.policy import UNTRUSTED, Ledger, Rules, TopologyPolicy
from pykvm.partitions import topology

from .helpers import pykvm, pykvm_up

GOOD = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
memory = "16M"
provides = "disk0"
restarts = 2

[[partition]]
name = "client1"
kernel = "bus-block"
cmdline = "wsec=100 wcount=40 seed=3 reopen_ms=60000"
uses = ["disk0"]

[[partition]]
name = "client2"
kernel = "bus-block"
cmdline = "wsec=300 wcount=8 seed=5 reopen_ms=60000"
trust = "untrusted"
uses = ["disk0"]
"""


def load_text(tmp_path, text):
    p = tmp_path / "t.toml"
    p.write_text(text)
    return topology.load(p)


def test_topology_good(tmp_path):
    t = load_text(tmp_path, GOOD + "\n[policy.partition.client2]\nmax_request_sectors = 8\n")
    assert [p.name for p in t.partitions] == ["storage", "client1", "client2"]
    assert t.provider_of("disk0").name == "storage"
    c2 = t.by_name("client2")
    assert c2.rules.write is False and c2.rules.max_request_sectors == 8 and c2.rules.requests_per_second == 200
    assert t.by_name("client1").rules == Rules()


@pytest.mark.parametrize("extra, needle", [
    ("[[partition]]\nname = 'x'\nkernel = 'k'\nuses = ['nope']\n", "no partition provides nope"),
    ("[[partition]]\nname = 'client1'\nkernel = 'k'\n", "used twice"),
    ("[[partition]]\nname = 'Bad Name'\nkernel = 'k'\n", "partition[3].name"),
    ("[[partition]]\nname = 'x'\nkernel = 'k'\ncpus = 0\n", "x.cpus"),
    ("[[partition]]\nname = 'x'\nkernel = 'k'\nmemory = 'lots'\n", "x.memory"),
    ("[[partition]]\nname = 'x'\nkernel = 'k'\ntrust = 'maybe'\n", "x.trust"),
    ("[[partition]]\nname = 'x'\nkernel = 'k'\ncolour = 1\n", "colour: unknown key"),
    ("[[partition]]\nname = 'x'\nkernel = 'k'\nprovides = 'disk0'\n", "provided twice"),
    ("[policy.untrusted]\nwrite = 1\n", "policy.untrusted.write"),
    ("[policy.trusted]\nburst = 0\n", "policy.trusted.burst"),
    ("[policy.partition.ghost]\nwrite = false\n", "policy.partition.ghost"),
    ("[extra]\n", "unknown top-level key"),
    ("[policy.untrusted]\nversions = '1.0'\n", "policy.untrusted.versions: expected a list"),
    ("[policy.trusted]\nversions = ['1']\n", "got '1'"),
    ("[policy.trusted]\nversions = ['0.1']\n", "major 1..65535"),
    ("[policy.trusted]\nversions = ['1.0', '1.0']\n", "listed twice"),
    ("[policy.trusted]\nmax_outstanding = 0\n", "policy.trusted.max_outstanding"),
    ("[[partition]]\nname = 'x'\nkernel = 'k'\nrequest_timeout = 0\n", "x.request_timeout"),
    ("[[partition]]\nname = 'x'\nkernel = 'k'\nrequest_timeout = 'soon'\n", "x.request_timeout"),
])
def test_topology_refusals(tmp_path, extra, needle):
    with pytest.raises(errors.TopologyError) as e:
        load_text(tmp_path, GOOD + extra)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_topology_disk_is_checked_and_made_absolute(tmp_path, monkeypatch):
    img = tmp_path / "store.img"
    img.write_bytes(bytes(4096))
    monkeypatch.chdir(tmp_path)
    t = load_text(tmp_path, GOOD.replace('memory = "16M"', 'memory = "16M"\ndisk = "store.img"'))
    assert t.by_name("storage").disk == str(img) and t.by_name("client1").disk is None
    (tmp_path / "small.img").write_bytes(bytes(511))
    (tmp_path / "dir.img").mkdir()
    for value, needle in [('"missing.img"', "No such file"), ('"small.img"', "at least 512 bytes"),
                          ('"dir.img"', "not a regular file"), ('"a,ro"', "without commas"), ('""', "without commas"),
                          ("7", "expected a string")]:
        with pytest.raises(errors.TopologyError) as e:
            load_text(tmp_path, GOOD.replace('memory = "16M"', f'memory = "16M"\ndisk = {value}'))
        assert needle in str(e.value) and "storage.disk" in str(e.value) and "\n" not in str(e.value)
    two = GOOD.replace('memory = "16M"', 'memory = "16M"\ndisk = "store.img"').replace(
        'seed=3 reopen_ms=60000"', f'seed=3 reopen_ms=60000"\ndisk = "{img}"')
    with pytest.raises(errors.TopologyError, match="client1.disk: .* is also the disk of storage"):
        load_text(tmp_path, two)


def test_topology_not_toml_has_its_own_status(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[[partition]\n")
    r = pykvm("up", str(p), "--dir", str(tmp_path / "run"))
    assert r.returncode == errors.EXIT_BAD_TOPOLOGY == 34
    err = r.stderr.decode()
    assert "not TOML" in err and len(err.strip().splitlines()) == 1


def test_policy_agent_counts_and_refuses():
    now = [0.0]
    agent = TopologyPolicy({"u": UNTRUSTED, "t": Rules()}, {"u": ("disk0",), "t": ("disk0",)}, clock=lambda: now[0])
    logged = []
    u = Ledger(agent, "u", log=logged.append)
    assert u.check("may_offer", "disk0") is None
    assert "does not use" in u.check("may_offer", "disk1")
    assert "may not write" in u.check("may_write", "disk0")
    assert "over its 16-sector limit" in u.check("may_request", "disk0", "read", 17)
    # the bucket holds `burst` requests; the next one at the same instant is over the rate
    for _ in range(UNTRUSTED.burst):
        assert u.check("may_request", "disk0", "read", 1) is None
    assert "requests/s" in u.check("may_request", "disk0", "read", 1)
    now[0] += 1.0 / UNTRUSTED.requests_per_second
    assert u.check("may_request", "disk0", "read", 1) is None
    snap = u.snapshot()
    assert snap["refused"] == {"may_offer": 1, "may_write": 1, "may_request": 2}
    assert snap["allowed"]["may_request"] == UNTRUSTED.burst + 1 and snap["refusals"] == 4 == len(logged)
    assert u.bus_limits().max_gpadls == UNTRUSTED.max_gpadls
    t = Ledger(agent, "t", log=logged.append)
    assert t.check("may_write", "disk0") is None and t.check("may_request", "disk0", "write", 256) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(wire.KINDS)), st.binary(max_size=300)), max_size=8),
       st.integers(1, 64))
def test_wire_frames_round_trip_in_any_split(frames, step):
    stream = b"".join(wire.frame(k, b) for k, b in frames)
    p = wire.FrameParser()
    got = []
    for i in range(0, len(stream), step):
        got += p.feed(stream[i:i + step])
    assert got == frames and p.pending == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_wire_garbage_only_raises_wire_error(data):
    p = wire.FrameParser()
    try:
        for kind, body in p.feed(data):
            if kind in wire.JSON_KINDS:
                wire.parse_json(body)
            else:
                wire.parse_data(body)
    except wire.WireError:
        pass


def test_wire_refuses_oversized_and_unknown():
    with pytest.raises(wire.WireError, match="at most"):
        wire.FrameParser().feed(wire.HEADER.pack(wire.MAX_BODY + 1, wire.REQUEST))
    with pytest.raises(wire.WireError, match="unknown frame kind"):
        wire.FrameParser().feed(wire.HEADER.pack(0, 99))
    tag, index, blk, data = wire.parse_data(wire.data_frame(wire.REQUEST, 7, 1, (2, 0, 9, 1, 0), b"x" * 512)[8:])
    assert (tag, index, blk, data) == (7, 1, (2, 0, 9, 1, 0), b"x" * 512)


def test_wire_deeply_nested_json_is_a_wire_error():
    # json.loads raises RecursionError (not ValueError) on deep nesting well inside MAX_JSON
    for body in (b"[" * 60000, b'{"a":' * 10000):
        with pytest.raises(wire.WireError, match="not JSON"):
            wire.parse_json(body)


def _pattern(seed, s):
    """Sector s of bus-block's write pattern for seed (seed 0: the service's initial disk)."""
    return bytes((seed * 73 + s * 151 + i * 7 + (i >> 8)) & 0xff for i in range(512))


@pytest.mark.kvm
def test_up_service_partition_crashes_mid_run_clients_reopen_and_no_completed_write_is_lost(tmp_path):
    """A file-backed service partition, a trusted and an untrusted client; the service crashes after 2 writes."""
    store = tmp_path / "store.img"
    store.write_bytes(b"".join(_pattern(0, s) for s in range(2048)))
    run, out, err, logs = pykvm_up(tmp_path, GOOD.replace('memory = "16M"', f'memory = "16M"\ndisk = "{store}"\n'
                                                          'cmdline = "store=disk crash_after_writes=2"'))
    serials = {f.name: f.read_text() for f in run.glob("*.serial")}
    assert f"partition storage: serial {run}/storage.serial, control {run}/storage.sock" in out
    assert "partition client1: status 0" in out and "partition client2: status 0" in out
    assert "partition storage: status 0 (restarts 1)" in out
    # the service partition crashed alone after completing two writes: its own core, then generation 1
    assert serials["storage.serial"].endswith("blocksvc: served 2 writes, crashing\n")
    assert list((run / "storage-crashes").glob("*.core")), list((run / "storage-crashes").iterdir())
    assert "serving 2048 sectors of the host's disk, generation 1, versions 1.0\n" in serials["storage.gen1.serial"]
    assert "1 provider losses (offers rescinded" in err
    # client1 had its offer rescinded mid-run, reopened the new one and read back every sector it wrote
    c1 = serials["client1.serial"]
    assert "block: 2048 sectors of 512 bytes, read-only 0\n" in c1
    assert "block: channel rescinded, waiting for a new offer\nblock: reopened, version 1.0\n" in c1
    assert c1.index("reopened") < c1.index("block: wrote 40 sectors at 100\n")
    assert "block: read back 40 sectors at 100: pattern ok\n" in c1 and c1.endswith("block: done\n")
    assert "its provider went away; offer" in logs["client1.log"] and "served again; offered as channel" in \
        logs["client1.log"]
    h = 0xcbf29ce484222325
    for b in b"".join(_pattern(0, s) for s in range(8)):
        h = ((h ^ b) * 0x100000001b3) & (2**64 - 1)
    assert f"block: read 8 sectors at 0: fnv1a 0x{h:016x}\n" in c1
    # the untrusted client: reads served, every write refused by policy (and nothing of it on the disk)
    c2 = serials["client2.serial"]
    assert "read-only 1\n" in c2 and "block: write refused: read-only\n" in c2 and c2.endswith("block: done\n")
    assert "refused: client2 may not write to disk0" in logs["client2.log"]
    # the host file: client1's 40 sectors (two of them completed before the crash), the rest as it was
    disk = store.read_bytes()
    assert len(disk) == 2048 * 512
    for s in range(2048):
        want = _pattern(3, s) if 100 <= s < 140 else _pattern(0, s)
        assert disk[s * 512:(s + 1) * 512] == want, f"sector {s}"


class _FakeChannel:
    def __init__(self):
        self.sent = []

    def send(self, ptype, payload, trans_id, *rest):
        self.sent.append((ptype, bytes(payload), trans_id))

    def guest_read(self, gpa, n):
        return b"\0" * n


class _FakeLink:
    def __init__(self):
        self.frames = []

    def request(self, index, blk, data, callback):
        self.frames.append(wire.data_frame(wire.REQUEST, 1, index, blk, data))   # packs like the real link


class _AllowAll:
    def check(self, *args):
        return None


def test_proxy_refuses_a_sector_range_past_2_64():
    """A client read whose later pieces would start past the u64 sector space is E_INVALID, not a struct.error."""
    import struct
    from types import SimpleNamespace

    from pykvm import abi
    from pykvm.bus.ring import GPA_DIRECT
    from pykvm.bus.services.proxy import BlockProxyService

    svc = BlockProxyService(_FakeLink(), 0, "disk", _AllowAll())
    ch = _FakeChannel()
    session = svc.open(ch, abi.PYKVM_BLOCK_V1_0)
    count = abi.PYKVM_PROVIDER_MAX_SECTORS + 1                     # two relayed pieces
    payload = struct.pack("<IIQII", abi.PYKVM_BLK_OP_READ, 0, (1 << 64) - 1, count, 0)
    pages = (count * abi.PYKVM_BLK_SECTOR + 4095) // 4096
    pkt = SimpleNamespace(type=GPA_DIRECT, payload=payload, trans_id=5,
                          ranges=[(count * abi.PYKVM_BLK_SECTOR, 0, list(range(16, 16 + pages)))])
    session.on_packet(pkt)
    assert svc.link.frames == []
    assert [struct.unpack_from("<I", p)[0] for _t, p, _i in ch.sent] == [abi.PYKVM_BUS_E_INVALID]


# ---------------------------------------------------------------- the broker's recovery, without KVM
class _Peer:
    """The partition end of a broker connection: frames the broker sent it."""

    def __init__(self, broker, name):
        import socket

        from pykvm.partitions.conn import Conn

        a, self.sock = socket.socketpair()
        self.conn = Conn(a, name)
        self.parser = wire.FrameParser()
        broker._frame(self.conn, wire.HELLO, wire.json_frame(wire.HELLO, {"name": name})[8:])
        self.early = self.frames()
        assert self.early.pop(0)[0] == wire.WELCOME

    def frames(self):
        self.sock.setblocking(False)
        out, self.early = getattr(self, "early", []), []
        try:
            while True:
                out += self.parser.feed(self.sock.recv(1 << 16))
        except BlockingIOError:
            pass
        return out


def _status(frames):
    return [wire.parse_json(b) for k, b in frames if k == wire.STATUS]


def _replies(frames):
    return [wire.parse_data(b)[:3] for k, b in frames if k == wire.REPLY]


def test_broker_rescinds_before_failing_and_offers_again_on_register(tmp_path):
    from pykvm import abi
    from pykvm.partitions.broker import Broker

    broker = Broker(load_text(tmp_path, GOOD), tmp_path, log=lambda m: None)
    broker.waiting = []                       # the partitions are this test's peers, not processes
    blk = (abi.PYKVM_BLK_OP_WRITE, 0, 100, 1, 0)
    c1, c2, st = _Peer(broker, "client1"), _Peer(broker, "client2"), _Peer(broker, "storage")
    # before the provider ever registered, requests are held, not failed
    broker._frame(c1.conn, wire.REQUEST, wire.data_frame(wire.REQUEST, 7, 0, blk, b"a" * 512)[8:])
    assert c1.frames() == []
    broker._frame(st.conn, wire.REGISTER, wire.json_frame(wire.REGISTER, {"interface": "block", "versions": [0x10000]})[8:])
    (req,) = st.frames()
    assert req[0] == wire.REQUEST and wire.parse_data(req[1])[2] == blk
    assert _status(c1.frames()) == [{"service": "disk0", "state": "up", "versions": [0x10000]}] == _status(c2.frames())
    # the provider goes away with that request unanswered: "down" first, then E_IO for it
    broker._drop(st.conn, None)
    f1 = c1.frames()
    assert [k for k, _b in f1] == [wire.STATUS, wire.REPLY]
    assert _status(f1) == [{"service": "disk0", "state": "down"}] and _replies(f1) == [(7, 0, (abi.PYKVM_BUS_E_IO,
                                                                                                0, 0, 0, 0))]
    assert _status(c2.frames()) == [{"service": "disk0", "state": "down"}]
    # a request racing the rescind is failed at once, not held for the restart
    broker._frame(c2.conn, wire.REQUEST, wire.data_frame(wire.REQUEST, 9, 0, (abi.PYKVM_BLK_OP_READ, 0, 100, 1, 0))[8:])
    assert _replies(c2.frames()) == [(9, 0, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0))]
    assert broker.counts["rescinds"] == 1 and broker.counts["failed"] == 1
    # a client that connects while the service is down learns it at once
    broker._drop(c2.conn, None)
    c2 = _Peer(broker, "client2")
    assert _status(c2.frames()) == [{"service": "disk0", "state": "down"}]
    # the restarted provider registers: the clients are told to offer it again
    st = _Peer(broker, "storage")
    broker._frame(st.conn, wire.REGISTER, wire.json_frame(wire.REGISTER, {"interface": "block", "versions": [0x10000]})[8:])
    assert _status(c1.frames()) == [{"service": "disk0", "state": "up", "versions": [0x10000]}] == _status(c2.frames())
    with pytest.raises(wire.WireError, match="registered twice"):
        broker._frame(st.conn, wire.REGISTER, wire.json_frame(wire.REGISTER, {"interface": "block", "versions": [0x10000]})[8:])


def test_broker_restart_intensity_bounds_restarts_in_a_period(tmp_path):
    from pykvm.partitions.broker import Broker

    broker = Broker(load_text(tmp_path, GOOD.replace("restarts = 2", "restarts = 10")), tmp_path,
                    log=lambda m: None, intensity=(2, 3600.0))
    p = broker.topo.by_name("storage")
    assert broker._may_restart(p) and broker._may_restart(p) and not broker._may_restart(p)
    broker.restarted["storage"][0] -= 7200           # the first restart left the period
    assert broker._may_restart(p)
    broker.generation["storage"] = 10                # and `restarts` bounds the total
    broker.restarted["storage"].clear()
    assert not broker._may_restart(p)


@pytest.mark.parametrize("value", ["5", "x/60", "5/0", "1234567890/1", "-1/5"])
def test_up_refuses_a_bad_restart_intensity(tmp_path, value):
    p = tmp_path / "t.toml"
    p.write_text(GOOD)
    r = pykvm("up", str(p), "--dir", str(tmp_path / "run"), "--restart-intensity", value)
    assert r.returncode == 2 and "--restart-intensity" in r.stderr.decode()
def _up_popen(topo, run):
    import os
    import subprocess
    import sys

    from .helpers import ROOT

    return subprocess.Popen([sys.executable, "-m", "pykvm", "up", str(topo), "--dir", str(run)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))


def _wait_for(path, text, proc, timeout=240.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}: "
                         f"{path.read_text() if path.exists() else 'no file'}")


VERSIONS = """
[[partition]]
name = "old"
kernel = "bus-blocksvc"
provides = "disk0"

[[partition]]
name = "new"
kernel = "bus-blocksvc"
cmdline = "versions=1.1,1.0"
provides = "disk1"

[[partition]]
name = "client1"
kernel = "bus-block"
cmdline = "versions=1.1,1.0 wsec=100 wcount=16 seed=3"
uses = ["disk0"]

[[partition]]
name = "client2"
kernel = "bus-block"
cmdline = "versions=1.1 wsec=300 wcount=8 seed=5 linger=1"
trust = "untrusted"
uses = ["disk1"]

[[partition]]
name = "client3"
kernel = "bus-block"
cmdline = "versions=2.0"
uses = ["disk0"]

[policy.partition.client2]
versions = ["1.0"]
"""


@pytest.mark.kvm
def test_up_versions_across_partitions_and_ctl_policy(tmp_path):
    """Older minor serves a newer client; a policy caps a version; a major mismatch names both lists; ctl policy."""
    import json

    topo = tmp_path / "topo.toml"
    topo.write_text(VERSIONS)
    run = tmp_path / "run"
    proc = _up_popen(topo, run)
    try:
        _wait_for(run / "client2.serial", "block: lingering\n", proc)
        r = pykvm("ctl", str(run / "client2.sock"), "policy")
        assert r.returncode == 0, r.stderr
        pol = json.loads(r.stdout)["policy"]
        assert pol["partition"] == "client2" and pol["agent"] == "TopologyPolicy"
        assert pol["allowed"]["may_offer"] == 1 and pol["allowed"]["may_open"] == 1
        assert pol["refused"]["may_open"] == 1 and pol["refused"]["may_write"] >= 1
        assert "client2 may not use disk1 at version 1.1 (its policy allows 1.0)" in pol["last_refusals"]
        assert "client2 may not write to disk1" in pol["last_refusals"]
        link = json.loads(r.stdout)["link"]
        assert link["service_versions"] == {"disk1": ["1.1", "1.0"]} and link["trust"] == "untrusted"
        # the broker's own decisions (it enforces the policy again) reach ctl policy within a second or so
        import time

        end = time.monotonic() + 20
        # (the broker pushes at most once a second: the first push may come before any request was relayed)
        while (link["broker_policy"] is None or not link["broker_policy"]["allowed"].get("may_request")) \
                and time.monotonic() < end:
            time.sleep(0.5)
            link = json.loads(pykvm("ctl", str(run / "client2.sock"), "policy").stdout)["link"]
        bp = link["broker_policy"]
        assert bp["partition"] == "client2" and bp["trust"] == "untrusted" and bp["refusals"] == 0, bp
        assert bp["allowed"]["may_request"] >= 1 and bp["services"][0]["service"] == "disk1", bp
        r = pykvm("ctl", str(run / "client2.sock"), "stats")
        chans = [c for c in json.loads(r.stdout)["bus"]["channels"] if c["service"] == "block@disk1"]
        assert chans[0]["session"]["version"] == "1.0", chans
        r = pykvm("ctl", str(run / "client2.sock"), "rescind", f"relid={chans[0]['relid']}")
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = out.decode(), err.decode()
    # `up` exits with the first failing client's status: client3's refused open (exit_code(4): status 9)
    assert proc.returncode == 9, (out, err)
    assert "partition client1: status 0" in out and "partition client2: status 0" in out
    assert "partition client3: status 9" in out
    c1 = (run / "client1.serial").read_text()
    assert "block: open, version 1.0\n" in c1 and "block: read back 16 sectors at 100: pattern ok\n" in c1
    assert "blocksvc: a client at version 1.0\n" in (run / "old.serial").read_text()
    c2 = (run / "client2.serial").read_text()
    assert "block: open, version 1.0\n" in c2 and c2.endswith("block: rescinded\n")
    assert "blocksvc: a client at version 1.0\n" in (run / "new.serial").read_text()
    assert "serving 2048 sectors, generation 0, versions 1.1 1.0\n" in (run / "new.serial").read_text()
    # the incompatible pair: both lists on the client's console and in its VMM log
    c3 = (run / "client3.serial").read_text()
    assert "block: open refused: no common version; this guest speaks 2.0, the service 1.0\n" in c3
    assert ("(block@disk0): the guest speaks 2.0, disk0's service partition 1.0: no common major version"
            in (run / "client3.log").read_text())
    assert "refused: client2 may not use disk1 at version 1.1" in (run / "client2.log").read_text()
    assert "new serves disk1 at versions 1.1, 1.0" in err


HOSTILE_SERVICES = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
provides = "disk0"

[[partition]]
name = "badtag"
kernel = "bus-blocksvc"
cmdline = "hostile=tag"
request_timeout = 5
provides = "disk1"

[[partition]]
name = "badlen"
kernel = "bus-blocksvc"
cmdline = "hostile=length"
request_timeout = 5
provides = "disk2"

[[partition]]
name = "silent"
kernel = "bus-blocksvc"
cmdline = "hostile=silent"
provides = "disk3"
request_timeout = 2

[[partition]]
name = "client1"
kernel = "bus-block"
cmdline = "wsec=100 wcount=40 seed=3 reopen_ms=60000"
uses = ["disk0"]

[[partition]]
name = "prober"
kernel = "bus-block"
cmdline = "probe=1"
uses = ["disk1", "disk2", "disk3"]
"""


def _check_clean_client(run, name="client1"):
    c1 = (run / f"{name}.serial").read_text()
    assert "block: read back 40 sectors at 100: pattern ok\n" in c1 and c1.endswith("block: done\n"), c1


@pytest.mark.kvm
def test_up_hostile_service_partitions_are_contained(tmp_path):
    """Wrong transaction ids, a reply of the wrong length, silence: each provider is cut off alone."""
    run, out, err, _logs = pykvm_up(tmp_path, HOSTILE_SERVICES)
    import re

    _check_clean_client(run)
    probe = (run / "prober.serial").read_text()
    # a provider cut off is lost like a crashed one: its clients' offers are rescinded (the request
    # in flight never completes), except that the request the silent one timed out on gets E_IO
    lines = sorted(re.findall(r"block: offer \d+: (.*)\n", probe))
    assert lines == ["info I/O error, read rescinded", "info rescinded, read rescinded",
                     "info rescinded, read rescinded"], probe
    assert probe.endswith("block: probed\n"), probe
    assert "partition storage: status 0" in out and "partition client1: status 0" in out
    # a cut-off provider's guest sees its channel closed and powers off
    assert "partition badtag: status 0" in out and "partition badlen: status 0" in out
    for name in ("badtag", "badlen"):
        assert (run / f"{name}.serial").read_text().endswith("blocksvc: provider channel gone\n")
    assert "partition silent: status -9" in out            # stopped by the root after its request_timeout
    assert "badtag: its provider channel closed: provider: completion for transaction" in err
    assert "badlen: its provider channel closed: provider: reply of 1024 data bytes to a request for 0" in err
    assert re.search(r"silent: link dropped: request \d+ for disk3 from prober unanswered after 2 s: "
                     r"the provider is lost and stopped", err), err
    assert "(provider): provider: completion for transaction" in (run / "badtag.log").read_text()


HOSTILE_CLIENTS = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
provides = "disk0"

[[partition]]
name = "client1"
kernel = "bus-block"
cmdline = "wsec=100 wcount=40 seed=3 reopen_ms=60000"
uses = ["disk0"]

[[partition]]
name = "flooder"
kernel = "bus-block"
cmdline = "hostile=flood"
uses = ["disk0"]

[[partition]]
name = "malformed"
kernel = "bus-block"
cmdline = "hostile=malformed"
trust = "untrusted"
uses = ["disk0"]

[policy.partition.flooder]
requests_per_second = 1
burst = 1
"""


@pytest.mark.kvm
def test_up_hostile_clients_are_contained(tmp_path):
    """A client that floods and one that sends a malformed request lose their channel; the others go on."""
    run, out, err, _logs = pykvm_up(tmp_path, HOSTILE_CLIENTS)
    _check_clean_client(run)
    flood = (run / "flooder.serial").read_text()
    import re

    m = re.search(r"block: flood: channel closed by the host after (\d+) requests \((\d+) limited\)\n", flood)
    assert m and int(m.group(1)) >= 65 and 1 <= int(m.group(2)) <= 63, flood
    flog = (run / "flooder.log").read_text()
    assert "(block@disk0): flooding: 64 requests in a row over the policy's limits; channel closed" in flog
    assert "refused: flooder: over 1 requests/s on disk0" in flog
    assert "block: malformed: channel closed by the host\n" in (run / "malformed.serial").read_text()
    assert ("(block@disk0): block request: 8 bytes, expected at least 24; channel closed"
            in (run / "malformed.log").read_text())
    assert "partition storage: status 0" in out


# ---------------------------------------------------------------- versions across partitions (no KVM)
from pykvm.bus.policy import PolicyError, parse_versions  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 0xFFFF), st.integers(0, 0xFFFF)), max_size=8, unique=True))
def test_policy_versions_round_trip(pairs):
    assert parse_versions([f"{a}.{b}" for a, b in pairs], "v") == tuple(a << 16 | b for a, b in pairs)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.lists(st.one_of(st.text(max_size=12), st.integers(), st.none(), st.booleans()), max_size=10),
                 st.text(max_size=10), st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_policy_versions_garbage_only_raises_policy_error(value):
    try:
        out = parse_versions(value, "policy.x.versions")
    except PolicyError as e:
        assert "policy.x.versions" in str(e) and "\n" not in str(e)
    else:
        assert all(0x10000 <= v <= 0xFFFFFFFF for v in out) and len(set(out)) == len(out) <= 8


def test_topology_versions_and_timeout_parse(tmp_path):
    t = load_text(tmp_path, GOOD.replace('restarts = 2', 'restarts = 2\nrequest_timeout = 2.5')
                  + "[policy.partition.client2]\nversions = ['1.1', '1.0']\n")
    assert t.by_name("storage").request_timeout == 2.5 and t.by_name("client1").request_timeout == 30.0
    assert t.by_name("client2").rules.versions == (0x10001, 0x10000) and t.by_name("client1").rules.versions == ()


class _VersionLink(_FakeLink):
    def __init__(self, versions):
        super().__init__()
        self.service_versions = {"disk": versions} if versions else {}


def _proxy(provider_versions, policy_versions=()):
    from pykvm.bus.services.proxy import BlockProxyService

    agent = TopologyPolicy({"c": Rules(versions=policy_versions)}, {"c": ("disk",)})
    logged = []
    ledger = Ledger(agent, "c", log=logged.append)
    return BlockProxyService(_VersionLink(provider_versions), 0, "disk", ledger), ledger, logged


@pytest.mark.parametrize("provider, policy, proposed, want", [
    ((0x10000,), (), (0x10001, 0x10000), 0x10000),        # an older minor serves a newer client
    ((0x10000,), (), (0x10001,), 0x10000),
    ((0x10001, 0x10000), (), (0x10001,), 0x10001),         # the newest both speak
    ((0x10001, 0x10000), (), (0x10005,), 0x10001),
    ((0x10001, 0x10000), (0x10000,), (0x10001,), 0x10000),  # the policy caps it; the newer one is refused
    ((), (), (0x10000,), 0x10000),                          # not registered yet: block 1.0
])
def test_proxy_serves_the_newest_common_allowed_version(provider, policy, proposed, want):
    svc, ledger, _logged = _proxy(provider, policy)
    assert svc.choose_version(proposed) == (want, None)
    snap = ledger.snapshot()
    assert snap["allowed"] == {"may_open": 1}
    assert snap["refused"] == ({"may_open": 1} if policy and want not in proposed[:1] else {})


def test_proxy_refuses_an_incompatible_major_naming_both_lists():
    svc, ledger, _ = _proxy((0x10001, 0x10000))
    assert svc.choose_version((0x20000,)) == (None, "the guest speaks 2.0, disk's service partition 1.1, 1.0: "
                                                    "no common major version")
    assert ledger.snapshot()["allowed"] == {} and ledger.snapshot()["refused"] == {}
    svc, ledger, logged = _proxy((0x10001, 0x10000), (0x20000,))
    version, why = svc.choose_version((0x10001, 0x10000))
    assert version is None and why == "c may not use disk at version 1.0 (its policy allows 2.0)"
    assert ledger.snapshot()["refused"] == {"may_open": 2} and len(logged) == 2


def _provider_register(versions):
    import struct
    from types import SimpleNamespace

    from pykvm import abi
    from pykvm.bus.ring import INBAND
    from pykvm.bus.services.provider import ProviderSession

    class Link:
        up = None

        def provider_up(self, session, interface, vs, remap=False):
            self.up = (interface, vs)

    link = Link()
    s = ProviderSession(_FakeChannel(), abi.PYKVM_PROVIDER_V1_0, link)
    padded = list(versions) + [0] * (abi.PYKVM_BUS_MAX_SERVICE_VERSIONS - len(versions))
    payload = struct.pack("<QQII%dI" % len(padded), abi.PYKVM_BUS_IF_BLOCK_LO, abi.PYKVM_BUS_IF_BLOCK_HI,
                          len(versions), 0, *padded)
    s.on_packet(SimpleNamespace(type=INBAND, payload=payload, trans_id=0))
    return link.up


def test_provider_registration_versions_are_checked():
    from pykvm.bus.services.base import ServiceError

    assert _provider_register([0x10001, 0x10000]) == ("block", (0x10001, 0x10000))
    for bad, needle in (([0x20000], "versions 2.0 registered; the root relays block 1.x"),
                        ([0x10000, 0x10000], "1.0, 1.0 registered"), ([0x10000, 0x10001], "1.0, 1.1 registered")):
        with pytest.raises(ServiceError, match=needle.replace(".", r"\.")):
            _provider_register(bad)


def test_proxy_closes_a_flooding_channel_and_limits_outstanding():
    import struct
    from types import SimpleNamespace

    from pykvm import abi
    from pykvm.bus.ring import INBAND
    from pykvm.bus.services.base import ServiceError
    from pykvm.bus.services.proxy import FLOOD_STREAK, BlockProxyService

    agent = TopologyPolicy({"c": Rules(max_outstanding=3)}, {"c": ("disk",)})
    ledger = Ledger(agent, "c", log=lambda m: None)
    svc = BlockProxyService(_VersionLink(()), 0, "disk", ledger)
    ch = _FakeChannel()
    session = svc.open(ch, abi.PYKVM_BLOCK_V1_0)
    info = struct.pack("<IIQII", abi.PYKVM_BLK_OP_INFO, 0, 0, 0, 0)
    for i in range(3 + FLOOD_STREAK - 1):          # nothing is answered: 3 relayed, then refusals
        session.on_packet(SimpleNamespace(type=INBAND, payload=info, trans_id=i))
    assert len(svc.link.frames) == 3
    # each relayed request says which version the client's channel speaks (blk request's reserved field)
    assert all(wire.parse_data(f[8:])[2][1] == abi.PYKVM_BLOCK_V1_0 for f in svc.link.frames)
    statuses = [struct.unpack_from("<I", p)[0] for _t, p, _i in ch.sent]
    assert statuses == [abi.PYKVM_BUS_E_LIMIT] * (FLOOD_STREAK - 1)
    with pytest.raises(ServiceError, match=f"flooding: {FLOOD_STREAK} requests in a row"):
        session.on_packet(SimpleNamespace(type=INBAND, payload=info, trans_id=999))
    assert "3 requests unanswered on disk (at most 3)" in ledger.snapshot()["last_refusals"][-1]
