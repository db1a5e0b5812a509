"""Direct channels (issue 20): the open descriptor, the service guest's message parser (C and its Python
mirror on the same inputs), the broker's decision and relaying, the service VMM's mapping and teardown,
and `pykvm up` end to end: guest-to-guest echo, policy refusals, a service crash with rescind and
re-offer, a hostile client, and the service guest seeing its window unmapped after close."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.bus import direct, wire
from pykvm.partitions import topology

from .helpers import pykvm_up

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
MSG = direct.MSG


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int) -> int:
    fd = os.memfd_create("direct-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


# ---------------------------------------------------------------- the open descriptor (service VMM)
def good_open(**kw):
    obj = {"runs": [[0, 0, 8]], "inbound_offset": 4, "version": abi.PYKVM_ECHO_V1_1, "rules": 0, "max_message": 4096}
    obj.update(kw)
    return obj


def test_parse_open_accepts_a_good_descriptor():
    o = direct.parse_open(good_open(), 2)
    assert (o.runs, o.pages, o.inbound, o.version, o.flags, o.max_message) == (((0, 0, 8),), 8, 4,
                                                                              abi.PYKVM_ECHO_V1_1, 0, 4096)
    assert (o.data_runs, o.data_pages, o.max_transfer) == ((), 0, 0)


def test_parse_open_takes_a_data_buffer_in_the_same_memfds():
    o = direct.parse_open(good_open(data_runs=[[1, 0, 16], [0, 64 * PAGE, 16]], max_transfer=64 << 10), 3)
    assert o.data_runs == ((1, 0, 16), (0, 64 * PAGE, 16)) and o.data_pages == 32 and o.max_transfer == 64 << 10
    assert direct.MAX_FDS + 1 == wire.MAX_FDS          # the memfds and the eventfd travel in one frame


@pytest.mark.parametrize("kw, nfds, needle", [
    ({}, 1, "descriptors"),
    ({"runs": [[1, 0, 8]]}, 2, "bad run"),                 # names the eventfd as memory
    ({"runs": [[0, 100, 8]]}, 2, "bad run"),               # not page aligned
    ({"runs": [[0, 0, 2]]}, 2, "ring pages"),
    ({"runs": [[0, 0, 65]]}, 2, "bad run"),
    ({"runs": [[0, 0, 40], [0, 80 * PAGE, 40]]}, 2, "ring pages"),
    ({"inbound_offset": 7}, 2, "inbound_offset"),
    ({"rules": 2}, 2, "rules"),
    ({"max_message": 1 << 30}, 2, "max_message"),
    ({"version": True}, 2, "version"),
    ({"runs": "all"}, 2, "runs"),
    ({"data_runs": []}, 2, "data_runs"),
    ({"data_runs": [[1, 0, 4]]}, 2, "bad run"),           # the eventfd again
    ({"data_runs": [[0, 0, 193]]}, 2, "bad run"),
    ({"data_runs": [[0, 0, 100], [0, 400 * PAGE, 100]]}, 2, "data buffer pages"),
    ({"data_runs": [[0, 8, 1]]}, 2, "bad run"),
    ({"data_runs": [[0, 0, 1]] * 9}, 2, "data_runs"),
    ({"max_transfer": 1000}, 2, "multiple"),
    ({"max_transfer": 256 * 512 + 512}, 2, "max_transfer"),
    ({"max_transfer": -512}, 2, "max_transfer"),
    ({}, 5, "descriptors"),
])
def test_parse_open_refusals(kw, nfds, needle):
    with pytest.raises(direct.DirectError, match=needle):
        direct.parse_open(good_open(**kw), nfds)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=4),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)


run_lists = st.lists(st.lists(st.integers(-1, 3) | st.sampled_from([0, PAGE, 8 * PAGE, 1 << 46, 192, 193]) |
                              st.integers(-2**70, 2**70), min_size=2, max_size=4), max_size=10)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["runs", "inbound_offset", "version", "rules", "max_message", "x",
                                        "data_runs", "max_transfer"]),
                       json_values | run_lists | st.sampled_from([0, 512, 4096, 131072, 131584, 1000]),
                       max_size=8), st.integers(0, 7))
def test_parse_open_garbage_only_raises_direct_error(obj, nfds):
    try:
        o = direct.parse_open(obj, nfds)
    except direct.DirectError:
        return
    assert 4 <= o.pages <= abi.PYKVM_DIRECT_MAX_PAGES and 2 <= o.inbound <= o.pages - 2 and o.flags in (0, 1)
    assert all(0 <= i < nfds - 1 and off % PAGE == 0 and off < 1 << 46 and n >= 1 for i, off, n in o.runs)
    assert sum(n for _i, _o, n in o.runs) == o.pages and sum(n for _i, _o, n in o.data_runs) == o.data_pages
    assert all(0 <= i < nfds - 1 and off % PAGE == 0 and off < 1 << 46 and n >= 1 for i, off, n in o.data_runs)
    assert o.data_pages <= abi.PYKVM_DIRECT_DATA_MAX_PAGES and (o.data_pages == 0) == ("data_runs" not in obj)
    assert 0 <= o.max_transfer <= 256 * 512 and o.max_transfer % 512 == 0 and 2 <= nfds <= 4


# ---------------------------------------------------------------- the guest's parser: C and a Python mirror
def mirror_check(data: bytes) -> int:
    """Python mirror of guests/runtime/direct_check.c direct_msg_check()."""
    if len(data) < MSG.size:
        return -1
    (op, ident, gpa, pages, inbound, doorbell, _version, rules, max_message, data_gpa, data_pages,
     max_transfer) = MSG.unpack_from(data)
    if op not in (abi.PYKVM_DIRECT_OPEN, abi.PYKVM_DIRECT_CLOSE):
        return -2
    if ident >= abi.PYKVM_DIRECT_MAX:
        return -3
    if op == abi.PYKVM_DIRECT_CLOSE:
        return 0
    if gpa != abi.PYKVM_DIRECT_GPA + ident * abi.PYKVM_DIRECT_STRIDE or doorbell != abi.PYKVM_DIRECT_DOORBELL_BASE + ident:
        return -4
    if not 4 <= pages <= abi.PYKVM_DIRECT_MAX_PAGES or not 2 <= inbound <= (pages - 2) % (1 << 32):
        return -5
    if rules & ~abi.PYKVM_DIRECT_RULE_READ_ONLY & 0xFFFFFFFF or not 8 <= max_message <= 1 << 20:
        return -6
    if (data_pages > abi.PYKVM_DIRECT_DATA_MAX_PAGES or data_gpa != (gpa + abi.PYKVM_DIRECT_DATA_OFFSET) % (1 << 64)
            if data_pages else data_gpa != 0):
        return -9
    if max_transfer % 512 or max_transfer > abi.PYKVM_BLK_MAX_SECTORS * 512:
        return -9
    return 0


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("harness") / "direct_harness"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-I", str(ROOT / "guests/include"), "-I", str(ROOT / "guests/runtime"),
                    "-o", str(out), str(ROOT / "tests/direct_harness.c"), str(ROOT / "guests/runtime/direct_check.c")],
                   check=True)
    return out


def run_harness(harness, records):
    stdin = b"".join(b"\0" + struct.pack("<I", n) + data.ljust(MSG.size, b"\0")[:MSG.size] for n, data in records)
    out = subprocess.run([str(harness)], input=stdin, capture_output=True, check=True).stdout.decode().split()
    return [int(x) for x in out]


u32 = st.integers(0, 2**32 - 1)
near = st.sampled_from([0, 1, 2, 3, 4, 8, 15, 16, 17, 62, 63, 64, 65, 2**31, 2**32 - 1])


@st.composite
def messages(draw):
    ident = draw(st.integers(0, 20))
    good = draw(st.booleans())
    op = draw(st.sampled_from([abi.PYKVM_DIRECT_OPEN, abi.PYKVM_DIRECT_CLOSE])) if good else draw(u32)
    gpa = abi.PYKVM_DIRECT_GPA + ident * abi.PYKVM_DIRECT_STRIDE if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
    doorbell = abi.PYKVM_DIRECT_DOORBELL_BASE + ident if draw(st.booleans()) else draw(u32)
    data_pages = draw(st.sampled_from([0, 1, 16, 191, 192, 193]) | u32)
    data_gpa = (gpa + abi.PYKVM_DIRECT_DATA_OFFSET) % (1 << 64) if draw(st.booleans()) else \
        draw(st.sampled_from([0, gpa]) | st.integers(0, 2**64 - 1))
    fields = (op, ident, gpa, draw(near | u32), draw(near | u32), doorbell, draw(u32),
              draw(st.sampled_from([0, 1, 2, 3]) | u32), draw(st.sampled_from([0, 7, 8, 4096, 1 << 20, (1 << 20) + 1]) | u32),
              data_gpa, data_pages, draw(st.sampled_from([0, 512, 1000, 65536, 131072, 131584]) | u32))
    data = MSG.pack(*fields)
    n = MSG.size if draw(st.booleans()) else draw(st.integers(0, 64))
    return n, data


@settings(max_examples=25, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=200))
def test_guest_parser_matches_its_python_mirror(harness, records):
    assert run_harness(harness, records) == [mirror_check(d[:n]) if n < MSG.size else mirror_check(d)
                                             for n, d in records]


def test_guest_parser_accepts_what_the_root_sends(harness):
    ident = 3
    msg = MSG.pack(abi.PYKVM_DIRECT_OPEN, ident, direct.window_gpa(ident), 8, 4, abi.PYKVM_DIRECT_DOORBELL_BASE + ident,
                   abi.PYKVM_ECHO_V1_1, 1, 4096, 0, 0, 0)
    data = MSG.pack(abi.PYKVM_DIRECT_OPEN, ident, direct.window_gpa(ident), 8, 4, abi.PYKVM_DIRECT_DOORBELL_BASE + ident,
                    abi.PYKVM_BLOCK_V1_0, 0, 4160, direct.window_gpa(ident) + abi.PYKVM_DIRECT_DATA_OFFSET, 32, 65536)
    assert run_harness(harness, [(MSG.size, msg), (MSG.size - 1, msg), (MSG.size, data)]) == [0, -1, 0]


# ---------------------------------------------------------------- block over a direct channel: the request parser
BLKREQ = struct.Struct("<IIQIIII")          # struct pykvm_blk_request then struct pykvm_blk_buffer
BLK_HEAD = struct.Struct("<IIIIQ")          # harness record: length, data_bytes, max_transfer, rules, sectors


def mirror_blk(data: bytes, n: int, data_bytes: int, max_transfer: int, rules: int, sectors: int):
    """Python mirror of direct_blk_check(): the status, or (0, op, sector, count, offset, length)."""
    if n < 24:
        return -1
    op, _r, sector, count, _r2, offset, length = BLKREQ.unpack_from(data.ljust(40, b"\0"))
    if op in (abi.PYKVM_BLK_OP_INFO, abi.PYKVM_BLK_OP_FLUSH):
        return (0, op, sector, 0, 0, 0)
    if op not in (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE):
        return abi.PYKVM_BUS_E_INVALID
    if n < 32:
        return -1
    if not 1 <= count <= abi.PYKVM_BLK_MAX_SECTORS:
        return abi.PYKVM_BUS_E_INVALID
    if op == abi.PYKVM_BLK_OP_WRITE and rules & abi.PYKVM_DIRECT_RULE_READ_ONLY:
        return abi.PYKVM_BUS_E_READ_ONLY
    if count * 512 > max_transfer:
        return abi.PYKVM_BUS_E_LIMIT
    if length != count * 512 or offset > data_bytes or length > data_bytes - offset:
        return abi.PYKVM_BUS_E_INVALID
    if sector >= sectors or count > sectors - sector:
        return abi.PYKVM_BUS_E_INVALID
    return (0, op, sector, count, offset, length)


def run_blk_harness(harness, records):
    stdin = b"".join(b"\1" + BLK_HEAD.pack(n, db, mt, rules, sectors) + data.ljust(40, b"\0")[:40]
                     for data, n, db, mt, rules, sectors in records)
    out = subprocess.run([str(harness)], input=stdin, capture_output=True, check=True).stdout.decode().splitlines()
    return [int(x) if " " not in x else tuple(int(v) for v in x.split()) for x in out]


@st.composite
def blk_requests(draw):
    op = draw(st.sampled_from([1, 2, 3, 4]) | u32)
    count = draw(st.sampled_from([0, 1, 8, 16, 128, 255, 256, 257]) | u32)
    sector = draw(st.sampled_from([0, 1, 2047, 2048, 4095, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    length = count * 512 % (1 << 32) if draw(st.booleans()) else draw(u32)
    offset = draw(st.sampled_from([0, 512, 4096, 65536, 2**32 - 1]) | u32)
    data = BLKREQ.pack(op, draw(u32), sector, count, draw(u32), offset, length) + draw(st.binary(max_size=8))
    n = draw(st.sampled_from([len(data), 32, 24, 23, 31, 0]) | st.integers(0, 40))
    data_bytes = draw(st.sampled_from([0, 4096, 65536, 131072, 192 * 4096]))
    return (data, n, data_bytes, draw(st.sampled_from([0, 512, 8192, 65536, 131072]) | u32), draw(st.integers(0, 3)),
            draw(st.sampled_from([0, 1, 2048, 4096]) | st.integers(0, 2**64 - 1)))


@settings(max_examples=30, deadline=None)
@given(st.lists(blk_requests(), min_size=1, max_size=200))
def test_guest_block_request_parser_matches_its_python_mirror(harness, records):
    got = run_blk_harness(harness, records)
    want = [mirror_blk(d[:40], min(n, 40) if n < len(d) else n, db, mt, r, s) for d, n, db, mt, r, s in records]
    assert got == want
    for res, (_d, _n, db, mt, _r, s) in zip(got, records):   # what the service uses is inside what it checked
        if isinstance(res, tuple) and res[1] in (1, 2):
            _st, _op, sector, count, offset, length = res
            assert offset + length <= db and length == count * 512 <= mt and sector + count <= s


def test_guest_block_request_parser_refusals(harness):
    req = lambda op, sector, count, off, length: BLKREQ.pack(op, 0, sector, count, 0, off, length)
    R, W = abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE
    cases = [(req(R, 0, 8, 0, 4096), 32, 65536, 65536, 0, 2048),          # ok
             (req(W, 0, 8, 0, 4096), 32, 65536, 65536, 1, 2048),          # read-only client
             (req(R, 0, 128, 0, 65536), 32, 65536, 8192, 0, 2048),        # over its max transfer
             (req(R, 0, 8, 61441, 4096), 32, 65536, 65536, 0, 2048),      # past the data buffer
             (req(R, 2047, 2, 0, 1024), 32, 65536, 65536, 0, 2048),       # past the disk
             (req(R, 0, 8, 0, 4096), 31, 65536, 65536, 0, 2048),          # no buffer reference
             (req(abi.PYKVM_BLK_OP_INFO, 0, 0, 0, 0), 24, 0, 0, 1, 2048)]
    assert run_blk_harness(harness, cases) == [(0, R, 0, 8, 0, 4096), abi.PYKVM_BUS_E_READ_ONLY, abi.PYKVM_BUS_E_LIMIT,
                                               abi.PYKVM_BUS_E_INVALID, abi.PYKVM_BUS_E_INVALID, -1,
                                               (0, abi.PYKVM_BLK_OP_INFO, 0, 0, 0, 0)]


# ---------------------------------------------------------------- the service VMM's half
class FakeMemslots:
    def __init__(self):
        self.mapped = {}

    def map(self, gpa, size, host_addr, readonly=True):
        slot = len(self.mapped) + 100
        self.mapped[slot] = (gpa, size, readonly, host_addr)
        return slot

    def unmap(self, slot):
        del self.mapped[slot]


class FakeVM:
    fd = 3

    def __init__(self):
        self.ioeventfds, self.irqfds = set(), set()

    def ioeventfd(self, fd, port, width, datamatch=None, pio=False, deassign=False):
        key = (port, width, datamatch)
        (self.ioeventfds.discard if deassign else self.ioeventfds.add)(key)

    def irqfd(self, fd, gsi, deassign=False):
        (self.irqfds.discard if deassign else self.irqfds.add)(gsi)


class FakeInterrupts:
    def __init__(self, vm):
        self.vm, self.live = vm, {}

    def attach(self, fd, vector, apic_id=0):
        gsi = 40 + len(self.live)
        self.vm.irqfd(fd, gsi)
        self.live[gsi] = fd
        return SimpleNamespace(gsi=gsi, fd=fd)

    def free(self, irq):
        self.vm.irqfd(irq.fd, irq.gsi, deassign=True)
        del self.live[irq.gsi]
        os.close(irq.fd)


def fake_host():
    vm = FakeVM()
    return SimpleNamespace(doorbells=SimpleNamespace(vm=vm), memslots=FakeMemslots(), interrupts=FakeInterrupts(vm))


def test_service_end_maps_exactly_the_ring_pages_and_close_removes_everything():
    before = open_fds()
    client = memfd(64 * PAGE)
    os.pwrite(client, b"R" * PAGE, 10 * PAGE)
    host = fake_host()
    efd = os.eventfd(0)
    end = direct.ServiceEnd(host, 2, [client], [(0, 10 * PAGE, 8)], efd)
    (gpa, size, readonly, _a), = host.memslots.mapped.values()
    assert (gpa, size, readonly) == (direct.window_gpa(2), 8 * PAGE, False)
    assert end.view.read(0, 2) == b"RR" and end.doorbell == abi.PYKVM_DIRECT_DOORBELL_BASE + 2
    assert host.doorbells.vm.ioeventfds == {(abi.PYKVM_PORT_BUS_DOORBELL, 4, end.doorbell)}
    assert len(host.interrupts.live) == 1
    end.close()
    end.close()
    assert host.memslots.mapped == {} and host.doorbells.vm.ioeventfds == set() and host.interrupts.live == {}
    assert end.view is None and not end.mapped
    os.close(client)
    assert open_fds() == before


def test_service_end_maps_the_data_buffer_above_the_rings_and_close_removes_both():
    before = open_fds()
    ring, data = memfd(16 * PAGE), memfd(64 * PAGE)
    os.pwrite(data, b"D" * PAGE, 4 * PAGE)
    host = fake_host()
    end = direct.ServiceEnd(host, 1, [ring, data], [(0, 0, 8)], os.eventfd(0), [(1, 4 * PAGE, 16), (0, 8 * PAGE, 2)])
    maps = sorted((gpa, size, ro) for gpa, size, ro, _a in host.memslots.mapped.values())
    assert maps == [(direct.window_gpa(1), 8 * PAGE, False),
                    (direct.window_gpa(1) + abi.PYKVM_DIRECT_DATA_OFFSET, 18 * PAGE, False)]
    assert end.data_gpa == direct.window_gpa(1) + abi.PYKVM_DIRECT_DATA_OFFSET and end.data_view.read(0, 2) == b"DD"
    end.close()
    assert host.memslots.mapped == {} and end.data_view is None and not end.mapped
    # a data buffer past the end of its memfd: refused, nothing mapped or leaked
    with pytest.raises(direct.DirectError):
        direct.ServiceEnd(host, 1, [ring, data], [(0, 0, 8)], os.eventfd(0), [(1, 60 * PAGE, 8)])
    assert host.memslots.mapped == {} and host.interrupts.live == {} and host.doorbells.vm.ioeventfds == set()
    os.close(ring)
    os.close(data)
    assert open_fds() == before


@pytest.mark.parametrize("kind", ["unsealed", "short", "pipe"])
def test_service_end_refuses_bad_memory_and_leaks_nothing(kind):
    before = open_fds()
    r = w = None
    if kind == "unsealed":
        mem = os.memfd_create("x", os.MFD_CLOEXEC)
        os.ftruncate(mem, 64 * PAGE)
    elif kind == "short":
        mem = memfd(PAGE)
    else:
        r, w = os.pipe()
        mem = r
    host = fake_host()
    with pytest.raises(direct.DirectError):
        direct.ServiceEnd(host, 0, [mem], [(0, 0, 8)], os.eventfd(0))
    assert host.memslots.mapped == {} and host.interrupts.live == {} and host.doorbells.vm.ioeventfds == set()
    os.close(mem)
    if w is not None:
        os.close(w)
    assert open_fds() == before


# ---------------------------------------------------------------- the client VMM: data GPADL at open, strict teardown
def test_open_with_a_data_buffer_and_teardown_waits_for_the_service_side(tmp_path):
    from pykvm.bus import messages as M
    from pykvm.bus.host import BusHost, Limits
    from pykvm.bus.services.echo import EchoService
    from pykvm.memory import MIB, GuestMemory

    from .test_bus_host_hostile import LIMITS, V10, V11, Guest
    from .test_bus_messages import enc_msg

    class HoldingEcho(EchoService):
        """An echo offer served as a direct one is: the session holds both GPADLs until told they are unmapped."""
        name = "held-echo"
        offer_flags = abi.PYKVM_BUS_OFFER_FLAG_DATA_BUFFER

        def open(self, channel, version):
            sess = super().open(channel, version)
            self.ids = [channel.gpadl_id, channel.data_gpadl_id]
            self.data_pfns = list(channel.data_view.pfns) if channel.data_view is not None else None
            for gid in self.ids:
                if gid is not None:
                    channel.host.hold(gid)
            return sess

        def unmapped(self, host):
            for gid in self.ids:
                if gid is not None:
                    host.release(gid)

    mem = GuestMemory.create(2 * MIB, 1 * MIB)
    g = Guest(mem)
    g.host.close()
    held, plain = HoldingEcho(), EchoService()
    g.host = BusHost(mem, g.bells, g.irqs, [held, plain], limits=Limits(**LIMITS), log=g.logs.append)
    try:
        g.connect()
        g.drain()
        g.send(enc_msg(M.InitiateContact((V11, V10), 0)))
        g.send(enc_msg(M.RequestOffers()))
        g.drain()
        offers = {struct.unpack_from("<II", b)[0]: struct.unpack_from("<II", b)[1] for k, b in g.replies
                  if k == M.MSG["offer"]}
        assert offers == {1: abi.PYKVM_BUS_OFFER_FLAG_DATA_BUFFER, 2: 0}      # the flag tells the guest
        for gid, first, n in ((1, 200, 4), (2, 210, 2), (3, 220, 4), (4, 230, 2)):
            mem.write(first * PAGE, bytes(n * PAGE))
            g.send(enc_msg(M.GpadlHeader(gid, n, tuple(range(first, first + n)))))
            assert g.reply("gpadl_created", gid) == (gid, abi.PYKVM_BUS_OK)
        # a data buffer for an offer without the flag, or the ring's own GPADL as data: refused
        g.send(enc_msg(M.OpenChannel(2, 3, 2, 0, (abi.PYKVM_ECHO_V1_1,), 4)))
        assert g.reply("open_result", 2)[:2] == (2, abi.PYKVM_BUS_E_INVALID)
        g.send(enc_msg(M.OpenChannel(1, 1, 2, 0, (abi.PYKVM_ECHO_V1_1,), 1)))
        assert g.reply("open_result", 1)[:2] == (1, abi.PYKVM_BUS_E_INVALID)
        g.send(enc_msg(M.OpenChannel(1, 1, 2, 0, (abi.PYKVM_ECHO_V1_1,), 2)))
        assert g.reply("open_result", 1)[:2] == (1, abi.PYKVM_BUS_OK)
        assert held.data_pfns == [210, 211] and g.host.channels[1].data_gpadl_id == 2
        # the data buffer of an open channel is in use: no other channel may take it
        g.send(enc_msg(M.OpenChannel(2, 3, 2, 0, (abi.PYKVM_ECHO_V1_1,), 0)))
        assert g.reply("open_result", 2)[:2] == (2, abi.PYKVM_BUS_OK)
        # the guest closes and tears down: no TORNDOWN while the service side may still map the pages
        g.replies.clear()
        before = g.host.violations
        g.send(enc_msg(M.CloseChannel(1)))
        g.send(enc_msg(M.GpadlTeardown(2)))
        g.send(enc_msg(M.GpadlTeardown(1)))
        assert g.reply("gpadl_torndown") is None and {1, 2} <= set(g.host.gpadls)
        g.send(enc_msg(M.GpadlTeardown(1)))                 # again while waiting: a violation, nothing more
        assert g.reply("gpadl_torndown") is None and g.host.violations == before + 1
        with g.host.lock:
            held.unmapped(g.host.channel_mgmt)
        assert g.reply("gpadl_torndown", 1) == (1, 0) and g.reply("gpadl_torndown", 2) == (2, 0)
        assert not {1, 2} & set(g.host.gpadls)
        # a GPADL no direct channel holds is torn down at once, as always
        g.send(enc_msg(M.CloseChannel(2)))
        g.send(enc_msg(M.GpadlTeardown(3)))
        assert g.reply("gpadl_torndown", 3) == (3, 0)

        # UNLOAD with a direct channel open: its answer says every GPADL is gone, so it waits for the unmap
        g.send(enc_msg(M.GpadlHeader(5, 4, tuple(range(240, 244)))))
        assert g.reply("gpadl_created", 5) == (5, abi.PYKVM_BUS_OK)
        g.send(enc_msg(M.OpenChannel(1, 5, 2, 0, (abi.PYKVM_ECHO_V1_1,), 0)))
        assert g.reply("open_result", 1)[:2] == (1, abi.PYKVM_BUS_OK)
        g.replies.clear()
        g.send(enc_msg(M.Unload()))
        assert g.reply("unload_response") is None and g.host.state == "unloading"
        assert not g.host.channels[1].is_open and 5 not in g.host.gpadls   # closed, the host's view gone
        before = g.host.violations
        g.send(enc_msg(M.RequestOffers()))                                  # nothing more is served
        assert g.reply("offer") is None and g.host.violations == before + 1
        with g.host.lock:
            held.unmapped(g.host.channel_mgmt)
        assert g.reply("unload_response") is not None and g.host.state == "idle"

        # the host cuts the connection with a direct channel open: no new connection until the unmap
        assert g.connect() == abi.PYKVM_BUS_STATE_CONNECTED
        g.send(enc_msg(M.InitiateContact((V11, V10), 0)))
        g.send(enc_msg(M.RequestOffers()))
        g.send(enc_msg(M.GpadlHeader(1, 4, tuple(range(200, 204)))))
        assert g.reply("gpadl_created", 1) == (1, abi.PYKVM_BUS_OK)
        g.send(enc_msg(M.OpenChannel(1, 1, 2, 0, (abi.PYKVM_ECHO_V1_1,), 0)))
        assert g.reply("open_result", 1)[:2] == (1, abi.PYKVM_BUS_OK)
        g.host.disconnect("a broken ring")
        assert g.connect() == abi.PYKVM_BUS_STATE_REFUSED
        assert "still mapped by another partition's guest" in g.host.refusals[-1]
        with g.host.lock:
            held.unmapped(g.host.channel_mgmt)
        assert g.connect() == abi.PYKVM_BUS_STATE_CONNECTED
    finally:
        g.close()
        mem.close()


# ---------------------------------------------------------------- the broker: decision and relaying
TOPO = """
[[partition]]
name = "echo"
kernel = "bus-echosvc"
provides = "echo0"

[[partition]]
name = "client1"
kernel = "bus-echo"
uses = ["echo0"]

[[partition]]
name = "client2"
kernel = "bus-echo"
trust = "untrusted"
uses = ["echo0"]
"""


class Peer:
    """The partition end of a broker connection."""

    def __init__(self, relay, name):
        from pykvm.partitions.conn import Conn

        a, self.sock = socket.socketpair()
        self.conn = Conn(a, name)
        self.parser = wire.FrameParser()
        relay._frame(self.conn, wire.HELLO, wire.json_frame(wire.HELLO, {"name": name})[8:])
        self.welcome = wire.parse_json(self.frames()[0][1])

    def frames(self):
        self.sock.setblocking(False)
        out = []
        try:
            while True:
                data, fds = wire.recv(self.sock)
                if not data:
                    break
                out += self.parser.feed(data, fds)
        except BlockingIOError:
            pass
        return out


def relay_for(tmp_path, text=TOPO):
    from pykvm.partitions.relay import Relay

    p = tmp_path / "t.toml"
    p.write_text(text)
    return Relay(topology.load(p), log=lambda m: None)


def test_topology_direct_switch_defaults_to_trusted_only(tmp_path):
    t = topology.load((tmp_path / "a.toml", (tmp_path / "a.toml").write_text(TOPO))[0])
    assert t.by_name("client1").rules.direct is True and t.by_name("client2").rules.direct is False
    t = topology.load((tmp_path / "b.toml", (tmp_path / "b.toml").write_text(
        TOPO + "[policy.partition.client1]\ndirect = false\n"))[0])
    assert t.by_name("client1").rules.direct is False


def test_broker_relays_a_direct_open_with_its_descriptors_and_the_policy_rules(tmp_path):
    relay = relay_for(tmp_path)
    svc = Peer(relay, "echo")
    relay._frame(svc.conn, wire.REGISTER, wire.json_frame(wire.REGISTER, {"interface": "echo", "versions": [0x10001],
                                                                          "direct": True})[8:])
    c1, c2 = Peer(relay, "client1"), Peer(relay, "client2")
    assert c1.welcome["direct"] == {"echo0": None} and c1.welcome["interfaces"] == {"echo0": "echo"}
    assert "untrusted" in c2.welcome["direct"]["echo0"]
    before = open_fds()
    mem, efd = memfd(8 * PAGE), os.eventfd(0)
    desc = {"op": "open", "tag": 5, "index": 0, "runs": [[0, 0, 8]], "inbound_offset": 4, "version": 0x10001,
            "rules": 0, "max_message": 1 << 20}          # the client's own rules are ignored: the broker sets them
    relay._frame(c1.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, desc, 2)[8:], (os.dup(mem), os.dup(efd)))
    (f,) = svc.frames()
    fwd = wire.parse_json(f[1])
    assert f[0] == wire.DIRECT and len(f.fds) == 2 and fwd["client"] == "client1" and fwd["op"] == "open"
    assert (fwd["rules"], fwd["max_message"]) == (0, 64 << 10) and fwd["runs"] == [[0, 0, 8]]
    wire.close_fds(f.fds)
    # the provider answers with its eventfd: it goes to the client, with the client's tag
    sefd = os.eventfd(0)
    relay._frame(svc.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "ready", "tag": fwd["tag"], "ok": True},
                                                        1)[8:], (os.dup(sefd),))
    (r,) = c1.frames()
    assert wire.parse_json(r[1]) == {"op": "ready", "tag": 5, "ok": True} and len(r.fds) == 1
    wire.close_fds(r.fds)
    assert relay.policy_snapshot()["client1"]["direct"]["echo0"]["open"] == 1
    # the untrusted client asking anyway (a compromised VMM) is refused; its descriptors are closed
    relay._frame(c2.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, dict(desc, tag=6), 2)[8:], (os.dup(mem), os.dup(efd)))
    (r,) = c2.frames()
    assert wire.parse_json(r[1])["ok"] is False and "untrusted" in wire.parse_json(r[1])["reason"] and not r.fds
    assert svc.frames() == []
    # the client goes away: the provider is told to unmap at once
    relay._drop(c1.conn, None)
    (f,) = svc.frames()
    assert wire.parse_json(f[1])["op"] == "close" and wire.parse_json(f[1])["tag"] == fwd["tag"]
    assert relay.counts["direct_opened"] == 1 and relay.counts["direct_refused"] == 1 and relay.direct == {}
    for fd in (mem, efd, sefd):
        os.close(fd)
    assert open_fds() == before - 1          # the broker's end of client1's link went with it; nothing else stays


BLOCK_TOPO = TOPO.replace('kernel = "bus-echosvc"\nprovides = "echo0"', 'kernel = "bus-blocksvc"\nprovides = "echo0"')


def test_broker_forwards_the_data_buffer_and_acknowledges_every_close_once_unmapped(tmp_path):
    relay = relay_for(tmp_path, BLOCK_TOPO)
    svc = Peer(relay, "echo")
    relay._frame(svc.conn, wire.REGISTER, wire.json_frame(wire.REGISTER, {"interface": "block", "versions": [0x10000],
                                                                          "direct": True})[8:])
    c1 = Peer(relay, "client1")
    assert c1.welcome["direct"] == {"echo0": None}
    svc.frames()
    mem, efd = memfd(8 * PAGE), os.eventfd(0)

    def open_direct(tag):
        desc = {"op": "open", "tag": tag, "index": 0, "runs": [[0, 0, 8]], "inbound_offset": 4, "version": 0x10000,
                "data_runs": [[0, 0, 4]], "max_transfer": 512}     # the client's max_transfer is ignored
        relay._frame(c1.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, desc, 2)[8:], (os.dup(mem), os.dup(efd)))
        (f,) = svc.frames()
        wire.close_fds(f.fds)
        fwd = wire.parse_json(f[1])
        assert fwd["data_runs"] == [[0, 0, 4]] and fwd["max_transfer"] == 256 * 512
        relay._frame(svc.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "ready", "tag": fwd["tag"], "ok": True},
                                                            1)[8:], (os.eventfd(0),))
        (r,) = c1.frames()
        wire.close_fds(r.fds)
        return fwd["tag"]

    btag = open_direct(5)
    relay._frame(c1.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "close", "tag": 5})[8:])
    (f,) = svc.frames()
    assert wire.parse_json(f[1])["op"] == "close" and c1.frames() == []     # not yet: the provider has not unmapped
    relay._frame(svc.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": btag})[8:])
    (r,) = c1.frames()
    assert wire.parse_json(r[1]) == {"op": "closed", "tag": 5}
    relay._frame(svc.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": btag})[8:])
    assert c1.frames() == []                                 # a second acknowledgement is nothing
    # a close of a channel the broker never forwarded: nothing is mapped anywhere, acknowledged at once
    relay._frame(c1.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "close", "tag": 99})[8:])
    (r,) = c1.frames()
    assert wire.parse_json(r[1]) == {"op": "closed", "tag": 99}
    # the provider dies before acknowledging: known dead, so the close is acknowledged (after "down")
    open_direct(6)
    relay._frame(c1.conn, wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "close", "tag": 6})[8:])
    svc.frames()
    relay._drop(svc.conn, None)
    got = [wire.parse_json(f[1]) for f in c1.frames()]
    assert {"op": "closed", "tag": 6} in got and relay.direct_closing == {}
    os.close(mem)
    os.close(efd)


def test_link_runs_the_unmapped_callback_on_the_acknowledgement_or_when_the_service_is_down():
    import threading

    from pykvm.bus.link import PartitionLink

    a, b = socket.socketpair()
    link = PartitionLink(a, {"name": "client1", "uses": ["disk0"], "provides": None}, log=lambda m: None)
    link.bus = SimpleNamespace(lock=threading.RLock(), channels={})
    done = []
    link.close_direct(3, "disk0", lambda: done.append(3))
    link.close_direct(4, "disk0", lambda: done.append(4))
    link._dispatch(wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": 3})[8:], ())
    assert done == [3]
    link.service_state("disk0", "down")
    assert done == [3, 4] and link._closing == {}
    link._dispatch(wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": 4})[8:], ())
    assert done == [3, 4]
    # the provider's side: a close with no provider session (its close unmapped everything) is acknowledged
    link._dispatch(wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "close", "tag": 8})[8:], ())
    b.setblocking(False)
    frames = wire.FrameParser().feed(b.recv(1 << 16))
    assert {"op": "closed", "tag": 8} in [wire.parse_json(f[1]) for f in frames]
    # the broker goes away: nobody can confirm an unmap any more, so nothing is released (strict teardown)
    got = []
    link.close_direct(9, "disk0", lambda: done.append(9))
    link._direct[10] = lambda ok, reason, fd, unmapped=True: got.append((ok, unmapped))
    b.close()
    link._broker_gone()
    assert done == [3, 4] and got == [(False, False)] and 9 in link._closing


def test_broker_refuses_echo_registered_without_direct(tmp_path):
    relay = relay_for(tmp_path)
    svc = Peer(relay, "echo")
    with pytest.raises(wire.WireError, match="does not provide"):
        relay._frame(svc.conn, wire.REGISTER, wire.json_frame(wire.REGISTER, {"interface": "echo",
                                                                              "versions": [0x10001]})[8:])


# ---------------------------------------------------------------- end to end
E2E = """
[[partition]]
name = "echo"
kernel = "bus-echosvc"
provides = "echo0"
cmdline = "crash_after=30"
restarts = 1

[[partition]]
name = "client1"
kernel = "bus-echo"
cmdline = "n=60 size=256 reopen=1"
uses = ["echo0"]

[[partition]]
name = "client2"
kernel = "bus-echo"
cmdline = "n=5 reopen=1"
trust = "untrusted"
uses = ["echo0"]

[[partition]]
name = "hostile"
kernel = "bus-echo"
cmdline = "n=3 hostile=scribble flood=20000 reopen=1"
uses = ["echo0"]
"""


def test_up_direct_echo_policy_crash_reoffer_hostile_and_no_mapping_survives(tmp_path):
    run, out, err, logs = pykvm_up(tmp_path, E2E)
    serials = {f.name: f.read_text() for f in run.glob("*.serial")}
    assert "partition echo: status 0 (restarts 1)" in out
    for name in ("client1", "client2", "hostile"):
        assert f"partition {name}: status 0" in out
    # the trusted client: every message echoed by the service guest, across its crash (rescind, re-offer, reopen)
    c1 = serials["client1.serial"]
    assert "echo: channel rescinded, waiting for a new offer\necho: reopened, version 1.1\n" in c1
    assert "echo: 60 messages of 256 bytes ok\n" in c1
    assert "its provider went away; offer" in logs["client1.log"] and "served again" in logs["client1.log"]
    svc0, svc1 = serials["echo.serial"], serials["echo.gen1.serial"]
    assert "echosvc: echoed 30 messages, crashing\n" in svc0 and list((run / "echo-crashes").glob("*.core"))
    assert "channel 0 open, version 1.1, rules 0, max 65536" in svc0 + svc1
    # the untrusted client was not given the direct channel: the broker said why
    assert "echo0: not offered: client2 is untrusted and its policy says direct = false" in logs["client2.log"]
    policy = json.loads((run / "broker-policy.json").read_text())
    assert policy["policy"]["client2"]["direct"]["echo0"]["allowed"] is False
    assert policy["policy"]["client1"]["direct"]["echo0"]["allowed"] is True
    counts = policy["counts"]
    assert counts["direct_opened"] >= 3 and counts["direct_refused"] == 0
    # the hostile client broke only its own channel; its doorbell flood woke no broker (20000 doorbells)
    assert "echo: scribbled the ring, rang 20000 doorbells\n" in serials["hostile.serial"]
    assert "broken (ring), closed\n" in svc0 + svc1
    assert counts["wakeups"] < 2000
    woke = [tuple(map(int, m)) for m in re.findall(r"doorbell thread woke (\d+) times, its link thread (\d+) times",
                                                    logs["echo.log"] + logs.get("echo.gen1.log", ""))]
    assert woke and all(d < 1000 and k < 1000 for d, k in woke), woke   # the service VMM: not per doorbell either
    # every channel the service guest saw closed had its window unmapped in KVM before it was told
    # (a channel the service guest closed itself, the hostile one, is probed too: at least one per close)
    closes = (svc0 + svc1).count("closed by the root")
    assert closes >= 1 and (svc0 + svc1).count("window after close: unmapped\n") >= closes
    assert "still mapped" not in svc0 + svc1


BLOCK_E2E = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
memory = "16M"
disk = "STORE"
provides = "disk0"
cmdline = "store=disk direct=1 crash_after=30 crash_mixed=1"
restarts = 1

[[partition]]
name = "fast"
kernel = "bus-block"
cmdline = "wsec=100 wcount=40 seed=3 rounds=4 reopen_ms=120000"
uses = ["disk0"]

[[partition]]
name = "slow"
kernel = "bus-block"
cmdline = "wsec=300 wcount=32 seed=5 rounds=3 reopen_ms=120000"
trust = "untrusted"
uses = ["disk0"]

[[partition]]
name = "reader"
kernel = "bus-block"
cmdline = "wsec=500 wcount=16 seed=9 reopen_ms=120000"
uses = ["disk0"]

[[partition]]
name = "hostile"
kernel = "bus-block"
cmdline = "hostile=direct flood=20000 reopen_ms=120000"
uses = ["disk0"]

[policy.partition.slow]
write = true

[policy.partition.reader]
write = false
"""


def _pattern(seed, s):
    """Sector s of bus-block's write pattern for seed (seed 0: the disk as the test made it)."""
    return bytes((seed * 73 + s * 151 + i * 7 + (i >> 8)) & 0xff for i in range(512))


def test_up_direct_block_policy_crash_reoffer_on_both_paths_hostile_and_no_mapping_survives(tmp_path):
    store = tmp_path / "store.img"
    store.write_bytes(b"".join(_pattern(0, s) for s in range(2048)))
    run, out, err, logs = pykvm_up(tmp_path, BLOCK_E2E.replace("STORE", str(store)))
    serials = {f.name: f.read_text() for f in run.glob("*.serial")}
    assert "partition storage: status 0 (restarts 1)" in out, out
    for name in ("fast", "slow", "reader", "hostile"):
        assert f"partition {name}: status 0" in out, out
    svc0, svc1 = serials["storage.serial"], serials["storage.gen1.serial"]
    svc = svc0 + svc1
    # the service crashed once, after serving requests on both paths, and wrote its core
    assert re.search(r"blocksvc: served \d+ requests, crashing\n$", svc0) and list((run / "storage-crashes").glob("*.core"))
    # the trusted client went direct (its data buffer mapped in the service guest), saw the rescind, reopened
    # directly again and read back every sector it wrote, round after round
    fast = serials["fast.serial"]
    assert fast.count("block: direct channel, data buffer of 32 pages\n") == 2
    assert "block: channel rescinded, waiting for a new offer\nblock: reopened, version 1.0\n" in fast
    assert "block: read back 40 sectors at 100: pattern ok\n" in fast and "block: 4 rounds done, 1 reopens\n" in fast
    assert fast.endswith("block: done\n") and "differs" not in fast
    # the untrusted client stayed brokered (refused direct by policy) and came through the crash the same way
    slow = serials["slow.serial"]
    assert "direct channel" not in slow and "block: 3 rounds done, 1 reopens\n" in slow
    assert "block: channel rescinded, waiting for a new offer\nblock: reopened, version 1.0\n" in slow
    assert "block: read back 32 sectors at 300: pattern ok\n" in slow and slow.endswith("block: done\n")
    policy = json.loads((run / "broker-policy.json").read_text())
    assert policy["policy"]["slow"]["direct"]["disk0"]["allowed"] is False
    assert "slow is untrusted and its policy says direct = false" in policy["policy"]["slow"]["direct"]["disk0"]["why"]
    assert policy["policy"]["fast"]["direct"]["disk0"]["allowed"] is True
    assert policy["counts"]["relayed"] > 0 and policy["counts"]["direct_opened"] >= 4
    # the read-only client: direct too, its write refused by the service guest under the rule the broker sent
    reader = serials["reader.serial"]
    assert "block: direct channel" in reader and "read-only 1\n" in reader
    assert "block: write refused: read-only\n" in reader and reader.endswith("block: done\n")
    assert re.search(r"channel \d+ open, version 1.0, rules 1, max 65536, data 32 pages, max transfer 131072\n", svc)
    # the hostile client: its bad offsets and sizes refused, its broken ring closed its own channel alone, and its
    # doorbell flood woke neither the broker nor the service VMM per doorbell
    hostile = serials["hostile.serial"]
    assert "block: hostile: 4 bad requests refused\n" in hostile
    assert "block: hostile: scribbled the ring, rang 20000 doorbells\n" in hostile
    assert "broken (ring), closed\n" in svc
    assert policy["counts"]["wakeups"] < 3000
    woke = [tuple(map(int, m)) for m in re.findall(r"doorbell thread woke (\d+) times, its link thread (\d+) times",
                                                    logs["storage.log"] + logs.get("storage.gen1.log", ""))]
    assert woke and all(d < 1000 for d, _k in woke), woke
    # no mapping survives: every channel the service guest saw closed had its rings and data buffer unmapped in
    # KVM before it was told; the clients' VMMs gave their guests the pages back only after the service side
    # said so (or died)
    closes = svc.count("closed by the root")
    assert closes >= 1 and svc.count("window after close: unmapped\n") >= closes and "still mapped" not in svc
    for name in ("fast", "reader"):
        assert "the service side no longer maps its pages; GPADLs" in logs[f"{name}.log"], logs[f"{name}.log"]
    # the host file: the last round of each writer, the rest as it was (the reader wrote nothing)
    disk = store.read_bytes()
    for s in list(range(90, 150)) + list(range(290, 340)) + list(range(490, 520)):
        want = _pattern(6, s) if 100 <= s < 140 else _pattern(7, s) if 300 <= s < 332 else _pattern(0, s)
        assert disk[s * 512:(s + 1) * 512] == want, s


# ---------------------------------------------------------------- the client VMM's half
class RefusingVM(FakeVM):
    def irqfd(self, fd, gsi, deassign=False):
        if not deassign:
            raise OSError(22, "Invalid argument")     # KVM: not an eventfd
        super().irqfd(fd, gsi, deassign)


def test_client_end_wires_both_doorbells_and_close_undoes_them():
    before = open_fds()
    vm = FakeVM()
    end = direct.ClientEnd(vm, 7, SimpleNamespace(gsi=30))
    assert vm.ioeventfds == {(abi.PYKVM_PORT_BUS_DOORBELL, 4, 7)} and not end.wired
    end.attach(os.eventfd(0))
    assert vm.irqfds == {30} and end.wired
    end.close()
    end.close()
    assert vm.ioeventfds == set() and vm.irqfds == set() and open_fds() == before


def test_client_end_refuses_a_service_descriptor_kvm_will_not_take():
    before = open_fds()
    end = direct.ClientEnd(RefusingVM(), 7, SimpleNamespace(gsi=30))
    r, w = os.pipe()
    with pytest.raises(direct.DirectError, match="doorbell"):
        end.attach(r)                                 # owned and closed by attach
    end.close()
    os.close(w)
    assert open_fds() == before


def test_link_closes_descriptors_of_a_direct_open_it_cannot_serve():
    from pykvm.bus.link import PartitionLink

    a, b = socket.socketpair()
    link = PartitionLink(a, {"name": "echo", "uses": [], "provides": "echo0"}, log=lambda m: None)
    link.bus = SimpleNamespace(lock=__import__("threading").RLock(), channels={})
    before = open_fds()
    mem, efd = memfd(8 * PAGE), os.eventfd(0)
    link._dispatch(wire.DIRECT, wire.json_frame(wire.DIRECT, dict(good_open(), op="open", tag=3), 2)[8:], (mem, efd))
    assert open_fds() == before                       # no provider: both closed, the open refused
    b.setblocking(False)
    (f,) = wire.FrameParser().feed(b.recv(1 << 16))
    assert wire.parse_json(f[1]) == {"op": "ready", "tag": 3, "ok": False,
                                     "reason": "the service partition's guest is not serving"}
    with pytest.raises(wire.WireError):
        link._dispatch(wire.DIRECT, wire.json_frame(wire.DIRECT, {"op": "open"})[8:], ())
    a.close()
    b.close()
