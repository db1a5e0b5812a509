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
    assert got["remap_memfd_untouched"]                  # a served remapped read would have filled it
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
    assert "client2: 16 requests unanswered on disk0 (at most 16)" in pol["client2"]["last_refusals"]
    assert "policy: refused: client2 may not write to disk0" in logs


# ---------------------------------------------------------------- the broker's side, without processes
GOOD = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
provides = "disk0"

[[partition]]
name = "client1"
kernel = "bus-block"
uses = ["disk0"]

[[partition]]
name = "client2"
kernel = "bus-block"
trust = "untrusted"
uses = ["disk0"]

[[partition]]
name = "hog"
kernel = "bus-block"
uses = ["disk0"]
"""


class Peer:
    """A partition's end of a link the broker made, driven by hand."""

    def __init__(self, broker, name):
        import socket

        from pykvm.partitions.conn import Conn

        a, self.sock = socket.socketpair()
        self.sock.setblocking(False)
        self.conn = Conn(a, name)
        self.broker = broker
        self.parser = wire.FrameParser()
        broker._frame(self.conn, wire.HELLO, wire.json_frame(wire.HELLO, {"name": name})[8:])
        assert self.frames()[0][0] == wire.WELCOME

    def send(self, kind, body, fds=()):
        self.broker._frame(self.conn, kind, body, tuple(fds))

    def request(self, tag, blk, data=b""):
        self.send(wire.REQUEST, wire.data_frame(wire.REQUEST, tag, 0, blk, data)[8:])

    def frames(self):
        out = []
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                out += self.parser.feed(data)
        except BlockingIOError:
            pass
        return out

    def replies(self):
        return [wire.parse_data(b) for k, b in self.frames() if k == wire.REPLY]


def _broker(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(GOOD)
    b = Broker(topology.load(p), tmp_path, log=lambda m: None)
    b.waiting = []
    st = Peer(b, "storage")
    st.send(wire.REGISTER, wire.json_frame(wire.REGISTER, {"interface": "block", "versions": [0x10000],
                                                          "remap": True})[8:])
    return b, st


READ = (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLOCK_V1_0, 0, 1, 0)


def test_a_flooding_client_does_not_starve_a_trusted_one(tmp_path):
    """The provider gets WINDOW requests at a time, taken round-robin from the clients' queues."""
    from pykvm.partitions.relay import WINDOW

    b, st = _broker(tmp_path)
    hog, c1 = Peer(b, "hog"), Peer(b, "client1")
    for i in range(200):                     # within its (trusted) limits: queued, not refused
        hog.request(i, READ)
    c1.request(7, READ)
    given = [wire.parse_data(body) for k, body in st.frames() if k == wire.REQUEST]
    assert len(given) == WINDOW
    served_for_c1 = False
    for _ in range(3):                       # answer one at a time: the next slot goes round-robin
        tag = given.pop(0)[0]
        st.send(wire.REPLY, wire.data_frame(wire.REPLY, tag, 0, (abi.PYKVM_BUS_OK, 0, 0, 0, 0), bytes(512))[8:])
        new = [wire.parse_data(body) for k, body in st.frames() if k == wire.REQUEST]
        assert len(new) == 1
        given += new
        served_for_c1 |= any(b.inflight[t][1] is c1.conn for t, *_ in new)
    assert served_for_c1
    assert sum(g.outstanding for g in hog.conn.grants) == 200 - 3


def test_rate_is_shaped_not_refused(tmp_path):
    """Over its rate a client waits in its bounded queue; only a full queue is refused."""
    from pykvm.partitions.admission import Grant

    b, _st = _broker(tmp_path)
    now = [0.0]
    p = b.topo.by_name("client2")
    g = Grant(None, p, "disk0", b.ledgers["client2"], clock=lambda: now[0])
    assert all(g.may_send(now[0]) for _ in range(p.rules.burst)) and not g.may_send(now[0])
    assert g.next_token(now[0]) == pytest.approx(1 / p.rules.requests_per_second)
    now[0] += 1 / p.rules.requests_per_second
    assert g.may_send(now[0]) and not g.may_send(now[0])


def test_untrusted_client_refusals_without_a_provider_answering(tmp_path):
    b, st = _broker(tmp_path)
    c2 = Peer(b, "client2")
    c2.request(1, (abi.PYKVM_BLK_OP_WRITE, abi.PYKVM_BLOCK_V1_0, 5, 1, 0), b"X" * 512)
    c2.request(2, (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLOCK_V1_0, 5, 17, 0))
    assert [(t, r[:2]) for t, _i, r, _d in c2.replies()] == [
        (1, (abi.PYKVM_BUS_E_READ_ONLY, abi.PYKVM_BLK_FLAG_READ_ONLY)), (2, (abi.PYKVM_BUS_E_LIMIT, 0))]
    assert [k for k, _b in st.frames()] == []              # nothing of it reached the provider
    for i in range(16):                                    # its 16 outstanding
        c2.request(10 + i, READ)
    assert len([k for k, _b in st.frames() if k == wire.REQUEST]) == 8      # WINDOW at the provider
    for i in range(FLOOD_STREAK - 1):
        c2.request(100 + i, READ)
    assert [r[2][0] for r in c2.replies()] == [abi.PYKVM_BUS_E_LIMIT] * (FLOOD_STREAK - 1)
    with pytest.raises(wire.WireError, match="flooding: 64 requests in a row"):
        c2.request(999, READ)
    # an unknown operation or a request for a service it does not use: the link is dropped
    c1 = Peer(b, "client1")
    with pytest.raises(wire.WireError, match="block operation 99"):
        c1.request(1, (99, 0, 0, 0, 0))
    with pytest.raises(wire.WireError, match="for service 1; it uses 1"):
        c1.send(wire.REQUEST, wire.data_frame(wire.REQUEST, 1, 1, READ)[8:])
    with pytest.raises(wire.WireError, match="a write of 1 sectors with 0 data bytes"):
        c1.request(2, (abi.PYKVM_BLK_OP_WRITE, abi.PYKVM_BLOCK_V1_0, 5, 1, 0))
    with pytest.raises(wire.WireError, match="said hello twice"):
        c1.send(wire.HELLO, wire.json_frame(wire.HELLO, {"name": "client1"})[8:])
    with pytest.raises(wire.WireError, match="unexpected welcome"):
        c1.send(wire.WELCOME, wire.json_frame(wire.WELCOME, {})[8:])


def test_a_client_that_does_not_read_is_dropped_not_waited_for(tmp_path):
    """The broker never blocks on a peer's full socket; one that lets 16 MiB pile up is cut off."""
    b, st = _broker(tmp_path)
    c2 = Peer(b, "client2")
    n = 0
    while not c2.conn.closed and n < 1_000_000:            # every write refused: a reply each, never read
        c2.request(n, (abi.PYKVM_BLK_OP_WRITE, abi.PYKVM_BLOCK_V1_0, 5, 1, 0), b"X" * 512)
        n += 1
    assert c2.conn.closed and "client2" not in b.conns
    assert b.providers["disk0"] is st.conn                  # the others are untouched


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st_  # noqa: E402

_BLK = st_.tuples(st_.sampled_from([0, 1, 2, 3, 4, 7, 1 << 31]), st_.sampled_from([0, 0x10000, 0x10001, 0x20000]),
                  st_.sampled_from([0, 5, (1 << 64) - 1]), st_.sampled_from([0, 1, 8, 16, 17, 256, 257, 1 << 31]),
                  st_.sampled_from([0, 1]))


@settings(max_examples=300, deadline=None)
@given(st_.lists(st_.tuples(st_.sampled_from([wire.REQUEST, wire.REMAP, wire.REPLY, wire.STATUS, wire.REGISTER]),
                            st_.integers(0, 2), _BLK, st_.binary(max_size=600)), max_size=12))
def test_any_client_frames_get_an_answer_or_a_drop_and_stay_within_limits(tmp_path_factory, frames):
    b, st = _broker(tmp_path_factory.mktemp("b"))
    c2 = Peer(b, "client2")
    for kind, index, blk, data in frames:
        body = wire.TAG.pack(1, index) + wire.BLK.pack(*blk) + data
        try:
            c2.send(kind, body)
        except wire.WireError:
            b._drop(c2.conn, None)
            break
        g = c2.conn.grants[0]
        assert 0 <= g.outstanding <= 16
    for k, body in st.frames():               # what reached the provider is within client2's rules
        if k == wire.REQUEST:
            op, _v, _s, count, _r = wire.parse_data(body)[2]
            assert op in (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_FLUSH, abi.PYKVM_BLK_OP_INFO)
            assert op != abi.PYKVM_BLK_OP_READ or 1 <= count <= 16
        assert k != wire.REMAP
