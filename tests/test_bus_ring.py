"""Partition bus rings: host round trips, guest (ring.c) <-> host interop, and hostile ring contents."""

import struct
import subprocess

import cffi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.bus import ring as R
from pykvm.bus.ring import (COMPLETION, COMPLETION_REQ, GPA_DIRECT, INBAND, XFER_PAGES, RingError, RingFull,
                            RingReader, RingWriter, gpa_direct_header, xfer_pages_header)
from pykvm.paths import GUESTS_SRC

from .conftest import require_tool

PAGE = 4096
HDR = 4096
GUARD = 64
DESC = struct.Struct("<HHHHQ")


def _ring(pages=1):
    """A ring buffer inside a larger one, with guard bytes on both sides."""
    outer = bytearray(b"\xa5" * GUARD + bytes(HDR + pages * PAGE) + b"\x5a" * GUARD)
    return outer, memoryview(outer)[GUARD:GUARD + HDR + pages * PAGE]


def _guards_intact(outer):
    return outer[:GUARD] == b"\xa5" * GUARD and outer[-GUARD:] == b"\x5a" * GUARD


# ---- host writer -> host reader -------------------------------------------------------------

_payload = st.binary(max_size=300)
_gpa = st.lists(st.tuples(st.integers(1, 9000), st.integers(0, PAGE - 1)), min_size=1, max_size=3)
_xfer = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=4)
_op = st.one_of(
    st.tuples(st.just("w"), st.sampled_from([INBAND, COMPLETION]), _payload, st.just(None)),
    st.tuples(st.just("w"), st.just(GPA_DIRECT), _payload, _gpa),
    st.tuples(st.just("w"), st.just(XFER_PAGES), _payload, _xfer),
    st.tuples(st.just("r"), st.integers(1, 4), st.none(), st.none()),
    st.tuples(st.just("mask"), st.booleans(), st.none(), st.none()),
)


def _encode(ptype, ranges, tid):
    """(range header bytes, expected Packet.ranges) for a generated packet."""
    if ptype == GPA_DIRECT:
        full = tuple((n, o, tuple(range(tid % 1000, tid % 1000 + (o + n + PAGE - 1) // PAGE))) for n, o in ranges)
        return gpa_direct_header(full), full
    if ptype == XFER_PAGES:
        return xfer_pages_header(tid & 0xFFFF, ranges, sender_owns=bool(tid & 1)), tuple(ranges)
    return b"", ()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 2), st.lists(_op, max_size=60))
def test_host_round_trip_matches_a_fifo_model(pages, ops):
    outer, buf = _ring(pages)
    w, r = RingWriter(buf), RingReader(buf)
    size = pages * PAGE
    fifo, used, tid = [], 0, 0
    masked = False
    for kind, a, payload, ranges in ops:
        if kind == "mask":
            masked = a
            r.mask() if a else r.unmask()
        elif kind == "w":
            tid += 1
            header, want_ranges = _encode(a, ranges, tid)
            need = 16 + len(header) + len(payload) + (-len(payload) & 7) + 8
            was_empty = r._published == w._write
            try:
                signal = w.write(a, payload, trans_id=tid, flags=tid & COMPLETION_REQ, header=header)
            except RingFull as e:
                assert size - used < need + 8 and e.needed == need + 8 == r.pending_send_sz
                continue
            assert size - used >= need + 8
            used += need
            assert r.pending_send_sz == 0
            assert signal == (was_empty and not masked)
            fifo.append((a, tid, payload, want_ranges, need))
        else:
            for _ in range(a):
                pkt = r.read()
                if not fifo:
                    assert pkt is None
                    break
                ptype, t, payload, want_ranges, need = fifo.pop(0)
                assert (pkt.type, pkt.trans_id, pkt.flags) == (ptype, t, t & COMPLETION_REQ)
                assert pkt.payload == payload + bytes(-len(payload) & 7)
                assert pkt.ranges == want_ranges
                if ptype == XFER_PAGES:
                    assert (pkt.pageset_id, pkt.sender_owns) == (t & 0xFFFF, t & 1)
                used -= need
            pending = r.pending_send_sz
            free_before = size - (w._write - r._published) % size
            signal = r.commit()
            assert signal == (pending != 0 and free_before < pending <= size - used)
    assert _guards_intact(outer)
    r.close(), w.close()


def test_a_writer_waits_on_pending_send_sz_and_the_reader_signals_it():
    _, buf = _ring(1)
    w, r = RingWriter(buf), RingReader(buf)
    n = 0
    while True:
        try:
            w.write(INBAND, b"x" * 500)
            n += 1
        except RingFull as e:
            needed = e.needed
            break
    assert n == 7 and r.pending_send_sz == needed == 16 + 504 + 8 + 8
    assert r.read() is not None
    assert r.commit() is True           # free space crossed pending_send_sz
    w.write(INBAND, b"y")
    assert r.pending_send_sz == 0
    assert r.read() is not None and r.commit() is False   # nobody waits any more


def test_writes_wrap_around_the_end_of_the_data_area():
    _, buf = _ring(1)
    w, r = RingWriter(buf), RingReader(buf)
    for i in range(200):
        data = bytes([i]) * (37 + i % 50)
        w.write(INBAND, data, trans_id=i)
        pkt = r.read()
        assert pkt.trans_id == i and pkt.payload[:len(data)] == data
        r.commit()
    assert w._write != 0   # went round several times and is mid-ring


# ---- guest ring.c <-> host ------------------------------------------------------------------

CDEF = """
struct rt_ring { void *hdr; void *data; uint32_t size; uint32_t read; };
struct rt_gpa_buf { uint64_t addr; uint32_t len; };
int ring_init(struct rt_ring *r, void *base, uint32_t bytes);
int ring_attach(struct rt_ring *r, void *base, uint32_t bytes);
int ring_write_inband(struct rt_ring *r, uint64_t trans_id, uint16_t flags, const void *payload, uint32_t len);
int ring_write_completion(struct rt_ring *r, uint64_t trans_id, const void *payload, uint32_t len);
int ring_write_gpa_direct(struct rt_ring *r, uint64_t trans_id, uint16_t flags,
                          const struct rt_gpa_buf *bufs, uint32_t nbufs, const void *payload, uint32_t len);
int ring_read(struct rt_ring *r, void *pkt, uint32_t max);
int ring_read_done(struct rt_ring *r);
int ring_empty(struct rt_ring *r);
void ring_mask(struct rt_ring *r);
int ring_unmask(struct rt_ring *r);
"""


@pytest.fixture(scope="module")
def cring(tmp_path_factory):
    """guests/runtime/ring.c compiled for the host as a shared library, loaded with cffi."""
    require_tool("gcc")
    so = tmp_path_factory.mktemp("ring") / "libring.so"
    cmd = ["gcc", "-std=gnu11", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{GUESTS_SRC}/include",
           f"-I{GUESTS_SRC}/runtime", "-o", str(so), f"{GUESTS_SRC}/runtime/ring.c"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(so))


def _cbuf(ffi, pages):
    mem = ffi.new("uint8_t[]", HDR + pages * PAGE)
    return mem, ffi.buffer(mem)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2), st.lists(st.tuples(st.sampled_from(["inband", "comp", "gpa"]), st.binary(max_size=200),
                                             st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 9000)),
                                                      min_size=1, max_size=3)),
                                   min_size=1, max_size=40))
def test_guest_writer_host_reader(cring, pages, msgs):
    ffi, lib = cring
    mem, pybuf = _cbuf(ffi, pages)
    g = ffi.new("struct rt_ring *")
    assert lib.ring_init(g, mem, HDR + pages * PAGE) == 0
    host = RingReader(pybuf)
    assert host.feature_bits == 1
    for i, (kind, payload, bufs) in enumerate(msgs):
        was_empty = struct.unpack_from("<I", pybuf, 0)[0] == host._published
        if kind == "inband":
            rc = lib.ring_write_inband(g, i, COMPLETION_REQ, payload, len(payload))
            want = (INBAND, COMPLETION_REQ, ())
        elif kind == "comp":
            rc = lib.ring_write_completion(g, i, payload, len(payload))
            want = (COMPLETION, 0, ())
        else:
            cb = ffi.new("struct rt_gpa_buf[]", [{"addr": a, "len": n} for a, n in bufs])
            rc = lib.ring_write_gpa_direct(g, i, 0, cb, len(bufs), payload, len(payload))
            want = (GPA_DIRECT, 0, tuple((n, a % PAGE, tuple(range(a // PAGE, (a + n + PAGE - 1) // PAGE)))
                                          for a, n in bufs))
        if rc == -1:   # full: the host drains, and must signal the waiting guest writer
            assert host.pending_send_sz > 0
            while host.read() is not None:
                pass
            assert host.commit() is True
            continue
        assert rc == (1 if was_empty else 0)
        pkt = host.read()
        assert (pkt.type, pkt.flags, pkt.ranges, pkt.trans_id) == want + (i,)
        assert pkt.payload == payload + bytes(-len(payload) & 7)
        assert host.read() is None
        if i % 3 == 0:
            host.commit()
    host.close()


def test_guest_writer_signals_only_on_empty_to_non_empty(cring):
    ffi, lib = cring
    mem, pybuf = _cbuf(ffi, 1)
    g = ffi.new("struct rt_ring *")
    lib.ring_init(g, mem, HDR + PAGE)
    host = RingReader(pybuf)
    assert lib.ring_write_inband(g, 1, 0, b"a", 1) == 1
    assert lib.ring_write_inband(g, 2, 0, b"b", 1) == 0
    host.read(), host.read(), host.commit()
    host.mask()
    assert lib.ring_write_inband(g, 3, 0, b"c", 1) == 0       # masked: the host polls
    assert host.unmask() is True                                # and finds it
    host.read(), host.commit()
    assert lib.ring_write_inband(g, 4, 0, b"d", 1) == 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2), st.lists(st.tuples(st.sampled_from([INBAND, COMPLETION, XFER_PAGES]),
                                             st.binary(max_size=300)), min_size=1, max_size=40))
def test_host_writer_guest_reader(cring, pages, msgs):
    ffi, lib = cring
    mem, pybuf = _cbuf(ffi, pages)
    g = ffi.new("struct rt_ring *")
    lib.ring_init(g, mem, HDR + pages * PAGE)
    host = RingWriter(pybuf)
    out = ffi.new("uint8_t[]", pages * PAGE)
    for i, (ptype, payload) in enumerate(msgs):
        header = xfer_pages_header(5, [(i, 2 * i)]) if ptype == XFER_PAGES else b""
        was_empty = struct.unpack_from("<I", pybuf, 4)[0] == host._write
        try:
            signal = host.write(ptype, payload, trans_id=i, header=header)
        except RingFull:
            while lib.ring_read(g, out, len(out)) > 0:
                pass
            assert lib.ring_read_done(g) == 1   # the guest reader wakes the waiting host writer
            continue
        assert signal == was_empty
        n = lib.ring_read(g, out, len(out))
        raw = bytes(ffi.buffer(out, n))
        t, off8, len8, flags, tid = DESC.unpack_from(raw)
        assert (t, tid, len8 * 8) == (ptype, i, n)
        assert raw[off8 * 8:16 + len(header)] == b"" and raw[16:off8 * 8] == header
        assert raw[off8 * 8:] == payload + bytes(-len(payload) & 7)
        if i % 2:
            lib.ring_read_done(g)
    assert lib.ring_read(g, out, len(out)) == 0
    host.close()


# ---- hostile contents -----------------------------------------------------------------------

def _drain(r, limit=200):
    """Read until empty or RingError; anything else escaping is a failure of the test."""
    got = []
    size = r.data_size
    try:
        for _ in range(limit):
            before = r._read
            avail = (struct.unpack_from("<I", r._buf, 0)[0] - before) % size
            pkt = r.read()
            if pkt is None:
                break
            # a packet never extends past what the writer published
            assert 0 < (r._read - before) % size <= avail
            got.append(pkt)
        r.commit()
    except RingError as e:
        assert e.reason
        return got, e
    return got, None


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.data())
def test_random_ring_contents_only_ever_raise_ring_error(pages, widx, ridx, data):
    outer, buf = _ring(pages)
    size = pages * PAGE
    small = data.draw(st.booleans())
    if small:   # mostly valid-looking indices, so the descriptors are actually examined
        widx, ridx = widx % size & ~7, ridx % size & ~7
    struct.pack_into("<II", buf, 0, widx, ridx)
    # a mix of random bytes and plausible descriptors scattered through the data area
    blob = data.draw(st.binary(min_size=0, max_size=512))
    at = data.draw(st.integers(0, size - len(blob)))
    buf[HDR + at:HDR + at + len(blob)] = blob
    for k in range(data.draw(st.integers(0, 6))):
        # the first one where the reader starts, so descriptors are actually parsed
        pos = min(ridx, size - 32) if k == 0 and small else data.draw(st.integers(0, size // 8 - 4)) * 8
        t = data.draw(st.sampled_from([6, 7, 9, 11, 0, 0xFFFF]))
        off8 = data.draw(st.integers(0, 12))
        len8 = data.draw(st.integers(0, size // 8 + 4))
        DESC.pack_into(buf, HDR + pos, t, off8, len8, data.draw(st.integers(0, 3)), 0)
        struct.pack_into("<II", buf, HDR + pos + 16, data.draw(st.integers(0, 9)), data.draw(st.integers(0, 2**32 - 1)))
        struct.pack_into("<II", buf, HDR + pos + 24, data.draw(st.integers(0, 9000)), data.draw(st.integers(0, 5000)))
    try:
        r = RingReader(buf, max_ranges=8, max_pfns=16)
    except RingError:
        assert not small
        return
    before = bytes(buf[8:])
    got, err = _drain(r)
    for pkt in got:
        assert 16 + len(pkt.payload) <= size
        for rng in pkt.ranges:
            if pkt.type == GPA_DIRECT:
                assert 0 < rng[0] and rng[1] < PAGE and len(rng[2]) == (rng[0] + rng[1] + PAGE - 1) // PAGE
    assert _guards_intact(outer)
    assert bytes(buf[8:]) == before      # the reader wrote nothing but read_index
    r.close()


def _one_packet(ptype=INBAND, payload=b"p" * 24, header=b"", pages=1):
    outer, buf = _ring(pages)
    RingWriter(buf).write(ptype, payload, trans_id=7, header=header)
    return outer, buf


def _poke_desc(buf, pos=0, **fields):
    t, off8, len8, flags, tid = DESC.unpack_from(buf, HDR + pos)
    vals = dict(type=t, offset8=off8, len8=len8, flags=flags, trans_id=tid)
    vals.update(fields)
    DESC.pack_into(buf, HDR + pos, vals["type"], vals["offset8"], vals["len8"], vals["flags"], vals["trans_id"])


@pytest.mark.parametrize("poke, reason", [
    (lambda b: struct.pack_into("<I", b, 0, 4096), "write_index"),           # beyond the data area
    (lambda b: struct.pack_into("<I", b, 0, 12), "write_index"),             # unaligned
    (lambda b: struct.pack_into("<I", b, 0, 8), "less than a packet"),       # partial packet
    (lambda b: _poke_desc(b, len8=7), "does not fit"),                       # longer than written
    (lambda b: _poke_desc(b, len8=0xFFFF), "does not fit"),                  # longer than the ring
    (lambda b: _poke_desc(b, len8=1), "does not fit"),                       # shorter than a descriptor
    (lambda b: _poke_desc(b, offset8=6), "outside"),                         # payload past the packet end
    (lambda b: _poke_desc(b, offset8=1), "outside"),                         # payload inside the descriptor
    (lambda b: _poke_desc(b, type=8), "unknown packet type"),
    (lambda b: _poke_desc(b, flags=2), "unknown packet flags"),
])
def test_broken_inband_packets(poke, reason):
    outer, buf = _one_packet()
    poke(buf)
    with pytest.raises(RingError, match=reason):
        RingReader(buf).read()
    assert _guards_intact(outer)


def test_a_reader_refuses_a_bad_read_index_at_start():
    _, buf = _ring(1)
    struct.pack_into("<I", buf, 4, 4100)
    with pytest.raises(RingError, match="read_index"):
        RingReader(buf)


GPA_ONE = gpa_direct_header([(100, 10, (5,))])   # 8 + 8 + 8 bytes


@pytest.mark.parametrize("poke, reason, kw", [
    (lambda b: struct.pack_into("<I", b, HDR + 20, 2), "run past", {}),              # count beyond the list
    (lambda b: struct.pack_into("<I", b, HDR + 20, 10**6), "range count", {}),       # count beyond the limit
    (lambda b: struct.pack_into("<I", b, HDR + 20, 0), "range count", {}),
    (lambda b: struct.pack_into("<I", b, HDR + 24, 8000), "run past", {}),           # 2 pfns, 1 listed
    (lambda b: struct.pack_into("<I", b, HDR + 24, 0), "GPA range of 0 bytes", {}),
    (lambda b: struct.pack_into("<I", b, HDR + 28, 4096), "page offset", {}),
    (lambda b: struct.pack_into("<Q", b, HDR + 32, 1 << 40), "pfn", {}),
    (lambda b: struct.pack_into("<Q", b, HDR + 32, 1 << 20), "pfn", {"max_pfn": 1 << 20}),
    (lambda b: struct.pack_into("<I", b, HDR + 24, 5000), "more than 1", {"max_pfns": 1}),
    (lambda b: _poke_desc(b, offset8=6), "not at the payload offset", {}),            # list shorter than offset
    (lambda b: _poke_desc(b, offset8=2), "no range header", {}),
])
def test_broken_gpa_direct_packets(poke, reason, kw):
    outer, buf = _one_packet(GPA_DIRECT, b"q" * 16, GPA_ONE)
    assert RingReader(buf).read().ranges == ((100, 10, (5,)),)
    poke(buf)
    with pytest.raises(RingError, match=reason):
        RingReader(buf, **kw).read()
    assert _guards_intact(outer)


@pytest.mark.parametrize("poke, reason", [
    (lambda b: struct.pack_into("<I", b, HDR + 20, 3), "do not end at the payload offset"),
    (lambda b: struct.pack_into("<I", b, HDR + 20, 2**32 - 1), "range count"),
    (lambda b: _poke_desc(b, offset8=4), "do not end"),
    (lambda b: _poke_desc(b, offset8=2), "no range header"),
])
def test_broken_transfer_page_packets(poke, reason):
    outer, buf = _one_packet(XFER_PAGES, b"z" * 8, xfer_pages_header(1, [(10, 20), (30, 40)]))
    poke(buf)
    with pytest.raises(RingError, match=reason):
        RingReader(buf).read()


def test_a_packet_wrapping_with_a_bad_length_is_refused():
    _, buf = _ring(1)
    w = RingWriter(buf)
    r = RingReader(buf)
    for _ in range(7):
        w.write(INBAND, b"a" * 500), r.read(), r.commit()
    w.write(INBAND, b"b" * 500, trans_id=9)        # this one wraps
    pos = r._read
    assert pos + 16 + 504 + 8 > PAGE
    _poke_desc(buf, pos, len8=(PAGE - 8) // 8)      # claims nearly the whole ring
    with pytest.raises(RingError, match="does not fit"):
        r.read()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([INBAND, GPA_DIRECT, XFER_PAGES]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_a_packet_changed_between_descriptor_and_body_reads(ptype, off8, len8, word1, word2):
    """The guest rewrites the packet after the host read the descriptor: the host must use what it validated."""
    header = {INBAND: b"", GPA_DIRECT: GPA_ONE, XFER_PAGES: xfer_pages_header(1, [(10, 20)])}[ptype]
    outer, buf = _one_packet(ptype, b"v" * 40, header)
    r = RingReader(buf)
    _, want_off8, want_len8, _, _ = DESC.unpack_from(buf, HDR)
    real_copy = r._copy_out

    def scribbling_copy(pos, n):
        _poke_desc(buf, offset8=off8, len8=len8)
        struct.pack_into("<II", buf, HDR + 16, word1, word2)
        return real_copy(pos, n)

    r._copy_out = scribbling_copy
    try:
        pkt = r.read()
    except RingError:
        pass   # the scribbled range list is refused: fine
    else:
        # parsed from the validated descriptor: sizes are the originals whatever the guest wrote
        assert len(pkt.payload) == (want_len8 - want_off8) * 8
        assert r._read == want_len8 * 8 + 8
    assert _guards_intact(outer)
