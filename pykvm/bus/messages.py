"""Channel-management messages of the partition bus: the one place their bytes are parsed and built.

A message is a struct pykvm_bus_msg (type, body size) and a body whose layout the type
fixes (pykvm_abi.h). parse() takes untrusted bytes from the management ring and returns a
small validated object, or raises MessageError saying what is wrong; build_*() make the
host's messages.
"""

from __future__ import annotations

import struct

from .. import abi
from ..record import record

_sizeof = abi.ffi.sizeof
HDR = struct.Struct("<II")
MAX_VERSIONS = abi.PYKVM_BUS_MAX_VERSIONS
MAX_SERVICE_VERSIONS = abi.PYKVM_BUS_MAX_SERVICE_VERSIONS
PFNS_PER_MSG = abi.PYKVM_BUS_GPADL_PFNS_PER_MSG

MSG = {name[len("PYKVM_BUS_MSG_"):].lower(): value for name, value in abi.constants.items()
       if name.startswith("PYKVM_BUS_MSG_")}
NAMES = {v: k for k, v in MSG.items()}


class MessageError(ValueError):
    """A management message that breaks the protocol."""


def version_text(v: int) -> str:
    """'1.1' for 0x10001."""
    return f"{v >> 16}.{v & 0xFFFF}"


def versions_text(vs) -> str:
    """'2.0, 1.1' for a version list."""
    return ", ".join(version_text(v) for v in vs) or "none"


@record(frozen=True)
class InitiateContact:
    versions: tuple[int, ...]
    target_vcpu: int


@record(frozen=True)
class RequestOffers:
    pass


@record(frozen=True)
class GpadlHeader:
    gpadl: int
    total: int
    pfns: tuple[int, ...]


@record(frozen=True)
class GpadlBody:
    gpadl: int
    pfns: tuple[int, ...]


@record(frozen=True)
class GpadlTeardown:
    gpadl: int


@record(frozen=True)
class OpenChannel:
    relid: int
    ring_gpadl: int
    inbound_offset: int
    target_vcpu: int
    versions: tuple[int, ...]
    data_gpadl: int = 0            # 0: none (a data buffer only for offers flagged DATA_BUFFER)


@record(frozen=True)
class CloseChannel:
    relid: int


@record(frozen=True)
class RelidReleased:
    relid: int


@record(frozen=True)
class Unload:
    pass


_BODY = {   # guest->host type -> (struct name or None for no body)
    MSG["initiate_contact"]: "struct pykvm_bus_initiate",
    MSG["request_offers"]: None,
    MSG["gpadl_header"]: "struct pykvm_bus_gpadl_header",
    MSG["gpadl_body"]: "struct pykvm_bus_gpadl_body",
    MSG["gpadl_teardown"]: "struct pykvm_bus_gpadl_result",
    MSG["open"]: "struct pykvm_bus_open",
    MSG["close"]: "struct pykvm_bus_relid_msg",
    MSG["relid_released"]: "struct pykvm_bus_relid_msg",
    MSG["unload"]: None,
}
_SIZE = {t: (_sizeof(s) if s else 0) for t, s in _BODY.items()}
_U32x2 = struct.Struct("<II")
_INITIATE = struct.Struct(f"<II{MAX_VERSIONS}I")
_GPADL_HEADER = struct.Struct("<IIII")
_GPADL_BODY = struct.Struct("<II")
_OPEN = struct.Struct(f"<IIIIII{MAX_SERVICE_VERSIONS}I")


def _versions(count: int, raw, limit: int, what: str) -> tuple[int, ...]:
    if not 1 <= count <= limit:
        raise MessageError(f"{what}: {count} versions (1..{limit} allowed)")
    return tuple(raw[:count])


def _pfns(data: bytes, at: int, count: int) -> tuple[int, ...]:
    if not 0 <= count <= PFNS_PER_MSG:
        raise MessageError(f"{count} pfns in one message (at most {PFNS_PER_MSG})")
    return struct.unpack_from(f"<{count}Q", data, at)


def parse(payload: bytes):
    """One guest->host management message from an in-band packet's payload."""
    if len(payload) < HDR.size:
        raise MessageError(f"message of {len(payload)} bytes is shorter than its header")
    kind, size = HDR.unpack_from(payload)
    if kind not in _BODY:
        raise MessageError(f"unknown message type {kind}")
    want = _SIZE[kind]
    # the ring pads payloads to 8 bytes: accept padding, never a short body or a size that lies
    if size != want or len(payload) < HDR.size + want:
        raise MessageError(f"{NAMES[kind]}: body of {size} bytes ({len(payload) - HDR.size} present), "
                           f"expected {want}")
    body = payload[HDR.size:HDR.size + want]
    if kind == MSG["initiate_contact"]:
        count, vcpu, *vs = _INITIATE.unpack(body)
        return InitiateContact(_versions(count, vs, MAX_VERSIONS, "initiate contact"), vcpu)
    if kind == MSG["request_offers"]:
        return RequestOffers()
    if kind == MSG["unload"]:
        return Unload()
    if kind == MSG["gpadl_header"]:
        gpadl, total, count, _r = _GPADL_HEADER.unpack_from(body)
        if count > total:
            raise MessageError(f"gpadl header: {count} pfns of a {total}-page GPADL")
        return GpadlHeader(gpadl, total, _pfns(body, _GPADL_HEADER.size, count))
    if kind == MSG["gpadl_body"]:
        gpadl, count = _GPADL_BODY.unpack_from(body)
        return GpadlBody(gpadl, _pfns(body, _GPADL_BODY.size, count))
    if kind == MSG["gpadl_teardown"]:
        return GpadlTeardown(_U32x2.unpack(body)[0])
    if kind == MSG["open"]:
        relid, gpadl, inbound, vcpu, count, data_gpadl, *vs = _OPEN.unpack(body)
        return OpenChannel(relid, gpadl, inbound, vcpu, _versions(count, vs, MAX_SERVICE_VERSIONS, "open channel"),
                           data_gpadl)
    relid = _U32x2.unpack(body)[0]
    return CloseChannel(relid) if kind == MSG["close"] else RelidReleased(relid)


def _msg(kind: str, body: bytes) -> bytes:
    return HDR.pack(MSG[kind], len(body)) + body


def _padded(vs, n: int) -> list[int]:
    vs = list(vs)[:n]
    return vs + [0] * (n - len(vs))


def version_response(accepted: bool, version: int, supported) -> bytes:
    """VERSION_RESPONSE: the version in force, or a refusal listing what the host speaks."""
    sup = list(supported)[:MAX_VERSIONS]
    return _msg("version_response", struct.pack(f"<IIII{MAX_VERSIONS}I", int(accepted), version, len(sup), 0,
                                                 *_padded(sup, MAX_VERSIONS)))


def offer(relid: int, interface: tuple[int, int], instance: tuple[int, int], versions, flags: int = 0) -> bytes:
    """OFFER of one channel."""
    vs = list(versions)[:MAX_SERVICE_VERSIONS]
    return _msg("offer", struct.pack(f"<IIQQQQII{MAX_SERVICE_VERSIONS}I", relid, flags, *interface, *instance,
                                     len(vs), 0, *_padded(vs, MAX_SERVICE_VERSIONS)))


def simple(kind: str) -> bytes:
    """A message without a body (ALL_OFFERS_DELIVERED, UNLOAD_RESPONSE)."""
    return _msg(kind, b"")


def relid_msg(kind: str, relid: int, reason: int = 0) -> bytes:
    """RESCIND or CLOSED."""
    return _msg(kind, _U32x2.pack(relid, reason))


def gpadl_result(kind: str, gpadl: int, status: int) -> bytes:
    """GPADL_CREATED or GPADL_TORNDOWN."""
    return _msg(kind, _U32x2.pack(gpadl, status))


def open_result(relid: int, status: int, version: int = 0, supported=(), xfer_gpa: int = 0,
                xfer_pages: int = 0) -> bytes:
    """OPEN_RESULT: the service version in force (and the channel's transfer pages), or a refusal."""
    sup = list(supported)[:MAX_SERVICE_VERSIONS]
    return _msg("open_result", struct.pack(f"<IIII{MAX_SERVICE_VERSIONS}IQII", relid, status, version, len(sup),
                                           *_padded(sup, MAX_SERVICE_VERSIONS), xfer_gpa, xfer_pages, 0))


def negotiate(proposed, supported) -> int | None:
    """The version to use: the newest proposed one whose major the other side speaks, at the lower minor.

    Both lists are newest first. A proposal of 1.3 against a side that speaks 1.0 and 1.1
    gives 1.1; no common major gives None.
    """
    for want in proposed:
        same_major = [v for v in supported if v >> 16 == want >> 16 and (v & 0xFFFF) <= (want & 0xFFFF)]
        if same_major:
            return max(same_major)
    return None
