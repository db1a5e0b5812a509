"""block, served by another partition: the client side of a proxied block channel.

The client guest opens an offer with the block interface id and speaks exactly the
protocol of services/block.py; it cannot tell that a service partition answers. Each
request is validated here (the client is untrusted), put to the policy agent (writes,
size, rate), copied out of the client's GPA-direct buffers, split into relayed requests of
at most PYKVM_PROVIDER_MAX_SECTORS sectors and sent to the broker over the partition link.
Replies arrive on the link thread (under the bus lock): read data is copied into the
client's buffers and the client gets one completion when every piece is answered.
When the service partition goes away the link rescinds this offer (its requests in
flight fail: replies that come later are dropped) and offers it again, under a new
relid, once a restarted service partition registers (see bus/link.py, broker.py).

A read or write of at least `remap_min` bytes whose buffer is remappable (bus/remap.py)
and which the policy agent allows (may_remap) goes as one REMAP request instead: no
copy, no splitting; the service partition maps the pages for the request's duration.
Declined (the provider cannot map it or is down), it goes by copy.

Versions: the offer lists the versions the service partition's guest registered (block
majors the root relays), learned from the broker; the client opens at the newest one both
speak that the policy agent allows (may_open, asked per candidate, newest first), and every
relayed request carries that version in its pykvm_blk_request.reserved field (a remapped
one also has reserved2 = PYKVM_PROVIDER_REQ_REMAPPED).
Floods: a channel has at most the policy's max_outstanding requests relayed and unanswered;
more are answered PYKVM_BUS_E_LIMIT, and FLOOD_STREAK limit refusals in a row close it.
"""

from __future__ import annotations

import struct

from ... import abi
from .. import remap, wire
from ..messages import negotiate, version_text, versions_text
from ..ring import COMPLETION, GPA_DIRECT, INBAND
from .base import Service, ServiceError, Session, unpack_exact
from .block import BlockSession

SECTOR = abi.PYKVM_BLK_SECTOR
CHUNK = abi.PYKVM_PROVIDER_MAX_SECTORS
REMAP_MIN = 4096         # bytes: one page (see remap_min_bytes in bus/policy.py)
_REQ = struct.Struct("<IIQII")
_RESP = struct.Struct("<IIQII")
FLOOD_STREAK = 64           # E_LIMIT answers in a row after which a channel is closed as flooding
_OPS = {abi.PYKVM_BLK_OP_READ: "read", abi.PYKVM_BLK_OP_WRITE: "write", abi.PYKVM_BLK_OP_FLUSH: "flush",
        abi.PYKVM_BLK_OP_INFO: "info"}


class _Pending:
    __slots__ = ("trans_id", "op", "spans", "remaining", "status", "flags", "capacity")

    def __init__(self, trans_id, op, spans, pieces):
        self.trans_id = trans_id
        self.op = op
        self.spans = spans
        self.remaining = pieces
        self.status = abi.PYKVM_BUS_OK
        self.flags = 0
        self.capacity = 0


class ProxySession(Session):
    """One client channel to a block service in another partition."""

    def __init__(self, channel, version, service):
        super().__init__(channel, version)
        self.service = service
        self.open = True
        self.outstanding = 0            # relayed pieces unanswered
        self.requests_open = 0          # client requests not yet completed
        self.limited = 0                # E_LIMIT answers in a row
        self.counts = {"read": 0, "write": 0, "flush": 0, "info": 0, "refused": 0, "errors": 0, "relayed": 0,
                       "remapped": 0, "remap_declined": 0}
        self.remap_tags: set[int] = set()      # link tags of remapped requests not answered yet

    def _complete(self, trans_id: int, status: int, flags: int = 0, capacity: int = 0) -> None:
        self.channel.send(COMPLETION, _RESP.pack(status, flags, capacity, SECTOR, 0), trans_id)

    def on_packet(self, pkt) -> None:
        if pkt.type not in (GPA_DIRECT, INBAND):
            raise ServiceError(f"block takes GPA-direct or in-band requests, got packet type {pkt.type}")
        op, _r, sector, count, _r2 = unpack_exact(_REQ, pkt.payload, "block request")
        name = _OPS.get(op)
        if name is None:
            raise ServiceError(f"block: unknown operation {op}")
        svc, ledger = self.service, self.service.ledger
        data_op = op in (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE)
        # the provider checks the disk's size; here only that every relayed piece's sector fits its u64
        if data_op and (not 1 <= count <= abi.PYKVM_BLK_MAX_SECTORS or sector + count > 1 << 64):
            self.counts["errors"] += 1
            return self._complete(pkt.trans_id, abi.PYKVM_BUS_E_INVALID)
        if data_op and pkt.type != GPA_DIRECT:
            raise ServiceError("block: reads and writes of a proxied disk need a GPA-direct buffer")
        spans = BlockSession._spans(pkt.ranges, count * SECTOR) if data_op else []
        if op == abi.PYKVM_BLK_OP_WRITE and ledger.check("may_write", svc.target) is not None:
            self.counts["refused"] += 1
            return self._complete(pkt.trans_id, abi.PYKVM_BUS_E_READ_ONLY, abi.PYKVM_BLK_FLAG_READ_ONLY)
        if ledger.check("may_request", svc.target, name, count if data_op else 0, self.requests_open) is not None:
            self.counts["refused"] += 1
            self.limited += 1
            if self.limited >= FLOOD_STREAK:
                raise ServiceError(f"flooding: {self.limited} requests in a row over the policy's limits")
            return self._complete(pkt.trans_id, abi.PYKVM_BUS_E_LIMIT)
        self.limited = 0
        self.counts[name] += 1
        self.requests_open += 1
        if not data_op:
            p = _Pending(pkt.trans_id, op, [], 1)
            self._relay(p, (op, self.version, 0, 0, 0), b"", 0, 0)
            return
        nbytes = count * SECTOR
        if nbytes >= svc.remap_min and svc.link is not None:
            planned = remap.plan(self.channel.host.memory, pkt.ranges, nbytes)
            if planned is not None and ledger.check("may_remap", svc.target, nbytes) is None:
                return self._relay_remap(pkt.trans_id, op, sector, count, spans, planned)
        self._copy(pkt.trans_id, op, sector, count, spans)

    def _copy(self, trans_id: int, op: int, sector: int, count: int, spans) -> None:
        """Relay a read or write by copy, in pieces of at most CHUNK sectors."""
        data = b""
        if op == abi.PYKVM_BLK_OP_WRITE:
            data = b"".join(self.channel.guest_read(gpa, n) for gpa, n in spans)   # one copy, then relayed
        pieces = (count + CHUNK - 1) // CHUNK
        p = _Pending(trans_id, op, spans, pieces)
        for k in range(pieces):
            n = min(CHUNK, count - k * CHUNK)
            at = k * CHUNK * SECTOR
            chunk = data[at:at + n * SECTOR] if data else b""
            self._relay(p, (op, self.version, sector + k * CHUNK, n, 0), chunk, at, n * SECTOR if not data else 0)

    def _relay_remap(self, trans_id: int, op: int, sector: int, count: int, spans, planned) -> None:
        """Relay one request whose pages the service partition maps (no data copied)."""
        offset, runs = planned
        fds: list[int] = []
        index_of: dict[int, int] = {}
        desc_runs = []
        for region, off, n in runs:
            if region.fd not in index_of:
                index_of[region.fd] = len(fds)
                fds.append(region.fd)
            desc_runs.append((index_of[region.fd], off, n))
        if len(fds) > wire.MAX_FDS:
            return self._copy(trans_id, op, sector, count, spans)
        p = _Pending(trans_id, op, spans, 1)
        self.outstanding += 1
        self.counts["remapped"] += 1
        box: list = [None, False]             # link tag, answered

        def answered(resp, rdata):
            box[1] = True
            self.remap_tags.discard(box[0])
            if resp is None:                    # declined: the same request by copy
                self.outstanding -= 1
                self.counts["remapped"] -= 1
                self.counts["remap_declined"] += 1
                if self.open:
                    self._copy(trans_id, op, sector, count, spans)
                return
            self._answered(p, resp, b"", 0, 0)

        box[0] = self.service.link.request_remap(self.service.index,
                                                 (op, self.version, sector, count, abi.PYKVM_PROVIDER_REQ_REMAPPED),
                                                 remap.pack(offset, desc_runs), fds, answered)
        if not box[1]:
            self.remap_tags.add(box[0])

    def _relay(self, p: _Pending, blk: tuple, data: bytes, at: int, expect: int) -> None:
        self.outstanding += 1
        self.counts["relayed"] += 1
        self.service.link.request(self.service.index, blk, data,
                                  lambda resp, rdata: self._answered(p, resp, rdata, at, expect))

    def _answered(self, p: _Pending, resp: tuple, rdata: bytes, at: int, expect: int) -> None:
        """A relayed piece came back (link thread, bus lock held)."""
        self.outstanding -= 1
        if not self.open:
            return
        status, flags, capacity = resp[0], resp[1], resp[2]
        if status == abi.PYKVM_BUS_OK and expect:
            if len(rdata) != expect:
                status = abi.PYKVM_BUS_E_IO
            else:
                self._scatter(p.spans, at, rdata)
        if status != abi.PYKVM_BUS_OK and p.status == abi.PYKVM_BUS_OK:
            p.status = status
        p.flags |= flags
        p.capacity = capacity
        p.remaining -= 1
        if p.remaining == 0:
            self.requests_open -= 1
            if p.status != abi.PYKVM_BUS_OK:
                self.counts["errors"] += 1
            if p.op == abi.PYKVM_BLK_OP_INFO and self.service.ledger.check("may_write", self.service.target):
                p.flags |= abi.PYKVM_BLK_FLAG_READ_ONLY      # the client learns it may not write
            self._complete(p.trans_id, p.status, p.flags, p.capacity)

    def _scatter(self, spans, at: int, data: bytes) -> None:
        """Write data into the client's buffer spans starting at byte `at` of the buffer."""
        pos = 0
        for gpa, n in spans:
            if at >= n:
                at -= n
                continue
            take = min(n - at, len(data) - pos)
            self.channel.guest_write(gpa + at, data[pos:pos + take])
            pos += take
            at = 0
            if pos == len(data):
                break

    def stats(self) -> dict:
        return dict(self.counts, outstanding=self.outstanding, requests_open=self.requests_open,
                    served_by=self.service.target, version=version_text(self.version))

    def close(self) -> None:
        self.open = False          # replies still in flight are dropped when they arrive
        for tag in list(self.remap_tags):
            self.service.link.cancel_remap(tag)      # the client's pages leave the service partition now
        self.remap_tags.clear()
        c = self.counts
        if c["remapped"] or c["remap_declined"]:
            self.service.link.log(f"{self.service.name}: {c['remapped']} requests remapped, {c['remap_declined']} "
                                  f"declined, {c['relayed']} pieces relayed by copy")


class BlockProxyService(Service):
    """A block offer whose disk lives in another partition (the topology's service `target`)."""

    interface = (abi.PYKVM_BUS_IF_BLOCK_LO, abi.PYKVM_BUS_IF_BLOCK_HI)
    default_versions = (abi.PYKVM_BLOCK_V1_0,)    # offered until the service partition registered its own

    def __init__(self, link, index: int, target: str, ledger, remap_min: int = REMAP_MIN):
        self.link = link
        self.remap_min = remap_min   # bytes from which a request is remapped rather than copied
        self.index = index          # the service's position in this partition's `uses`
        self.target = target
        self.ledger = ledger
        self.name = f"block@{target}"

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions the service partition's guest registered (newest first)."""
        return tuple(self.link.service_versions.get(self.target, ())) or self.default_versions

    def choose_version(self, proposed):
        """The newest version both sides speak that the policy lets this partition use."""
        offered = self.versions
        version = negotiate(proposed, offered)
        if version is None:
            return None, (f"the guest speaks {versions_text(proposed)}, {self.target}'s service partition "
                          f"{versions_text(offered)}: no common major version")
        why = None
        while version is not None:
            why = self.ledger.check("may_open", self.target, version)
            if why is None:
                return version, None
            offered = tuple(v for v in offered if v != version)
            version = negotiate(proposed, offered)
        return None, why

    def open(self, channel, version: int) -> Session:
        return ProxySession(channel, version, self)

    def stats(self) -> dict:
        return {"served_by": self.target, "versions": versions_text(self.versions)}
