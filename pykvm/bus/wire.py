"""Frames between a partition process and the broker (pykvm up) on their unix socket.

A frame is an 8-byte header (u32 body length, u8 kind, u8 descriptor count, 2 reserved
bytes) and a body. Control frames (HELLO, WELCOME, REGISTER, STATUS) carry one JSON
object; data frames (REQUEST, REPLY, REMAP) a 16-byte tag header, a block request or
response, and the data (REMAP: a remap descriptor instead, pykvm/bus/remap.py). DIRECT
frames (JSON) set up and close direct channels (pykvm/bus/direct.py). Only REMAP and
DIRECT frames carry descriptors (SCM_RIGHTS, sent with the frame's first byte, so they
have arrived by the time its last byte has). Both ends treat the other as untrusted:
FrameParser raises WireError on a length over MAX_BODY, an unknown kind, descriptors on a
kind that takes none, more than MAX_FDS, or descriptors that did not arrive, and the
reader drops the peer; descriptors it holds are closed then (close()).
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct

HELLO, WELCOME, REGISTER, REQUEST, REPLY, STATUS, REMAP, DIRECT = 1, 2, 3, 4, 5, 6, 7, 8
KINDS = {HELLO: "hello", WELCOME: "welcome", REGISTER: "register", REQUEST: "request", REPLY: "reply",
         STATUS: "status", REMAP: "remap", DIRECT: "direct"}
JSON_KINDS = (HELLO, WELCOME, REGISTER, STATUS, DIRECT)
FD_KINDS = (REMAP, DIRECT)            # DIRECT: a direct channel's open (memfds, eventfd) or its answer (eventfd)
HEADER = struct.Struct("<IB3x")       # body length, kind (then the descriptor count, 2 reserved bytes)
_HEADER_FDS = struct.Struct("<IBB2x")  # body length, kind, descriptors attached
MAX_FDS = 4                           # per REMAP frame: one memfd per guest memory region the buffer touches
MAX_QUEUED_FDS = 16                   # received but not yet claimed by a complete frame
DECLINED = 1                          # a REPLY's index field: the REMAP was not done, send the request by copy
TAG = struct.Struct("<QI4x")          # tag, service index (REQUEST) / 0 (REPLY)
BLK = struct.Struct("<IIQII")         # struct pykvm_blk_request / pykvm_blk_response
MAX_BODY = 1 << 20                    # one relayed request carries at most a few KiB; 1 MiB bounds a peer
MAX_JSON = 64 << 10


class WireError(Exception):
    """The peer sent something that is not a frame; the connection is dropped."""


def frame(kind: int, body: bytes, nfds: int = 0) -> bytes:
    """One encoded frame (nfds: descriptors sent with it, REMAP and DIRECT only)."""
    if kind not in KINDS or len(body) > MAX_BODY or not 0 <= nfds <= MAX_FDS or (nfds and kind not in FD_KINDS):
        raise ValueError(f"frame of kind {kind}, {len(body)} bytes and {nfds} descriptors")
    return _HEADER_FDS.pack(len(body), kind, nfds) + body


def json_frame(kind: int, obj: dict, nfds: int = 0) -> bytes:
    """A control frame carrying obj (nfds: descriptors sent with it, DIRECT only)."""
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode(), nfds)


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


class Frame(tuple):
    """A (kind, body) pair; .fds are the descriptors that came with it (the receiver closes them)."""

    fds: tuple[int, ...] = ()

    def __new__(cls, kind: int, body: bytes, fds: tuple[int, ...] = ()):
        f = super().__new__(cls, (kind, body))
        f.fds = fds
        return f


def close_fds(fds) -> None:
    """Close received descriptors, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FrameParser:
    """Splits a byte stream (and the descriptors received with it) into Frames."""

    def __init__(self):
        self._buf = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds=()) -> list[Frame]:
        """The frames completed by data (WireError on a malformed one; the stream is then unusable)."""
        self._buf += data
        self._fds += fds
        if len(self._fds) > MAX_QUEUED_FDS:
            raise WireError(f"{len(self._fds)} descriptors received ahead of their frames (at most {MAX_QUEUED_FDS})")
        out: list[Frame] = []
        try:
            while len(self._buf) >= HEADER.size:
                length, kind, nfds = _HEADER_FDS.unpack_from(self._buf)
                if kind not in KINDS:
                    raise WireError(f"unknown frame kind {kind}")
                if length > MAX_BODY:
                    raise WireError(f"frame of {length} bytes (at most {MAX_BODY})")
                if nfds > MAX_FDS or (nfds and kind not in FD_KINDS):
                    raise WireError(f"{KINDS[kind]} frame with {nfds} descriptors")
                if len(self._buf) < HEADER.size + length:
                    break
                if nfds > len(self._fds):
                    raise WireError(f"{KINDS[kind]} frame names {nfds} descriptors; {len(self._fds)} arrived")
                taken, self._fds = tuple(self._fds[:nfds]), self._fds[nfds:]
                out.append(Frame(kind, bytes(self._buf[HEADER.size:HEADER.size + length]), taken))
                del self._buf[:HEADER.size + length]
        except WireError:
            for f in out:
                close_fds(f.fds)
            raise
        return out

    def close(self) -> None:
        """Close the descriptors received but not handed out (the peer is dropped)."""
        fds, self._fds = self._fds, []
        close_fds(fds)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)

    @property
    def pending_fds(self) -> int:
        """Descriptors received and not yet handed out with a frame."""
        return len(self._fds)


def recv(sock: socket.socket, size: int = 1 << 16) -> tuple[bytes, list[int]]:
    """(data, descriptors) of one recvmsg; WireError (descriptors closed) when the kernel cut the descriptors short."""
    data, anc, flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(MAX_QUEUED_FDS * 4))
    fds: list[int] = []
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
            fds += a
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise WireError("more descriptors than a frame may carry")
    return data, fds


def send(sock: socket.socket, data: bytes, fds=()) -> None:
    """sendall, with fds attached to the first byte (SCM_RIGHTS)."""
    if not fds:
        sock.sendall(data)
        return
    n = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if n < len(data):
        sock.sendall(data[n:])
