"""BusHost against a hostile guest, without KVM: real guest memory and GPADL views, fake doorbells and interrupts.

A scripted guest writes random management packets into its management ring (random types
and sizes, GPADLs naming pages outside RAM, in the MMIO hole or twice, over the limits,
opens of unknown channels, wrong states, teardowns of GPADLs in use, floods) and scribbles
its rings. After every step the host must have raised nothing out of its doorbell handler,
mapped no page outside RAM and stayed within its Limits; afterwards a clean guest sequence
(open echo, echo a message) must still work, on the same connection or after a reconnect
when the host disconnected the guest.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.bus import messages as M
from pykvm.bus.gpadl import GpadlError, GpadlView
from pykvm.bus.host import BusHost, Limits
from pykvm.bus.ring import COMPLETION, INBAND, RingError, RingFull, RingReader, RingWriter
from pykvm.bus.services.echo import EchoService
from pykvm.bus.services.heartbeat import HeartbeatService
from pykvm.bus.services.shutdown import ShutdownService
from pykvm.kvm.routing import msi_address
from pykvm.memory import MIB, GuestMemory

from .test_bus_messages import enc, enc_msg

PAGE = 4096
MGMT_PAGES = 1 + abi.PYKVM_BUS_MGMT_DATA_PAGES
MGMT_PFN = 16                       # the management area: pfns 16 .. 16 + 2 * MGMT_PAGES
CLEAN_PFN = 200                     # 4 pages the clean sequence uses for its rings
HIGH = 0x100000                     # first pfn above the 4 GiB hole (RAM is [0, 1 MiB) + [4 GiB, 4 GiB + 1 MiB))
V10, V11 = abi.PYKVM_BUS_VERSION_1_0, abi.PYKVM_BUS_VERSION_1_1
ECHO = (abi.PYKVM_BUS_IF_ECHO_LO, abi.PYKVM_BUS_IF_ECHO_HI)
LIMITS = dict(max_gpadls=4, max_gpadl_pages=16, max_total_pages=24, max_violations=8, vcpus=2)
_REL = struct.Struct("<II")


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.create(2 * MIB, 1 * MIB)
    yield m
    m.close()


def _memfd_mappings():
    with open("/proc/self/maps") as f:
        return sum("memfd:pykvm-" in line for line in f)


class FakeDoorbells:
    """Doorbells without KVM: ring() calls the callback as the doorbell thread would, catching what it raises."""

    def __init__(self):
        self.callbacks = {}
        self.failures = []

    def add(self, relid, callback):
        if relid in self.callbacks:
            raise ValueError(f"doorbell {relid} is already registered")
        self.callbacks[relid] = callback

    def remove(self, relid):
        del self.callbacks[relid]

    def __contains__(self, relid):
        return relid in self.callbacks

    def stats(self):
        return {"wakes": {}, "failures": list(self.failures)}

    def close(self):
        self.callbacks.clear()

    def ring(self, relid, count=1):
        cb = self.callbacks.get(relid)
        if cb is None:
            return
        try:
            cb(relid, count)
        except Exception as e:          # what the real thread would report, and then drop the doorbell
            self.failures.append(f"{type(e).__name__}: {e}")
            del self.callbacks[relid]


class FakeIrq:
    def __init__(self):
        self.count = 0

    def signal(self):
        self.count += 1


class FakeInterrupts:
    def __init__(self):
        self.allocated = []

    def allocate(self, vector, apic_id=0):
        msi_address(apic_id)            # the real one refuses APIC ids past 255 the same way
        irq = FakeIrq()
        self.allocated.append(irq)
        return irq

    def close(self):
        self.allocated.clear()


class Guest:
    """The guest side: its management rings (through its own GPADL view of the same pages) and its requests."""

    def __init__(self, mem, limits=None):
        self.mem = mem
        self.bells = FakeDoorbells()
        self.irqs = FakeInterrupts()
        self.logs = []
        self.host = BusHost(mem, self.bells, self.irqs, [EchoService(), ShutdownService(), HeartbeatService()],
                            limits=Limits(**(limits or LIMITS)), log=self.logs.append)
        self.view = self.out = self.inp = None
        self.replies = []               # (type, body bytes) from the host, oldest first
        self.scribbled_mgmt = False

    # ---- the management rings
    def connect(self, gpa=MGMT_PFN * PAGE) -> int:
        if gpa % PAGE == 0 and self.mem.is_ram(gpa, 2 * MGMT_PAGES * PAGE):
            self.mem.write(gpa, bytes(2 * MGMT_PAGES * PAGE))     # ring_init of both rings
            self.scribbled_mgmt = True                              # (over the live ones, maybe)
        status = self.host.connect(gpa, 0)
        if status == abi.PYKVM_BUS_STATE_CONNECTED:
            self._detach()
            self.view = GpadlView.create(self.mem, [gpa // PAGE + i for i in range(2 * MGMT_PAGES)])
            self.out = RingWriter.from_view(self.view, 0, MGMT_PAGES)
            self.inp = RingReader.from_view(self.view, MGMT_PAGES, MGMT_PAGES)
            self.scribbled_mgmt = False
        return status

    def _detach(self):
        for r in (self.out, self.inp):
            if r is not None:
                r.close()
        if self.view is not None:
            self.view.close()
        self.view = self.out = self.inp = None

    def close(self):
        self._detach()
        self.host.close()

    def send(self, payload: bytes, ptype=INBAND):
        """Queue one packet on the management ring and ring the doorbell (a broken or full ring loses it)."""
        if self.out is not None:
            try:
                self.out.write(ptype, payload)
            except (RingError, RingFull, ValueError):
                pass
        self.bells.ring(abi.PYKVM_BUS_MGMT_RELID)

    def drain(self):
        """Read what the host sent (the guest's own broken ring just stops the reading)."""
        if self.inp is None:
            return
        try:
            while (pkt := self.inp.read()) is not None:
                kind, size = struct.unpack_from("<II", pkt.payload)
                self.replies.append((kind, pkt.payload[8:8 + size]))
            if self.inp.commit():
                self.bells.ring(abi.PYKVM_BUS_MGMT_RELID)
        except (RingError, struct.error):
            pass

    def reply(self, kind: str, first=None):
        """The newest reply of `kind` (whose first u32 is `first`, if given) as u32s, after draining."""
        self.drain()
        for k, body in reversed(self.replies):
            if k == M.MSG[kind] and (first is None or _REL.unpack_from(body)[0] == first):
                return struct.unpack(f"<{len(body) // 4}I", body)
        return None

    def scribble(self, gpa: int, data: bytes):
        if self.mem.is_ram(gpa, len(data)):
            self.mem.write(gpa, data)

    # ---- a clean guest: what must keep working
    def clean_echo(self) -> bytes:
        """Contact, offers, a fresh 4-page GPADL, open echo, one echo; the echoed bytes."""
        h, before = self.host, self.host.violations
        if h.state == "idle" or self.scribbled_mgmt:
            self.host.disconnect()      # the guest's DISCONNECT command: a fresh start
            assert self.connect() == abi.PYKVM_BUS_STATE_CONNECTED
        self.drain()
        if h.state == "connected":
            self.send(enc_msg(M.InitiateContact((V11, V10), 0)))
            assert self.reply("version_response")[:2] == (1, V10)
        for ch in h.channels.values():   # a guest knows what it holds open and built (white box here)
            if ch.is_open:
                self.send(enc_msg(M.CloseChannel(ch.relid)))
        for gid in list(h.gpadls) + list(h.channel_mgmt._pending):
            self.send(enc_msg(M.GpadlTeardown(gid)))
        self.replies.clear()
        self.send(enc_msg(M.RequestOffers()))
        assert self.reply("all_offers_delivered") is not None
        offers = [struct.unpack_from("<IIQQ", body) for k, body in self.replies if k == M.MSG["offer"]]
        relid = next(o[0] for o in offers if (o[2], o[3]) == ECHO)
        pfns = list(range(CLEAN_PFN, CLEAN_PFN + 4))
        self.mem.write(CLEAN_PFN * PAGE, bytes(4 * PAGE))
        gid = 0xC1EA0
        self.send(enc_msg(M.GpadlHeader(gid, 4, tuple(pfns))))
        assert self.reply("gpadl_created", gid) == (gid, abi.PYKVM_BUS_OK), self.logs[-3:]
        self.send(enc_msg(M.OpenChannel(relid, gid, 2, 0, (abi.PYKVM_ECHO_V1_1,))))
        assert self.reply("open_result", relid)[:3] == (relid, abi.PYKVM_BUS_OK, abi.PYKVM_ECHO_V1_1)
        with GpadlView.create(self.mem, pfns) as v:
            out, inp = RingWriter.from_view(v, 0, 2), RingReader.from_view(v, 2, 2)
            msg = struct.pack("<II", abi.PYKVM_ECHO_OP_ECHO, 5) + b"hello"
            out.write(INBAND, msg, trans_id=77)
            self.bells.ring(relid)
            pkt = inp.read()
            out.close()
            inp.close()
        assert h.violations == before, h.refusals[-3:]
        assert pkt is not None and pkt.trans_id == 77
        return pkt.payload[:len(msg)]


# ---------------------------------------------------------------- invariants
def check(g: Guest, seen):
    h, lim = g.host, g.host.limits
    assert g.bells.failures == []                               # nothing escaped a doorbell handler
    assert len(g.irqs.allocated) <= lim.vcpus                   # one MSI route per vCPU the VM has, at most
    mapped = sum(v.size // PAGE for v in h.gpadls.values())
    assert len(h.gpadls) + len(h.channel_mgmt._pending) <= lim.max_gpadls
    assert mapped + sum(p.total for p in h.channel_mgmt._pending.values()) <= lim.max_total_pages
    views = list(h.gpadls.values()) + ([h.connection._mgmt_view] if h.connection._mgmt_view is not None else [])
    for v in views:
        assert not v.closed and len(set(v.pfns)) == len(v.pfns) <= max(lim.max_gpadl_pages, 2 * MGMT_PAGES)
        assert all(g.mem.is_ram(p * PAGE, PAGE) for p in v.pfns)   # never a page outside RAM
    for ch in h.channels.values():
        assert (ch.relid in g.bells) == ch.is_open
        if ch.is_open:
            assert ch.gpadl_id in h.gpadls
    if h.state == "idle":
        assert not h.gpadls and not h.channel_mgmt._pending and abi.PYKVM_BUS_MGMT_RELID not in g.bells
    assert h.violations >= seen[0] and h.refusal_count >= seen[1] and h.refusal_count >= h.violations
    assert all(isinstance(r, str) and r for r in h.refusals)
    seen[:] = [h.violations, h.refusal_count]


# ---------------------------------------------------------------- what a hostile guest does
pfn = st.one_of(
    st.integers(32, 199),                          # low RAM
    st.integers(HIGH, HIGH + 255),                 # RAM above the hole
    st.integers(256, HIGH - 1),                    # the MMIO hole
    st.integers(HIGH + 256, 2**40 + 5),            # past the top of RAM, past 52-bit addresses
    st.integers(2**40, 2**64 - 1),
    st.sampled_from([0, MGMT_PFN, 255, HIGH]),
)
pfn_list = st.lists(pfn, max_size=M.PFNS_PER_MSG).map(tuple) | \
    st.lists(st.sampled_from([40, 41, 42, HIGH + 1]), max_size=8).map(tuple)   # repeats
gid = st.sampled_from([0, 1, 2, 3, 4, 5, 0xC1EA0]) | st.integers(0, 2**32 - 1)
relid = st.sampled_from([0, 1, 2, 3, 4, 5]) | st.integers(0, 2**32 - 1)
version = st.sampled_from([V10, V11, 0x20000, abi.PYKVM_ECHO_V1_1, 0]) | st.integers(0, 2**32 - 1)
vcpu = st.sampled_from([0, 0, 1, 255, 256]) | st.integers(0, 2**32 - 1)
versions = lambda n: st.lists(version, min_size=1, max_size=n).map(tuple)   # noqa: E731


@st.composite
def _gpadl_header(draw):
    pfns = draw(pfn_list)
    total = draw(st.sampled_from([len(pfns), len(pfns), len(pfns) + 1, 4, 16, 17, 4096, 2**32 - 1])
                 | st.integers(len(pfns), 70))
    return M.GpadlHeader(draw(gid), max(total, len(pfns)), pfns)


@st.composite
def _good_gpadl(draw, least=1):
    """A GPADL of consecutive pages in RAM, sometimes with room for two rings."""
    n = draw(st.integers(least, 8))
    start = draw(st.integers(32, 199 - n) | st.integers(HIGH, HIGH + 255 - n))
    return M.GpadlHeader(draw(gid), n, tuple(range(start, start + n)))


message = st.one_of(
    st.builds(M.InitiateContact, versions(M.MAX_VERSIONS), vcpu),
    st.just(M.RequestOffers()), st.just(M.Unload()),
    _gpadl_header(), _good_gpadl(), _good_gpadl(),
    st.builds(M.GpadlBody, gid, pfn_list),
    st.builds(M.GpadlTeardown, gid),
    st.builds(M.OpenChannel, relid, gid, st.sampled_from([0, 1, 2, 3, 4, 6]) | st.integers(0, 2**32 - 1), vcpu,
              versions(M.MAX_SERVICE_VERSIONS)),
    st.builds(M.CloseChannel, relid), st.builds(M.RelidReleased, relid),
)


@st.composite
def _mutant(draw):
    raw = bytearray(enc_msg(draw(message)))
    for _ in range(draw(st.integers(1, 4))):
        if raw and draw(st.booleans()):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        else:
            del raw[draw(st.integers(0, len(raw))):]
    return bytes(raw)


_header_field = st.sampled_from([0, 4, 8, 12, 64])
op = st.one_of(
    st.tuples(st.just("msg"), message),
    st.tuples(st.just("msg"), message),
    st.tuples(st.just("raw"), st.binary(max_size=600) | _mutant()),
    st.tuples(st.just("type"), st.binary(max_size=64)),
    st.tuples(st.just("sizes"), st.sampled_from(sorted(M.NAMES)), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.tuples(st.just("scribble_mgmt"), st.integers(0, 2 * MGMT_PAGES - 1), _header_field | st.integers(0, PAGE - 8),
              st.integers(0, 2**32 - 1)),
    st.tuples(st.just("scribble_data"), st.integers(0, 7), _header_field | st.integers(0, PAGE - 8),
              st.integers(0, 2**32 - 1), relid),
    st.tuples(st.just("echo"), st.binary(max_size=64), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("echo"), st.binary(max_size=64), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("open"), st.integers(1, 3), _good_gpadl(4), vcpu),
    st.tuples(st.just("open"), st.integers(1, 3), _good_gpadl(4), st.just(0)),
    st.tuples(st.just("flood"), relid, st.integers(1, 300)),
    st.tuples(st.just("drain")),
    st.tuples(st.just("connect"), st.sampled_from([MGMT_PFN * PAGE, 8 * PAGE, 250 * PAGE, 255 * PAGE, 256 * PAGE,
                                                   (HIGH + 250) * PAGE, 0x1234, 2**52, 2**64 - PAGE])),
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("rescind"), st.sampled_from([2, 3, 9])),
)


def apply(g: Guest, o) -> None:
    h, kind = g.host, o[0]
    if kind == "msg":
        g.send(enc_msg(o[1]))
    elif kind == "raw":
        g.send(o[1])
    elif kind == "type":                      # a management packet that is not in-band
        g.send(o[1], ptype=COMPLETION)
    elif kind == "sizes":                     # a known type whose size field lies
        g.send(struct.pack("<II", o[1], o[2]) + o[3])
    elif kind == "scribble_mgmt":
        _, page, off, value = o
        g.scribble((MGMT_PFN + page) * PAGE + off, struct.pack("<I", value))
        g.scribbled_mgmt = True
        g.bells.ring(abi.PYKVM_BUS_MGMT_RELID)
    elif kind == "scribble_data":             # into the pages of an open channel's rings
        _, page, off, value, rid = o
        ch = h.channels.get(rid % 4 or 1)
        if ch.is_open:
            pfns = h.gpadls[ch.gpadl_id].pfns
            g.scribble(pfns[page % len(pfns)] * PAGE + off, struct.pack("<I", value))
        g.bells.ring(ch.relid)
    elif kind == "echo":                      # a packet (maybe a valid echo) on the open echo channel
        _, data, length = o
        ch = h.channels[1]
        if ch.is_open:
            v = h.gpadls[ch.gpadl_id]
            try:
                with GpadlView.create(g.mem, list(v.pfns)) as gv:
                    w = RingWriter.from_view(gv, 0, ch.inbound_offset)
                    try:
                        w.write(INBAND, struct.pack("<II", abi.PYKVM_ECHO_OP_ECHO, length % 80) + data)
                    finally:
                        w.close()
            except (RingError, RingFull, ValueError, GpadlError):
                pass
        g.bells.ring(1)
    elif kind == "open":                      # a GPADL of zeroed rings and an open naming it
        _, rid, hdr, cpu = o
        for p in hdr.pfns:
            g.mem.write(p * PAGE, bytes(PAGE))
        g.send(enc_msg(hdr))
        g.send(enc_msg(M.OpenChannel(rid, hdr.gpadl, 2, cpu, (abi.PYKVM_ECHO_V1_1, V10))))
    elif kind == "flood":
        for _ in range(o[2]):
            g.bells.ring(o[1] % 8)
    elif kind == "drain":
        g.drain()
    elif kind == "connect":
        g.connect(o[1])
    elif kind == "disconnect":
        h.disconnect()
    elif kind == "rescind":
        try:
            h.rescind(o[1])
        except ValueError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from([True, True, True, False]), st.lists(op, max_size=50))
def test_hostile_management_traffic_gets_refused_and_the_bus_stays_usable(mem, contact_first, ops):
    maps = _memfd_mappings()
    g = Guest(mem)
    try:
        seen = [0, 0]
        assert g.connect() == abi.PYKVM_BUS_STATE_CONNECTED
        if contact_first:
            g.send(enc_msg(M.InitiateContact((V10,), 0)))
        opened = mapped = 0
        for o in ops:
            apply(g, o)
            check(g, seen)
            opened |= any(ch.is_open for ch in g.host.channels.values())
            mapped |= bool(g.host.gpadls)
        event(f"ended {g.host.state}; violations {'over' if g.host.violations > LIMITS['max_violations'] else 'within'} "
              f"the limit; a GPADL {'was' if mapped else 'never'} mapped; a channel {'was' if opened else 'never'} open")
        assert g.clean_echo() == struct.pack("<II", abi.PYKVM_ECHO_OP_ECHO, 5) + b"hello"
        check(g, seen)
    finally:
        g.close()
    assert _memfd_mappings() == maps          # every view the host made is gone


def test_refusals_are_counted_with_reasons_then_the_guest_is_disconnected(mem):
    g = Guest(mem, limits=dict(LIMITS, max_violations=3))
    try:
        g.connect()
        g.send(enc_msg(M.RequestOffers()))                        # before contact
        g.send(enc_msg(M.InitiateContact((V10,), 0)))
        assert g.reply("version_response")[:2] == (1, V10)
        g.send(struct.pack("<II", 99, 0))
        g.send(enc_msg(M.OpenChannel(7, 1, 2, 0, (V10,))))
        assert g.reply("open_result", 7)[:2] == (7, abi.PYKVM_BUS_E_NOT_FOUND)
        g.send(enc_msg(M.GpadlHeader(5, 1, (HIGH - 1,))))         # the MMIO hole: refused, not a violation
        assert g.reply("gpadl_created", 5) == (5, abi.PYKVM_BUS_E_INVALID)
        g.send(enc_msg(M.GpadlHeader(6, 99, ())))                 # over max_gpadl_pages
        assert g.reply("gpadl_created", 6) == (6, abi.PYKVM_BUS_E_LIMIT)
        assert (g.host.violations, g.host.refusal_count, g.host.state) == (3, 5, "contact")
        assert [r.split(":")[0] for r in g.host.refusals] == [
            "RequestOffers before version negotiation", "unknown message type 99",
            "open of unknown channel 7", "GPADL 5", "GPADL 6 of 99 pages is over the limits (16 pages each, 4 GPADLs, 24 pages in all)"]
        g.send(enc_msg(M.GpadlTeardown(9)))                       # the 4th violation
        assert g.host.state == "idle" and "disconnecting the guest: 4 protocol violations since it connected" in g.logs
        assert g.host.snapshot()["violations"] == 4
        assert g.clean_echo() == struct.pack("<II", abi.PYKVM_ECHO_OP_ECHO, 5) + b"hello"   # a reconnect works
    finally:
        g.close()


def test_a_guest_breaking_its_ring_in_a_loop_gets_rate_limited_disconnect_lines(mem):
    # Issue 19: connect, break the management ring, ring the doorbell, again: ~110 log lines a second.
    g = Guest(mem)
    try:
        for _ in range(300):
            assert g.connect() == abi.PYKVM_BUS_STATE_CONNECTED
            g.mem.write(MGMT_PFN * PAGE, struct.pack("<I", 0xFFFF_FFF1))   # guest->host write_index
            g.bells.ring(abi.PYKVM_BUS_MGMT_RELID)
            assert g.host.state == "idle"
        lines = [line for line in g.logs if line.startswith("disconnecting the guest")]
        assert len(lines) == 20 and g.host.snapshot()["disconnects"] == 300
        assert not g.bells.failures
    finally:
        g.close()


def test_gpadl_limits_hold_under_a_flood(mem):
    g = Guest(mem, limits=dict(LIMITS, max_violations=10**6, max_total_pages=1000))
    try:
        g.connect()
        g.send(enc_msg(M.InitiateContact((V10,), 0)))
        for i in range(1, 200):
            g.send(enc_msg(M.GpadlHeader(i, 8, tuple(range(32 + 8 * (i % 10), 40 + 8 * (i % 10))))))
            g.send(enc_msg(M.GpadlHeader(1000 + i, 16, (50,))))   # left pending
            g.drain()
            check(g, [0, 0])
        assert len(g.host.gpadls) + len(g.host.channel_mgmt._pending) == LIMITS["max_gpadls"]
        assert g.clean_echo() == struct.pack("<II", abi.PYKVM_ECHO_OP_ECHO, 5) + b"hello"
    finally:
        g.close()


def test_a_channel_broken_by_its_guest_is_closed_alone(mem):
    g = Guest(mem)
    try:
        g.connect()
        assert g.clean_echo()
        ch = g.host.channels[1]
        rings = g.host.gpadls[ch.gpadl_id].pfns[0] * PAGE
        g.scribble(rings, struct.pack("<I", 0x7FFF_FFF8))          # write_index far beyond the ring
        g.bells.ring(1)
        assert not ch.is_open and "write_index 0x7ffffff8" in ch.closed_reason
        assert g.reply("closed", 1) == (1, abi.PYKVM_BUS_E_INVALID)
        assert g.host.state == "contact" and g.host.violations == 0 and g.host.refusal_count == 1
        assert g.clean_echo()
    finally:
        g.close()


def _write_before_commit(monkeypatch, reader, guest_write):
    """Run guest_write() once, just before `reader` publishes its read index: the window in which a
    guest's write sees a stale read_index, so the ring rules tell it not to signal."""
    commit = reader.commit

    def late_write():
        monkeypatch.setattr(reader, "commit", commit)
        guest_write()
        return commit()
    monkeypatch.setattr(reader, "commit", late_write)


def test_a_packet_written_while_the_host_publishes_is_not_stranded(mem, monkeypatch):
    g = Guest(mem)
    try:
        g.connect()
        assert g.clean_echo()
        ch = g.host.channels[1]
        with GpadlView.create(mem, list(g.host.gpadls[ch.gpadl_id].pfns)) as v:
            out, inp = RingWriter.from_view(v, 0, 2), RingReader.from_view(v, 2, 2)
            echo = struct.pack("<II", abi.PYKVM_ECHO_OP_ECHO, 3)
            signals = []
            _write_before_commit(monkeypatch, ch.reader, lambda: signals.append(out.write(INBAND, echo + b"two", 2)))
            assert out.write(INBAND, echo + b"one", 1)
            g.bells.ring(1)
            assert signals == [False]                   # the guest followed the rules and did not signal
            got = [inp.read() for _ in range(3)]          # clean_echo's reply (not consumed), then ours
            out.close()
            inp.close()
        assert [p.trans_id for p in got if p is not None] == [77, 1, 2]
    finally:
        g.close()


def test_a_management_message_written_while_the_host_publishes_is_not_stranded(mem, monkeypatch):
    g = Guest(mem)
    try:
        g.connect()
        g.send(enc_msg(M.InitiateContact((V10,), 0)))
        g.replies.clear()
        _write_before_commit(monkeypatch, g.host.connection._mgmt_in, lambda: g.out.write(INBAND, enc_msg(M.RequestOffers())))
        g.send(enc_msg(M.GpadlTeardown(77)))
        assert g.reply("gpadl_torndown", 77) is not None
        assert g.reply("all_offers_delivered") is not None
    finally:
        g.close()


def test_target_vcpus_are_those_the_vm_has(mem):
    g = Guest(mem)
    try:
        assert g.host.connect(MGMT_PFN * PAGE, 2) == abi.PYKVM_BUS_STATE_REFUSED
        g.connect()
        g.send(enc_msg(M.InitiateContact((V10,), 200)))
        assert g.reply("version_response")[:2] == (0, 0) and g.host.state == "connected"
        g.send(enc_msg(M.InitiateContact((V10,), 1)))
        assert g.reply("version_response")[:2] == (1, V10)
        g.mem.write(CLEAN_PFN * PAGE, bytes(4 * PAGE))
        g.send(enc_msg(M.GpadlHeader(9, 4, tuple(range(CLEAN_PFN, CLEAN_PFN + 4)))))
        g.send(enc_msg(M.OpenChannel(1, 9, 2, 255, (V10,))))
        assert g.reply("open_result", 1)[:2] == (1, abi.PYKVM_BUS_E_INVALID)
        assert "there is no vCPU 255 (the VM has 2)" in g.host.refusals[-1]
        assert len(g.irqs.allocated) == 2
    finally:
        g.close()


@pytest.mark.parametrize("page, field", [(0, 4), (2, 0)])    # the guest->host read_index, the host->guest write_index
def test_an_open_refused_for_a_bad_ring_header_can_disconnect_the_guest(mem, page, field):
    # The refusal of an open whose ring header is garbage is the violation that disconnects the
    # guest: unmapping the GPADL then must not find the half-built ring still holding its pages.
    g = Guest(mem, limits=dict(LIMITS, max_violations=0))
    try:
        g.connect()
        g.send(enc_msg(M.InitiateContact((V10,), 0)))
        g.mem.write(CLEAN_PFN * PAGE, bytes(4 * PAGE))
        g.mem.write((CLEAN_PFN + page) * PAGE + field, struct.pack("<I", 0xFFFF_FFF1))
        g.send(enc_msg(M.GpadlHeader(9, 4, tuple(range(CLEAN_PFN, CLEAN_PFN + 4)))))
        g.send(enc_msg(M.OpenChannel(1, 9, 2, 0, (V10,))))
        check(g, [0, 0])
        assert g.host.state == "idle" and "0xfffffff1 is not an 8-byte aligned offset" in g.host.refusals[-1]
        assert g.clean_echo()
    finally:
        g.close()
