"""Transfer by memory map change (issue 12): descriptor frames, remap descriptors, the window, a topology."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.bus import remap, wire
from pykvm.bus.policy import UNTRUSTED, Ledger, Rules, TopologyPolicy
from pykvm.bus.ring import GPA_DIRECT
from pykvm.memory.guest import GuestMemory

from .helpers import pykvm_up

PAGE = 4096
SECTOR = abi.PYKVM_BLK_SECTOR


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    """A memfd of size bytes sealed as guest RAM is (seals=0: unsealed, as a hostile client could send)."""
    fd = os.memfd_create("remap-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


# ---------------------------------------------------------------- wire: frames with descriptors
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(wire.KINDS)), st.binary(max_size=100), st.integers(0, wire.MAX_FDS)),
                max_size=6), st.integers(1, 40))
def test_descriptors_come_out_with_their_frames_in_any_split(frames, step):
    """Descriptors fed with a frame's first byte come out attached to that frame, whatever the split."""
    frames = [(k, b, n if k == wire.REMAP else 0) for k, b, n in frames]
    stream = b""
    starts = []
    fake = iter(range(1000, 2000))              # numbers only: the parser never touches them unless dropped
    for k, b, n in frames:
        starts.append((len(stream), [next(fake) for _ in range(n)]))
        stream += wire.frame(k, b, n)
    p = wire.FrameParser()
    got = []
    pending = list(starts)
    for i in range(0, len(stream), step):
        fds = []
        while pending and pending[0][0] < i + step:
            fds += pending.pop(0)[1]
        got += p.feed(stream[i:i + step], fds)
    assert [(f[0], f[1]) for f in got] == [(k, b) for k, b, _n in frames]
    assert [list(f.fds) for f in got] == [fds for _s, fds in starts]
    assert p.pending == 0 and p.pending_fds == 0


def test_descriptor_refusals_close_what_was_received():
    before = open_fds()
    r, w = os.pipe()
    with pytest.raises(wire.WireError, match="descriptors"):      # a request may carry none
        wire.FrameParser().feed(wire._HEADER_FDS.pack(0, wire.REQUEST, 1), [r])
    p = wire.FrameParser()
    with pytest.raises(wire.WireError, match="arrived"):          # named but never sent
        p.feed(wire.frame(wire.REMAP, b"x" * 40, 2), [w])
    p.close()
    with pytest.raises(wire.WireError, match="ahead of their frames"):
        wire.FrameParser().feed(b"", list(range(3000, 3000 + wire.MAX_QUEUED_FDS + 1)))
    with pytest.raises(ValueError):
        wire.frame(wire.REQUEST, b"", 1)
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass
    assert open_fds() == before


def test_descriptors_cross_a_real_socket():
    a, b = socket.socketpair()
    fd = memfd(PAGE)
    try:
        wire.send(a, wire.frame(wire.REMAP, b"r" * 48, 1) + wire.frame(wire.REPLY, b"y" * 40), [fd])
        p = wire.FrameParser()
        frames = []
        while len(frames) < 2:
            data, fds = wire.recv(b)
            frames += p.feed(data, fds)
        assert [f[0] for f in frames] == [wire.REMAP, wire.REPLY]
        (got,) = frames[0].fds
        assert got != fd and os.fstat(got).st_ino == os.fstat(fd).st_ino and frames[1].fds == ()
        os.close(got)
    finally:
        os.close(fd)
        a.close()
        b.close()


# ---------------------------------------------------------------- remap descriptors
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 5), st.integers(0, 1 << 20))
def test_remap_descriptor_garbage_only_raises_remap_error(data, nfds, nbytes):
    try:
        offset, runs = remap.parse(data, nfds, nbytes)
    except remap.RemapError:
        return
    pages = sum(n for _i, _o, n in runs)
    assert offset < PAGE and pages == (offset + nbytes + PAGE - 1) // PAGE <= remap.MAX_PAGES
    assert all(i < nfds and o % PAGE == 0 for i, o, _n in runs)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, PAGE - 1), st.integers(1, abi.PYKVM_BLK_MAX_SECTORS), st.data())
def test_remap_descriptor_round_trips(offset, count, data):
    nbytes = count * SECTOR
    pages = (offset + nbytes + PAGE - 1) // PAGE
    cuts = sorted(data.draw(st.sets(st.integers(1, pages - 1), max_size=min(pages - 1, remap.MAX_RUNS - 1)))) \
        if pages > 1 else []
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [pages])]
    runs = [(k % 2, data.draw(st.integers(0, 1000)) * PAGE, n) for k, n in enumerate(sizes)]
    assert remap.parse(remap.pack(offset, runs), 2, nbytes) == (offset, runs)


@pytest.mark.parametrize("mutate, needle", [
    (lambda o, r: (o, [(2, 0, r[0][2])]), "descriptor 2 of 2"),
    (lambda o, r: (o, [(0, 100, r[0][2])]), "pages at 0x64"),
    (lambda o, r: (o, [(0, 0, r[0][2] + 1)]), "pages for"),
    (lambda o, r: (PAGE, r), "not inside the first page"),
])
def test_remap_descriptor_refusals(mutate, needle):
    offset, runs = mutate(256, [(0, 0, 17)])
    with pytest.raises(remap.RemapError, match=needle):
        remap.parse(remap.pack(offset, runs), 2, 128 * SECTOR)


# ---------------------------------------------------------------- client side: which buffers remap
@pytest.fixture
def mem():
    m = GuestMemory.create(1 << 20, abi.PYKVM_MMIO_HOLE)
    yield m
    m.close()


def test_plan_maps_exactly_the_buffer_pages(mem):
    # 16 sectors from 0x300 in page 16: three pages; then a page-aligned second range continuing the bytes
    one = remap.plan(mem, [(16 * SECTOR, 0x300, [16, 17, 18])], 16 * SECTOR)
    assert one is not None and one[0] == 0x300 and [(o, n) for _r, o, n in one[1]] == [(16 * PAGE, 3)]
    two = remap.plan(mem, [(PAGE - 0x200, 0x200, [40]), (PAGE, 0, [7])], PAGE - 0x200 + PAGE)
    assert [(o, n) for _r, o, n in two[1]] == [(40 * PAGE, 1), (7 * PAGE, 1)]


@pytest.mark.parametrize("ranges, nbytes", [
    ([(1024, 0, [5]), (1024, 0, [6])], 2048),           # a hole after the first range
    ([(PAGE, 0, [5]), (512, 8, [6])], PAGE + 512),      # a hole before the second
    ([(PAGE, 0, [5]), (PAGE, 0, [5])], 2 * PAGE),       # the same page twice
    ([(PAGE, 0, [10_000])], PAGE),                      # not guest RAM
    ([(2 * PAGE, 0, [5])], 2 * PAGE),                   # too few pages
    ([(PAGE, 0, [5])], 512),                            # length differs from the request
])
def test_plan_falls_back_to_copy(mem, ranges, nbytes):
    assert remap.plan(mem, ranges, nbytes) is None


def test_check_fd_accepts_only_long_enough_shared_memory(tmp_path):
    r, w = os.pipe()
    fd = memfd(2 * PAGE)
    try:
        with pytest.raises(remap.RemapError, match="not"):
            remap.check_fd(r, PAGE)
        with pytest.raises(remap.RemapError, match="a run ends at"):
            remap.check_fd(fd, 3 * PAGE)
        remap.check_fd(fd, 2 * PAGE)
    finally:
        for x in (r, w, fd):
            os.close(x)


def test_check_fd_refuses_a_memfd_that_can_shrink():
    """An unsealed memfd could be truncated under the service VMM's mapping (SIGBUS there): refused."""
    for seals in (0, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE):
        fd = memfd(2 * PAGE, seals)
        try:
            with pytest.raises(remap.RemapError, match="not sealed against shrinking"):
                remap.check_fd(fd, PAGE)
        finally:
            os.close(fd)
    fd = os.memfd_create("remap-test", os.MFD_CLOEXEC)        # no MFD_ALLOW_SEALING: sealed with F_SEAL_SEAL only
    os.ftruncate(fd, 2 * PAGE)
    try:
        with pytest.raises(remap.RemapError, match="not sealed against shrinking"):
            remap.check_fd(fd, PAGE)
    finally:
        os.close(fd)


def test_guest_ram_cannot_be_truncated_or_unsealed():
    """Guest RAM memfds carry F_SEAL_SHRINK (and F_SEAL_SEAL): a receiver may map them safely."""
    from pykvm.memory.region import MemoryRegion

    r = MemoryRegion(0, 4 * PAGE)
    try:
        seals = fcntl.fcntl(r.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(r.fd, PAGE)
        with pytest.raises(PermissionError):
            fcntl.fcntl(r.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        os.ftruncate(r.fd, 8 * PAGE)                   # growing stays possible (no region needs it today)
        assert os.fstat(r.fd).st_size == 8 * PAGE
        remap.check_fd(r.fd, 4 * PAGE)
        r.view[PAGE] = 7                                # the mapping is untouched
        assert r.view[PAGE] == 7
    finally:
        r.close()


# ---------------------------------------------------------------- service side: the window
class FakeMemslots:
    def __init__(self):
        self.mapped = {}
        self.next = 200

    def map(self, gpa, size, host_addr, readonly=True):
        self.next += 1
        self.mapped[self.next] = (gpa, size, readonly, host_addr)
        return self.next

    def unmap(self, slot):
        del self.mapped[slot]


class FakeLink:
    def __init__(self):
        self.replies = []
        self.logs = []

    def reply(self, tag, resp, data, declined=False):
        self.replies.append((tag, resp[0], bytes(data), declined))

    def provider_up(self, *a, **k):
        pass

    def provider_down(self, session, reason=None):
        pass

    def log(self, msg):
        self.logs.append(msg)


class FakeChannel:
    def __init__(self):
        self.host = SimpleNamespace(memslots=FakeMemslots())
        self.writer = object()
        self.sent = []
        self.closed_reason = None

    def send(self, ptype, payload, trans_id, *rest):
        self.sent.append((ptype, bytes(payload), trans_id))


def provider_session(version=abi.PYKVM_PROVIDER_V1_1):
    from pykvm.bus.services.provider import ProviderSession

    ch = FakeChannel()
    return ProviderSession(ch, version, FakeLink()), ch


def completion(trans_id, status=abi.PYKVM_BUS_OK):
    from pykvm.bus.ring import COMPLETION

    return SimpleNamespace(type=COMPLETION, trans_id=trans_id, payload=struct.pack("<IIQII", status, 0, 2048, 512, 0))


def test_window_maps_the_client_pages_for_the_request_only():
    before = open_fds()
    client = memfd(64 * PAGE)
    os.pwrite(client, b"A" * PAGE + b"B" * PAGE + b"C" * PAGE, 10 * PAGE)
    s, ch = provider_session()
    s.registered = ("block", (abi.PYKVM_BLOCK_V1_0,))
    fd = os.dup(client)
    desc = remap.pack(0x100, [(0, 11 * PAGE, 2)])           # only pages 11 and 12 ("B", "C")
    s.submit_remap(7, (abi.PYKVM_BLK_OP_WRITE, abi.PYKVM_BLOCK_V1_0, 4, 8, abi.PYKVM_PROVIDER_REQ_REMAPPED), desc, (fd,))
    (slot, (gpa, size, readonly, host)), = ch.host.memslots.mapped.items()
    assert (gpa, size, readonly) == (remap.WINDOW_GPA, 2 * PAGE, True)    # the guest only reads a client write
    assert s.window.view.read(0, 1) == b"B" and s.window.view.read(PAGE, 1) == b"C"
    blk = struct.unpack_from("<IIQII", ch.sent[0][1])
    rm = struct.unpack_from("<QII", ch.sent[0][1], 24)
    assert blk == (abi.PYKVM_BLK_OP_WRITE, abi.PYKVM_BLOCK_V1_0, 4, 8, abi.PYKVM_PROVIDER_REQ_REMAPPED)
    assert rm == (remap.WINDOW_GPA + 0x100, 8 * SECTOR, 0)
    s.on_packet(completion(7))
    assert ch.host.memslots.mapped == {} and s.window is None
    assert s.link.replies == [(7, abi.PYKVM_BUS_OK, b"", False)]
    assert s.counts == {"remapped": 1, "declined": 0, "unmapped": 1}
    os.close(client)
    assert open_fds() == before


@pytest.mark.parametrize("blk, desc, nfds, kind", [
    ((abi.PYKVM_BLK_OP_READ, 0, 0, 8, 0), remap.pack(0, [(0, 0, 2)]), 1, "pages for"),
    ((abi.PYKVM_BLK_OP_READ, 0, 0, 8, 0), remap.pack(0, [(1, 0, 1)]), 1, "descriptor"),
    ((abi.PYKVM_BLK_OP_FLUSH, 0, 0, 8, 0), remap.pack(0, [(0, 0, 1)]), 1, "operation"),
    ((abi.PYKVM_BLK_OP_READ, 0, 0, 8, 0), remap.pack(0, [(0, 1 << 20, 1)]), 1, "run ends"),
    ((abi.PYKVM_BLK_OP_READ, 0, 0, 8, 0), remap.pack(0, [(0, 0, 1)]), 0, "pipe"),
    ((abi.PYKVM_BLK_OP_READ, 0, 0, 8, 0), b"\xff" * 7, 1, "bytes"),
])
def test_bad_remapped_requests_are_declined_and_leak_nothing(blk, desc, nfds, kind):
    before = open_fds()
    s, ch = provider_session()
    r, w = os.pipe()
    fds = (memfd(PAGE),) * nfds if kind != "pipe" else (r,)
    if kind == "pipe":
        os.close(w)
        r = w = None
    s.submit_remap(3, blk, desc, fds)
    if s.inflight is None:
        assert s.link.replies == [(3, abi.PYKVM_BUS_E_IO, b"", True)] and s.counts["declined"] == 1
    assert ch.host.memslots.mapped == {} and ch.sent == []
    for x in (r, w):
        if x is not None:
            os.close(x)
    assert open_fds() == before


def test_v1_0_guest_gets_no_remapped_request_and_close_unmaps():
    s, ch = provider_session(abi.PYKVM_PROVIDER_V1_0)
    s.submit_remap(1, (abi.PYKVM_BLK_OP_READ, 0, 0, 8, 0), remap.pack(0, [(0, 0, 1)]), (memfd(PAGE),))
    assert s.link.replies[0][3] is True and ch.sent == []
    s, ch = provider_session()
    before = open_fds()
    fds = [memfd(PAGE) for _ in range(4)]
    for tag, fd in enumerate(fds, 1):
        s.submit_remap(tag, (abi.PYKVM_BLK_OP_READ, 0, 0, 1, 0), remap.pack(0, [(0, 0, 1)]), (fd,))
    assert len(ch.host.memslots.mapped) == 1 and len(s.queue) == 3       # one window at a time
    assert list(ch.host.memslots.mapped.values())[0][2] is False          # a client read: writable for the guest
    s.cancel(1)
    assert ch.host.memslots.mapped == {} and s.window is None             # the client went away: unmapped at once
    s.close()
    assert len(s.queue) == 0 and open_fds() == before and "1 unmapped" in s.link.logs[0]


# ---------------------------------------------------------------- client side: the proxy
class FakeClientLink:
    def __init__(self, decline=False):
        self.remaps = []
        self.copies = []
        self.decline = decline
        self.logs = []

    def request_remap(self, index, blk, desc, fds, cb):
        self.remaps.append((blk, desc, list(fds)))
        cb(None if self.decline else (abi.PYKVM_BUS_OK, 0, 2048, 512, 0), b"")
        return len(self.remaps)

    def request(self, index, blk, data, cb):
        self.copies.append((blk, len(data)))
        cb((abi.PYKVM_BUS_OK, 0, 2048, 512, 0), b"\0" * (blk[3] * SECTOR if blk[0] == abi.PYKVM_BLK_OP_READ else 0))

    def log(self, msg):
        self.logs.append(msg)


def proxy(mem, rules, decline=False):
    from pykvm.bus.services.proxy import BlockProxyService

    agent = TopologyPolicy({"c": rules}, {"c": ("disk0",)})
    ledger = Ledger(agent, "c", log=lambda m: None)
    svc = BlockProxyService(FakeClientLink(decline), 0, "disk0", ledger, remap_min=rules.remap_min_bytes)
    ch = SimpleNamespace(host=SimpleNamespace(memory=mem), sent=[], guest_read=mem.read, guest_write=mem.write)
    ch.send = lambda ptype, payload, trans_id, *r: ch.sent.append(struct.unpack_from("<I", payload)[0])
    return svc.open(ch, abi.PYKVM_BLOCK_V1_0), svc, ledger, ch


def read_pkt(count, offset=0):
    pages = (offset + count * SECTOR + PAGE - 1) // PAGE
    payload = struct.pack("<IIQII", abi.PYKVM_BLK_OP_READ, 0, 0, count, 0)
    return SimpleNamespace(type=GPA_DIRECT, trans_id=9, payload=payload,
                           ranges=[(count * SECTOR, offset, list(range(32, 32 + pages)))])


def test_proxy_remaps_large_requests_copies_small_and_falls_back(mem):
    s, svc, ledger, ch = proxy(mem, Rules())
    s.on_packet(read_pkt(64, 0x300))              # 32 KiB: remapped, one request, no data copied
    s.on_packet(read_pkt(7))                      # 3.5 KiB: under remap_min (a page), by copy
    assert len(svc.link.remaps) == 1 and [b[3] for b, _n in svc.link.copies] == [7] and ch.sent == [0, 0]
    blk, desc, fds = svc.link.remaps[0]
    assert blk[3] == 64 and fds == [mem.region_of(0).fd]
    assert remap.parse(desc, 1, 64 * SECTOR) == (0x300, [(0, 32 * PAGE, 9)])
    assert ledger.snapshot()["allowed"]["may_remap"] == 1
    s, svc, ledger, ch = proxy(mem, Rules(), decline=True)
    s.on_packet(read_pkt(64))                     # declined: the same request by copy, in 16-sector pieces
    assert [b[3] for b, _n in svc.link.copies] == [16] * 4 and ch.sent == [0]
    assert s.counts["remap_declined"] == 1 and s.counts["remapped"] == 0


def test_untrusted_client_is_never_remapped(mem):
    s, svc, ledger, ch = proxy(mem, Rules(**{**UNTRUSTED.__dict__, "max_request_sectors": 64}))
    s.on_packet(read_pkt(64))
    assert svc.link.remaps == [] and len(svc.link.copies) == 4
    assert ledger.snapshot()["refused"] == {"may_remap": 1}


# ---------------------------------------------------------------- end to end
TOPOLOGY = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
memory = "16M"
provides = "disk0"
cmdline = "probe=1"

[[partition]]
name = "client1"
kernel = "bus-bench"
memory = "16M"
cmdline = "mode=disk n=4 sectors=128 off=256 verify=1"
uses = ["disk0"]

[[partition]]
name = "client2"
kernel = "bus-bench"
memory = "16M"
cmdline = "mode=disk n=2 sectors=64 base=1024 spin=0"
trust = "untrusted"
uses = ["disk0"]

[policy.partition.client2]
max_request_sectors = 64
"""


@pytest.mark.kvm
def test_up_large_block_io_by_remapping(tmp_path):
    """client1's 64 KiB writes and reads are remapped into the service partition and verified; client2 is copied."""
    run, _out, err, logs = pykvm_up(tmp_path, TOPOLOGY)
    assert "bench: disk verified 4 requests of 128 sectors\n" in (run / "client1.serial").read_text()
    assert "bench: done\n" in (run / "client2.serial").read_text()
    # 8 remapped requests (4 writes, 4 reads), none declined; everything of client2 went by copy
    assert "8 remapped (0 declined)" in err
    svc = (run / "storage.serial").read_text()
    assert "served 20 requests, 8 remapped\n" in svc          # + 2 INFO, 2 FLUSH, client2's 2 reads in 4 pieces each
    # the service guest looked at the last window after the requests: nothing there any more
    assert "blocksvc: window after request: unmapped\n" in svc and "still mapped" not in svc
    assert "provider closed: 20 served, 8 remapped, 8 unmapped, 0 declined, window mapped: no" in logs["storage.log"]
    # INFO and FLUSH are the only pieces that went by copy
    assert "block@disk0: 8 requests remapped, 0 declined, 2 pieces relayed by copy" in logs["client1.log"]
    assert "refused: client2 may not have its pages remapped into another partition" in logs["client2.log"]


@pytest.mark.kvm
def test_up_provider_at_v1_0_gets_everything_by_copy(tmp_path):
    """A service guest that opens the provider channel at v1.0: every remap is declined, the copy path serves it."""
    run, _out, err, logs = pykvm_up(tmp_path, TOPOLOGY.split("[[partition]]\nname = \"client2\"")[0]
                                    .replace('cmdline = "probe=1"', 'cmdline = "remap=0"')
                                    .replace("n=4 sectors=128", "n=2 sectors=64"))
    assert "bench: disk verified 2 requests of 64 sectors\n" in (run / "client1.serial").read_text()
    assert "0 remapped (4 declined)" in err
    assert "served 18 requests, 0 remapped\n" in (run / "storage.serial").read_text()   # 4 x 4 pieces, INFO, FLUSH
    assert "block@disk0: 0 requests remapped, 4 declined, 18 pieces relayed by copy" in logs["client1.log"]
