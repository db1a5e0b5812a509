"""The control socket under hostile clients: garbage, deep nesting, half-sent lines, many connections."""

from __future__ import annotations

import json
import socket
import threading
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.control import server as control
from pykvm.control.server import ControlServer
from pykvm.control.client import request


class FakeMachine:
    """Just what the control server touches: call() and the built-in commands' needs."""

    def __init__(self):
        self.calls = 0

    def call(self, fn, timeout=60.0):
        self.calls += 1
        return fn()

    def stats(self):
        return {"exits": [{"IO": self.calls}]}


@pytest.fixture
def server(tmp_path):
    srv = ControlServer(FakeMachine(), str(tmp_path / "ctl.sock"))
    yield srv
    srv.close()


def roundtrip(path, raw: bytes, timeout=10) -> dict:
    from pykvm.control.client import exchange_raw

    return exchange_raw(path, raw, timeout)


def test_deeply_nested_line_gets_an_error_and_the_server_keeps_serving(server):
    reply = roundtrip(server.path, b"[" * 1000 + b"\n")
    assert reply["ok"] is False and "nested" in reply["error"]
    reply = roundtrip(server.path, b'{"cmd": "x", "a": ' + b"[" * 100000 + b"\n")
    assert reply["ok"] is False
    assert server.thread.is_alive()
    assert request(server.path, {"cmd": "stats"})["ok"] is True


@pytest.mark.parametrize("line", [b"\xff\xfe garbage", b"{", b"[]", b'{"cmd": 3}', b"null", b"1e999999",
                                  b'{"cmd": "nope"}', b'"' + b"\\" * 5000])
def test_garbage_lines_get_a_one_line_error(server, line):
    reply = roundtrip(server.path, line + b"\n")
    assert reply["ok"] is False and reply["error"] and "\n" not in reply["error"]
    assert server.thread.is_alive()


def test_a_line_longer_than_the_limit_is_refused(server):
    reply = roundtrip(server.path, b"x" * (control.MAX_REQUEST + 10))
    assert reply["ok"] is False and "longer" in reply["error"]


def test_a_half_sent_request_does_not_block_other_clients(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(server.path)
        slow.sendall(b'{"cmd": "sta')          # and then nothing, for as long as it likes
        assert request(server.path, {"cmd": "stats"}, timeout=10)["ok"] is True
        slow.sendall(b'ts"}\n')                # finishing later still works
        slow.settimeout(10)
        assert json.loads(slow.recv(65536))["ok"] is True


def test_two_hundred_simultaneous_connections_are_all_served(server):
    socks = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect(server.path)           # EAGAIN here when the listen backlog is too short
            socks.append(s)
        for s in socks:
            s.setblocking(True)
            s.settimeout(20)
            s.sendall(b'{"cmd": "stats"}\n')
        replies = []
        for s in socks:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                assert chunk, "connection closed without a reply"
                buf += chunk
            replies.append(json.loads(buf))
        assert all(r["ok"] for r in replies) and len(replies) == 200
    finally:
        for s in socks:
            s.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4),
                      max_leaves=30).map(lambda v: json.dumps(v).encode()))
def test_parse_request_accepts_or_refuses_with_value_error(line):
    try:
        req = control.parse_request(line)
    except ValueError as e:
        assert str(e)
    else:
        assert isinstance(req, dict) and isinstance(req["cmd"], str)


def test_stats_snapshot_is_safe_while_a_vcpu_adds_unclaimed_addresses():
    """`stats` used to raise 'dictionary changed size during iteration' under a busy guest."""
    from pykvm.devices import DeviceManager
    from pykvm.machine.core import Machine

    dm = DeviceManager()
    fake = types.SimpleNamespace(exit_counts=[{}], hot_io_exits=[[0]], devices=dm, bus=None, numa=None,
                                 windows=types.SimpleNamespace(info=lambda: [],
                                                               ring_stats=types.SimpleNamespace(as_dict=dict)))
    fake.exit_summary = lambda: Machine.exit_summary(fake)
    stop = threading.Event()

    def guest():
        addr = 0
        while not stop.is_set():
            dm.unclaimed_access("mmio", 0xD0000000 + addr, 4, False)
            dm.outside_d0.add((f"dev{addr % 5000}", "r"))
            addr += 1

    t = threading.Thread(target=guest)
    t.start()
    try:
        for _ in range(300):
            Machine.stats(fake)
    finally:
        stop.set()
        t.join()


def test_unclaimed_addresses_are_bounded():
    from pykvm.devices import DeviceManager
    from pykvm.devices.dispatch import UNCLAIMED_KEYS

    dm = DeviceManager()
    for a in range(UNCLAIMED_KEYS + 500):
        assert dm.unclaimed_access("port", a, 1, False) == 0xFF
    assert len(dm.unclaimed) == UNCLAIMED_KEYS and dm.unclaimed_other == 500
    hot = ("port", UNCLAIMED_KEYS + 499, "r")        # listed: the newest key
    dm.unclaimed_access("port", UNCLAIMED_KEYS + 499, 1, False)
    assert dm.unclaimed[hot] == 2
    assert sum(n for _k, n in dm.unclaimed.items()) + dm.unclaimed_other == UNCLAIMED_KEYS + 501
