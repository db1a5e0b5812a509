"""Cache entries in a small tagged binary format: read without json or re, refused unless intact.

pykvm keeps parsed device descriptions and the compiled seccomp program in the cache
directory, and every `pykvm run` reads them. JSON would cost an import of json and re
(~3 ms); pickle and marshal may run code or crash on crafted data. This format holds only
what the caches need (bools, ints, floats, str, bytes, lists and dicts with str keys)
and is decoded by hand with every length bounded by the bytes actually there, so a garbled,
truncated or edited file is a CacheFileError (readers treat it as absent and rebuild),
never a crash and never code.

An entry is MAGIC, the hex BLAKE2b digest of the body, then the body: one value, each a
tag byte and its payload (lengths and counts are little-endian u32). The digest catches
accidental damage; the decoder's bounds catch the rest.
"""

from __future__ import annotations

import os
import struct

from . import digest

MAGIC = b"pykvm-cache 1\n"
MAX_BYTES = 1 << 20          # no cache entry is near this; a bigger file is not one of ours
MAX_DEPTH = 32               # nesting of lists and dicts (TOML documents nest a few levels)
_HEAD = len(MAGIC) + 64
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")


class CacheFileError(ValueError):
    """The bytes are not an intact cache entry (the message says what is wrong)."""


def dumps(value) -> bytes:
    """The entry for value; TypeError for a value the format does not hold (a date, a tuple, a non-str key)."""
    out = bytearray()
    _put(out, value, 0)
    body = bytes(out)
    return MAGIC + digest.hexdigest(body).encode() + body


def _put(out: bytearray, v, depth: int) -> None:
    t = type(v)
    if t is bool:
        out += b"T" if v else b"F"
    elif t is int:
        n = v.bit_length() // 8 + 1            # room for the sign bit
        if n > 255:
            raise TypeError("integer too large for a cache entry")
        out += b"i" + bytes((n,)) + v.to_bytes(n, "little", signed=True)
    elif t is float:
        out += b"f" + _F64.pack(v)
    elif t is str:
        data = v.encode()                       # UnicodeEncodeError (a ValueError) for lone surrogates
        out += b"s" + _U32.pack(len(data)) + data
    elif t is bytes:
        out += b"b" + _U32.pack(len(v)) + v
    elif t is list or t is dict:
        if depth >= MAX_DEPTH:
            raise TypeError("nested too deeply for a cache entry")
        out += (b"l" if t is list else b"d") + _U32.pack(len(v))
        if t is list:
            for item in v:
                _put(out, item, depth + 1)
            return
        for key, item in v.items():
            if type(key) is not str:
                raise TypeError(f"cache entry dict keys must be str, not {type(key).__name__}")
            data = key.encode()
            out += _U32.pack(len(data)) + data
            _put(out, item, depth + 1)
    else:
        raise TypeError(f"a cache entry cannot hold {t.__name__}")


def loads(raw: bytes):
    """The value of an entry dumps() wrote; CacheFileError for anything else (damaged, truncated, foreign)."""
    if type(raw) is not bytes:
        raise CacheFileError("not bytes")
    if len(raw) > MAX_BYTES:
        raise CacheFileError("too large")
    if not raw.startswith(MAGIC) or len(raw) < _HEAD + 1:
        raise CacheFileError("not a pykvm cache entry")
    body = memoryview(raw)[_HEAD:]
    if digest.hexdigest(body).encode() != raw[len(MAGIC):_HEAD]:
        raise CacheFileError("digest mismatch")
    value, end = _Reader(raw).value(_HEAD, 0)
    if end != len(raw):
        raise CacheFileError("bytes after the value")
    return value


class _Reader:
    """One pass over an entry's bytes; every read is bounds-checked against what is there."""

    def __init__(self, raw: bytes):
        self.raw = raw
        self.size = len(raw)

    def _take(self, i: int, n: int) -> int:
        if i + n > self.size:
            raise CacheFileError("truncated")
        return i + n

    def _u32(self, i: int) -> tuple[int, int]:
        end = self._take(i, 4)
        return _U32.unpack_from(self.raw, i)[0], end

    def _str(self, i: int) -> tuple[str, int]:
        n, i = self._u32(i)
        end = self._take(i, n)
        try:
            return self.raw[i:end].decode(), end
        except UnicodeDecodeError:
            raise CacheFileError("bad UTF-8") from None

    def value(self, i: int, depth: int):
        """(the value starting at offset i, the offset after it)."""
        raw = self.raw
        tag = raw[i:i + 1]
        i += 1
        if tag == b"s":
            return self._str(i)
        if tag == b"i":
            end = self._take(i, 1)
            n = raw[i]
            end = self._take(end, n)
            if n == 0:
                raise CacheFileError("empty integer")
            return int.from_bytes(raw[i + 1:end], "little", signed=True), end
        if tag == b"d" or tag == b"l":
            if depth >= MAX_DEPTH:
                raise CacheFileError("nested too deeply")
            count, i = self._u32(i)
            if count > self.size - i:          # every element takes at least a byte
                raise CacheFileError("count past the end")
            if tag == b"l":
                items = []
                for _ in range(count):
                    item, i = self.value(i, depth + 1)
                    items.append(item)
                return items, i
            table = {}
            for _ in range(count):
                key, i = self._str(i)
                table[key], i = self.value(i, depth + 1)
            if len(table) != count:
                raise CacheFileError("a key twice")
            return table, i
        if tag == b"T" or tag == b"F":
            return tag == b"T", i
        if tag == b"f":
            end = self._take(i, 8)
            return _F64.unpack_from(raw, i)[0], end
        if tag == b"b":
            n, i = self._u32(i)
            end = self._take(i, n)
            return raw[i:end], end
        raise CacheFileError("unknown tag" if tag else "truncated")


def read(path: str):
    """The value stored at path, or None when the file is absent, unreadable or not an intact entry."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        return loads(raw)
    except (OSError, CacheFileError):
        return None


def write(path: str, value) -> None:
    """Store value at path atomically (TypeError/ValueError if the format cannot hold it); an unwritable cache costs speed, not correctness."""
    data = dumps(value)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
