"""The cache-entry format: what dumps() writes loads() gives back exactly, and anything else is a CacheFileError."""

from __future__ import annotations

import datetime
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.startup import cachefile, digest

scalars = st.one_of(st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                      max_leaves=40)


def typed(v):
    """v as nested (type, value) pairs: equal only when every type, float bit pattern and key order matches."""
    if isinstance(v, float):
        return float, struct.pack("<d", v)
    if isinstance(v, list):
        return list, [typed(x) for x in v]
    if isinstance(v, dict):
        return dict, [(k, typed(x)) for k, x in v.items()]
    return type(v), v


def wrap(body: bytes) -> bytes:
    """An entry around any body, with its digest right (what an edit made on purpose would look like)."""
    return cachefile.MAGIC + digest.hexdigest(body).encode() + body


@settings(max_examples=300, deadline=None)
@given(values)
def test_what_is_written_is_read_back_exactly(value):
    assert typed(cachefile.loads(cachefile.dumps(value))) == typed(value)


def test_a_toml_like_document_round_trips():
    doc = {"name": "serial", "registers": [{"offset": 0x3F8, "ratio": 1.5, "flag": True, "nan": math.nan,
                                            "big": -(1 << 63), "empty": [], "t": {}}], "é": "ü\x00"}
    assert typed(cachefile.loads(cachefile.dumps(doc))) == typed(doc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused(raw):
    with pytest.raises(cachefile.CacheFileError):
        cachefile.loads(raw)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64),
                 st.lists(st.sampled_from([b"l", b"d", b"s", b"i", b"f", b"b", b"T", b"F", b"\x00", b"\x01",
                                           b"\x04\x00\x00\x00", b"\xff\xff\xff\xff", b"abcd", b"\xc3", b"\x08"]),
                          max_size=30).map(b"".join)))
def test_any_body_with_a_right_digest_is_a_value_or_refused(body):
    # the decoder's own checks, with the digest out of the way: never another exception, never a hang
    try:
        cachefile.loads(wrap(body))
    except cachefile.CacheFileError:
        pass


@settings(max_examples=300, deadline=None)
@given(values, st.data())
def test_a_damaged_entry_is_refused(value, data):
    raw = bytearray(cachefile.dumps(value))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[at:]
    else:
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    with pytest.raises(cachefile.CacheFileError):
        cachefile.loads(bytes(raw))


@pytest.mark.parametrize("body, why", [
    (b"", "not a pykvm cache entry"),
    (b"d\x01\x00\x00\x00\x01\x00\x00\x00a", "truncated"),
    (b"s\x05\x00\x00\x00abc", "truncated"),
    (b"l\xff\xff\xff\x7f", "count past the end"),
    (b"d\x02\x00\x00\x00\x01\x00\x00\x00aT\x01\x00\x00\x00aF", "a key twice"),
    (b"i\x00", "empty integer"),
    (b"s\x01\x00\x00\x00\xff", "bad UTF-8"),
    (b"TT", "bytes after the value"),
    (b"N", "unknown tag"),
    (b"l\x01\x00\x00\x00" * 40 + b"T", "nested too deeply"),
])
def test_crafted_bodies_are_refused_by_name(body, why):
    with pytest.raises(cachefile.CacheFileError, match=why):
        cachefile.loads(wrap(body))


def test_a_foreign_or_oversized_file_is_refused():
    good = cachefile.dumps({"a": 1})
    for raw in (b"", good[:len(cachefile.MAGIC) + 64], b"{}" + good, good.replace(b"cache 1", b"cache 2"),
                wrap(b"b" + struct.pack("<I", cachefile.MAX_BYTES) + bytes(cachefile.MAX_BYTES))):
        with pytest.raises(cachefile.CacheFileError):
            cachefile.loads(raw)
    with pytest.raises(cachefile.CacheFileError):
        cachefile.loads(bytearray(good))          # only bytes, as read from a file


@pytest.mark.parametrize("value", [None, (1, 2), {1: "a"}, {"d": datetime.date(1979, 5, 27)}, {1.5}, 1 << 2100,
                                   "\ud800", "DEEP"])
def test_values_the_format_cannot_hold_are_not_written(value):
    if value == "DEEP":
        value = []
        for _ in range(cachefile.MAX_DEPTH + 1):
            value = [value]
    with pytest.raises((TypeError, ValueError)):
        cachefile.dumps(value)


def test_read_and_write(tmp_path):
    path = str(tmp_path / "sub" / "e.entry")
    assert cachefile.read(path) is None
    cachefile.write(path, {"x": [1, b"\x00", "y"]})
    assert cachefile.read(path) == {"x": [1, b"\x00", "y"]}
    open(path, "ab").write(b"\x00")
    assert cachefile.read(path) is None
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    cachefile.write(str(blocker / "e.entry"), {"x": 1})   # an unwritable cache: no error, nothing written
