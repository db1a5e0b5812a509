"""Frames between a partition process and the broker (pykvm up) on their unix socket.

A frame is an 8-byte header (u32 body length, u8 kind, 3 reserved bytes) and a body.
Control frames (HELLO, WELCOME, REGISTER, STATUS) carry one JSON object; data frames
(REQUEST, REPLY) a 16-byte tag header, a block request or response, and the data. Both
ends treat the other as untrusted: FrameParser raises WireError on a length over
MAX_BODY, an unknown kind, or a body that does not parse, and the reader drops the peer.
"""

from __future__ import annotations

import json
import struct

HELLO, WELCOME, REGISTER, REQUEST, REPLY, STATUS = 1, 2, 3, 4, 5, 6
KINDS = {HELLO: "hello", WELCOME: "welcome", REGISTER: "register", REQUEST: "request", REPLY: "reply",
         STATUS: "status"}
JSON_KINDS = (HELLO, WELCOME, REGISTER, STATUS)
HEADER = struct.Struct("<IB3x")
TAG = struct.Struct("<QI4x")          # tag, service index (REQUEST) / 0 (REPLY)
BLK = struct.Struct("<IIQII")         # struct pykvm_blk_request / pykvm_blk_response
MAX_BODY = 1 << 20                    # one relayed request carries at most a few KiB; 1 MiB bounds a peer
MAX_JSON = 64 << 10


class WireError(Exception):
    """The peer sent something that is not a frame; the connection is dropped."""


def frame(kind: int, body: bytes) -> bytes:
    """One encoded frame."""
    if kind not in KINDS or len(body) > MAX_BODY:
        raise ValueError(f"frame of kind {kind} and {len(body)} bytes")
    return HEADER.pack(len(body), kind) + body


def json_frame(kind: int, obj: dict) -> bytes:
    """A control frame carrying obj."""
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def data_frame(kind: int, tag: int, index: int, blk: tuple, data: bytes = b"") -> bytes:
    """A REQUEST or REPLY frame: tag header, a 24-byte block request/response, then data."""
    return frame(kind, TAG.pack(tag, index) + BLK.pack(*blk) + bytes(data))


def parse_json(body: bytes) -> dict:
    """The object of a control frame; WireError when it is not one."""
    if len(body) > MAX_JSON:
        raise WireError(f"control frame of {len(body)} bytes (at most {MAX_JSON})")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:   # deep nesting recurses past the limit well inside MAX_JSON
        raise WireError(f"control frame is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise WireError("control frame is not a JSON object")
    return obj


def parse_data(body: bytes) -> tuple[int, int, tuple, bytes]:
    """(tag, index, block fields, data) of a data frame; WireError when too short."""
    if len(body) < TAG.size + BLK.size:
        raise WireError(f"data frame of {len(body)} bytes (at least {TAG.size + BLK.size})")
    tag, index = TAG.unpack_from(body)
    return tag, index, BLK.unpack_from(body, TAG.size), bytes(body[TAG.size + BLK.size:])


class FrameParser:
    """Splits a byte stream into (kind, body) frames."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames completed by data (WireError on a malformed one; the stream is then unusable)."""
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            length, kind = HEADER.unpack_from(self._buf)
            if kind not in KINDS:
                raise WireError(f"unknown frame kind {kind}")
            if length > MAX_BODY:
                raise WireError(f"frame of {length} bytes (at most {MAX_BODY})")
            if len(self._buf) < HEADER.size + length:
                break
            out.append((kind, bytes(self._buf[HEADER.size:HEADER.size + length])))
            del self._buf[:HEADER.size + length]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)
