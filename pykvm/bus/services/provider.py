"""provider: the root's side of a service partition's guest serving others (pykvm_abi.h "provider v1.0").

The guest opens this channel and registers the interface and versions it serves; the
root then hands it relayed client requests (submit(), from the partition link's thread,
under the bus lock) one at a time, and passes each completion back to the broker. The
guest is untrusted like any other: a completion for a transaction that is not
outstanding, a reply of the wrong length or a registration for an interface the root
does not relay closes the channel (the broker then holds the requests for a restart).
The registered versions must be distinct, newest first, and of a major the root relays
(block 1.x: the relayed request and response layouts are those of block 1.0); the
client partitions' proxies offer them and say which one a relayed request is for.
"""

from __future__ import annotations

import struct
from collections import deque

from ... import abi
from ..ring import COMPLETION, COMPLETION_REQ, INBAND
from ..messages import versions_text
from .base import Service, ServiceError, Session, unpack_exact

SECTOR = abi.PYKVM_BLK_SECTOR
_REGISTER = struct.Struct("<QQII%dI" % abi.PYKVM_BUS_MAX_SERVICE_VERSIONS)
_BLK = struct.Struct("<IIQII")
RELAYED = {(abi.PYKVM_BUS_IF_BLOCK_LO, abi.PYKVM_BUS_IF_BLOCK_HI): "block"}
RELAYED_MAJORS = {"block": (abi.PYKVM_BLOCK_V1_0 >> 16,)}


class ProviderSession(Session):
    """The open provider channel of a service partition's guest."""

    def __init__(self, channel, version, link):
        super().__init__(channel, version)
        self.link = link
        self.registered = None          # (interface name, versions) once the guest registered
        self.queue: deque = deque()     # (tag, blk, data) waiting for the guest
        self.inflight = None            # (tag, op, count) the guest is serving
        self.served = 0

    def on_packet(self, pkt) -> None:
        if self.registered is None:
            if pkt.type != INBAND:
                raise ServiceError(f"provider: first packet of type {pkt.type}, expected the in-band registration")
            lo, hi, n, _r, *versions = unpack_exact(_REGISTER, pkt.payload, "provider registration")
            interface = RELAYED.get((lo, hi))
            if interface is None:
                raise ServiceError(f"provider: interface {hi:016x}{lo:016x} is not one the root relays")
            if not 1 <= n <= abi.PYKVM_BUS_MAX_SERVICE_VERSIONS:
                raise ServiceError(f"provider: {n} versions (1..{abi.PYKVM_BUS_MAX_SERVICE_VERSIONS})")
            versions = tuple(versions[:n])
            majors = RELAYED_MAJORS[interface]
            if (any(v >> 16 not in majors for v in versions) or len(set(versions)) != n
                    or list(versions) != sorted(versions, reverse=True)):
                raise ServiceError(f"provider: {interface} versions {versions_text(versions)} registered; the root "
                                   f"relays {interface} {', '.join(f'{m}.x' for m in majors)}, distinct, newest first")
            self.registered = (interface, versions)
            self.link.provider_up(self, interface, self.registered[1])
            return
        if pkt.type != COMPLETION:
            raise ServiceError(f"provider: packet of type {pkt.type}, expected a completion")
        if self.inflight is None or pkt.trans_id != self.inflight[0]:
            raise ServiceError(f"provider: completion for transaction {pkt.trans_id}, which is not outstanding")
        tag, op, count = self.inflight
        resp = unpack_exact(_BLK, pkt.payload, "provider reply")
        data = bytes(pkt.payload[_BLK.size:])
        want = count * SECTOR if op == abi.PYKVM_BLK_OP_READ and resp[0] == abi.PYKVM_BUS_OK else 0
        if not want <= len(data) < want + 8:     # the payload is padded to 8 bytes, nothing more
            raise ServiceError(f"provider: reply of {len(data)} data bytes to a request for {want}")
        self.inflight = None
        self.served += 1
        self.link.reply(tag, resp, data[:want])
        self._next()

    def submit(self, tag: int, blk: tuple, data: bytes) -> None:
        """Queue a relayed request for the guest (bus lock held)."""
        self.queue.append((tag, blk, data))
        if self.inflight is None:
            self._next()

    def _next(self) -> None:
        if not self.queue or self.channel.writer is None:
            return
        tag, blk, data = self.queue.popleft()
        self.inflight = (tag, blk[0], blk[3])
        self.channel.send(INBAND, _BLK.pack(*blk) + data, tag, COMPLETION_REQ)

    def stats(self) -> dict:
        return {"registered": self.registered[0] if self.registered else None, "served": self.served,
                "queued": len(self.queue), "inflight": self.inflight is not None}

    def close(self) -> None:
        self.link.provider_down(self, self.channel.closed_reason)


class ProviderService(Service):
    """Offered to a partition the topology lets provide a service."""

    name = "provider"
    interface = (abi.PYKVM_BUS_IF_PROVIDER_LO, abi.PYKVM_BUS_IF_PROVIDER_HI)
    versions = (abi.PYKVM_PROVIDER_V1_0,)

    def __init__(self, link):
        self.link = link

    def open(self, channel, version: int) -> Session:
        return ProviderSession(channel, version, self.link)
