"""Management messages: parse() of untrusted bytes only ever returns a bounded message or raises MessageError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.bus import messages as M

T = M.MSG
PFNS = M.PFNS_PER_MSG
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def _body(kind: str) -> int:
    return M._SIZE[T[kind]]


# ---- what a guest sends, encoded independently of messages.py (from the C layouts' sizes) ----------

def enc(kind: str, body: bytes) -> bytes:
    """A guest message: header, then the body padded to the struct's size."""
    size = _body(kind)
    assert len(body) <= size
    return struct.pack("<II", T[kind], size) + body + bytes(size - len(body))


def enc_msg(msg) -> bytes:
    """The bytes a well-behaved guest driver sends for `msg`."""
    if isinstance(msg, M.InitiateContact):
        return enc("initiate_contact", struct.pack(f"<II{len(msg.versions)}I", len(msg.versions), msg.target_vcpu,
                                                   *msg.versions))
    if isinstance(msg, M.RequestOffers):
        return enc("request_offers", b"")
    if isinstance(msg, M.Unload):
        return enc("unload", b"")
    if isinstance(msg, M.GpadlHeader):
        return enc("gpadl_header", struct.pack(f"<IIII{len(msg.pfns)}Q", msg.gpadl, msg.total, len(msg.pfns), 0,
                                               *msg.pfns))
    if isinstance(msg, M.GpadlBody):
        return enc("gpadl_body", struct.pack(f"<II{len(msg.pfns)}Q", msg.gpadl, len(msg.pfns), *msg.pfns))
    if isinstance(msg, M.GpadlTeardown):
        return enc("gpadl_teardown", struct.pack("<II", msg.gpadl, 0))
    if isinstance(msg, M.OpenChannel):
        return enc("open", struct.pack(f"<IIIIII{len(msg.versions)}I", msg.relid, msg.ring_gpadl, msg.inbound_offset,
                                       msg.target_vcpu, len(msg.versions), msg.data_gpadl, *msg.versions))
    if isinstance(msg, M.CloseChannel):
        return enc("close", struct.pack("<II", msg.relid, 0))
    assert isinstance(msg, M.RelidReleased)
    return enc("relid_released", struct.pack("<II", msg.relid, 0))


_pfns = st.lists(u64, max_size=PFNS).map(tuple)


@st.composite
def _gpadl_header(draw):
    pfns = draw(_pfns)
    return M.GpadlHeader(draw(u32), draw(st.integers(len(pfns), 2**32 - 1)), pfns)


valid_messages = st.one_of(
    st.builds(M.InitiateContact, st.lists(u32, min_size=1, max_size=M.MAX_VERSIONS).map(tuple), u32),
    st.just(M.RequestOffers()), st.just(M.Unload()),
    _gpadl_header(),
    st.builds(M.GpadlBody, u32, _pfns),
    st.builds(M.GpadlTeardown, u32),
    st.builds(M.OpenChannel, u32, u32, u32, u32, st.lists(u32, min_size=1, max_size=M.MAX_SERVICE_VERSIONS).map(tuple)),
    st.builds(M.CloseChannel, u32), st.builds(M.RelidReleased, u32),
)


def _bounded(msg) -> None:
    """What every parsed message promises the host, whatever the bytes were."""
    assert type(msg) in (M.InitiateContact, M.RequestOffers, M.GpadlHeader, M.GpadlBody, M.GpadlTeardown,
                         M.OpenChannel, M.CloseChannel, M.RelidReleased, M.Unload)
    for name in ("gpadl", "total", "relid", "ring_gpadl", "inbound_offset", "target_vcpu"):
        v = getattr(msg, name, 0)
        assert type(v) is int and 0 <= v < 2**32
    if hasattr(msg, "pfns"):
        assert len(msg.pfns) <= PFNS and all(type(p) is int and 0 <= p < 2**64 for p in msg.pfns)
    if isinstance(msg, M.GpadlHeader):
        assert len(msg.pfns) <= msg.total
    if isinstance(msg, M.InitiateContact):
        assert 1 <= len(msg.versions) <= M.MAX_VERSIONS
    if isinstance(msg, M.OpenChannel):
        assert 1 <= len(msg.versions) <= M.MAX_SERVICE_VERSIONS


def _parse(data: bytes):
    """parse(), which may only raise MessageError; the message or None."""
    try:
        msg = M.parse(data)
    except M.MessageError as e:
        assert str(e)           # a reason for the log
        return None
    _bounded(msg)
    return msg


def test_body_sizes_are_the_c_structs():
    assert _body("gpadl_header") == abi.ffi.sizeof("struct pykvm_bus_gpadl_header") == 16 + 8 * PFNS
    assert _body("open") == abi.ffi.sizeof("struct pykvm_bus_open")
    assert _body("request_offers") == _body("unload") == 0


@settings(max_examples=400, deadline=None)
@given(valid_messages, st.binary(max_size=7))
def test_valid_messages_round_trip(msg, padding):
    data = enc_msg(msg)
    assert M.parse(data) == msg
    assert M.parse(data + padding) == msg          # the ring pads payloads to 8 bytes


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_message_error(data):
    _parse(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(M._BODY)), st.binary(max_size=600))
def test_arbitrary_bodies_of_each_type(kind, body):
    size = M._SIZE[kind]
    _parse(struct.pack("<II", kind, size) + body)
    _parse(struct.pack("<II", kind, len(body)) + body)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_messages, st.data())
def test_mutated_valid_messages_raise_only_message_error(msg, data):
    raw = bytearray(enc_msg(msg))
    for _ in range(data.draw(st.integers(1, 6))):
        how = data.draw(st.sampled_from(["byte", "u32", "truncate", "extend"]))
        if how == "byte" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif how == "u32" and len(raw) >= 4:
            at = data.draw(st.integers(0, (len(raw) - 4) // 4)) * 4
            raw[at:at + 4] = struct.pack("<I", data.draw(st.sampled_from(
                [0, 1, PFNS, PFNS + 1, 2**31, 2**32 - 1, data.draw(u32)])))
        elif how == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=64))
    _parse(bytes(raw))


@pytest.mark.parametrize("data, reason", [
    (b"", "shorter than its header"),
    (struct.pack("<I", 1), "shorter than its header"),
    (struct.pack("<II", 99, 0), "unknown message type 99"),
    (struct.pack("<II", T["version_response"], 48) + bytes(48), "unknown message type"),   # host->guest type
    (struct.pack("<II", T["gpadl_teardown"], 4) + bytes(8), "body of 4 bytes"),
    (struct.pack("<II", T["gpadl_teardown"], 8) + bytes(4), r"body of 8 bytes \(4 present\)"),
    (struct.pack("<II", T["unload"], 8) + bytes(8), "expected 0"),
    (enc("gpadl_header", struct.pack("<IIII", 1, 2, 3, 0)), "3 pfns of a 2-page GPADL"),
    (enc("gpadl_header", struct.pack("<IIII", 1, 99, PFNS + 1, 0)), f"{PFNS + 1} pfns in one message"),
    (enc("gpadl_body", struct.pack("<II", 1, 2**32 - 1)), "4294967295 pfns in one message"),
    (enc("initiate_contact", struct.pack("<II", 0, 0)), "0 versions"),
    (enc("initiate_contact", struct.pack("<II", M.MAX_VERSIONS + 1, 0)), "9 versions"),
    (enc("open", struct.pack("<IIIIII", 1, 1, 2, 0, 5, 0)), "open channel: 5 versions"),
])
def test_refusals_say_why(data, reason):
    with pytest.raises(M.MessageError, match=reason):
        M.parse(data)
