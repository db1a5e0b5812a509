"""provider: the root's side of a service partition's guest serving others (pykvm_abi.h "provider v1.0").

The guest opens this channel and registers the interface and versions it serves; the
root then hands it relayed client requests (submit(), from the partition link's thread,
under the bus lock) one at a time, and passes each completion back to the broker. The
guest is untrusted like any other: a completion for a transaction that is not
outstanding, a reply of the wrong length or a registration for an interface the root
does not relay closes the channel (the broker then rescinds the clients' offers and
fails the requests this partition had not answered). The registered versions must be
distinct, newest first, and of a major the root relays (block 1.x: the relayed request
and response layouts are those of block 1.0); the client partitions' proxies offer them
and say which one a relayed request is for.

At provider v1.1 a request may come remapped (pykvm/bus/remap.py): the client's pages
are mapped at the window for exactly the time the guest holds the request, and removed
before the answer goes back, when the channel closes, or when the link goes away. A
remapped request this side cannot map (bad descriptor, not a memfd, KVM refuses, too
many waiting) is declined: the client's root sends it again by copy.
"""

from __future__ import annotations

import os
import struct
from collections import deque

from ... import abi
from .. import direct, remap, wire
from ..ring import COMPLETION, COMPLETION_REQ, INBAND
from ..messages import versions_text
from .base import Service, ServiceError, Session, unpack_exact

SECTOR = abi.PYKVM_BLK_SECTOR
_REGISTER = struct.Struct("<QQII%dI" % abi.PYKVM_BUS_MAX_SERVICE_VERSIONS)
_BLK = struct.Struct("<IIQII")
_REMAP = struct.Struct("<QII")      # struct pykvm_provider_remap
RELAYED = {(abi.PYKVM_BUS_IF_BLOCK_LO, abi.PYKVM_BUS_IF_BLOCK_HI): "block",
           (abi.PYKVM_BUS_IF_ECHO_LO, abi.PYKVM_BUS_IF_ECHO_HI): "echo"}      # echo: direct channels only
MAX_WAITING_REMAPS = 8             # remapped requests queued with their descriptors; more are declined
RELAYED_MAJORS = {"block": (abi.PYKVM_BLOCK_V1_0 >> 16,), "echo": (abi.PYKVM_ECHO_V1_0 >> 16,)}


class ProviderSession(Session):
    """The open provider channel of a service partition's guest."""

    def __init__(self, channel, version, link):
        super().__init__(channel, version)
        self.link = link
        self.registered = None          # (interface name, versions) once the guest registered
        self.queue: deque = deque()     # (tag, blk, data, remap) waiting for the guest; remap = (fds, runs, offset)
        self.inflight = None            # (tag, op, count, remapped) the guest is serving
        self.window = None              # the RemapWindow of the request in flight, if remapped
        self.served = 0
        self.counts = {"remapped": 0, "declined": 0, "unmapped": 0}
        self.direct_counts = {"opened": 0, "closed": 0, "refused": 0}
        self.directs: dict[int, tuple] = {}   # broker tag -> (ServiceEnd, client name)
        self.closed = False

    @property
    def can_direct(self) -> bool:
        """The guest speaks provider v1.2 (direct channels) and this VM can add memslots."""
        return self.version >= abi.PYKVM_PROVIDER_V1_2 and getattr(self.channel.host, "memslots", None) is not None

    @property
    def can_remap(self) -> bool:
        """The guest speaks provider v1.1 and this VM can add memslots."""
        return self.version >= abi.PYKVM_PROVIDER_V1_1 and getattr(self.channel.host, "memslots", None) is not None

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
            if interface != "block" and not self.can_direct:
                raise ServiceError(f"provider: {interface} is served over direct channels only (provider 1.2)")
            self.registered = (interface, versions)
            extra = {"direct": True} if self.can_direct else {}
            self.link.provider_up(self, interface, self.registered[1], remap=self.can_remap and interface == "block",
                                  **extra)
            return
        if pkt.type != COMPLETION:
            raise ServiceError(f"provider: packet of type {pkt.type}, expected a completion")
        if self.inflight is None or pkt.trans_id != self.inflight[0]:
            raise ServiceError(f"provider: completion for transaction {pkt.trans_id}, which is not outstanding")
        tag, op, count, remapped = self.inflight
        resp = unpack_exact(_BLK, pkt.payload, "provider reply")
        data = bytes(pkt.payload[_BLK.size:])
        want = count * SECTOR if op == abi.PYKVM_BLK_OP_READ and resp[0] == abi.PYKVM_BUS_OK and not remapped else 0
        if not want <= len(data) < want + 8:     # the payload is padded to 8 bytes, nothing more
            raise ServiceError(f"provider: reply of {len(data)} data bytes to a request for {want}")
        self.inflight = None
        self._unmap()                            # the pages leave this partition before the client hears back
        self.served += 1
        self.link.reply(tag, resp, data[:want])
        self._next()

    def direct_open(self, tag: int, obj: dict, fds) -> None:
        """Wire a client's direct channel into this guest and offer it (bus lock held); owns fds from here."""
        end = None
        try:
            if self.closed or not self.can_direct or self.registered is None:
                raise direct.DirectError("this partition's guest does not serve direct channels")
            o = direct.parse_open(obj, len(fds))
            if o.version not in self.registered[1]:
                raise direct.DirectError(f"version {o.version:#x} is not one the guest registered")
            used = {e.slot for e, _c in self.directs.values()}
            slot = next((i for i in range(abi.PYKVM_DIRECT_MAX) if i not in used), None)
            if slot is None:
                raise direct.DirectError(f"{abi.PYKVM_DIRECT_MAX} direct channels are open")
            end = direct.ServiceEnd(self.channel.host, slot, fds[:-1], o.runs, os.dup(fds[-1]), o.data_runs)
            self.channel.send(INBAND, direct.MSG.pack(abi.PYKVM_DIRECT_OPEN, slot, end.gpa, o.pages, o.inbound,
                                                      end.doorbell, o.version, o.flags, o.max_message,
                                                      end.data_gpa, o.data_pages, o.max_transfer))
        except (direct.DirectError, OSError) as e:
            if end is not None:
                end.close()
            wire.close_fds(fds)
            self.direct_counts["refused"] += 1
            self.link.log(f"direct open {tag} from {obj.get('client')}: {e}")
            return self.link.direct_ready(tag, False, str(e))
        wire.close_fds(fds)                      # mapped and registered: this VMM keeps no client descriptor
        self.directs[tag] = (end, obj.get("client"))
        self.direct_counts["opened"] += 1
        self.link.direct_ready(tag, True, None, end.efd)

    def direct_close(self, tag: int, reason: str | None = None) -> None:
        """A direct channel's client closed it or went away: this guest loses its pages now (bus lock held).

        The caller acknowledges the close to the client's side afterwards (its guest may reuse the pages then).
        """
        entry = self.directs.pop(tag, None)
        if entry is None:
            return
        end, _client = entry
        end.close()                              # first: no page of the client stays mapped a moment longer
        self.direct_counts["closed"] += 1
        if self.channel.writer is not None:
            self.channel.send(INBAND, direct.MSG.pack(abi.PYKVM_DIRECT_CLOSE, end.slot, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    def submit(self, tag: int, blk: tuple, data: bytes) -> None:
        """Queue a relayed request for the guest (bus lock held)."""
        blk = blk[:4] + (0,)      # reserved2 marks a remapped request (PYKVM_PROVIDER_REQ_REMAPPED): never by copy
        self.queue.append((tag, blk, data, None))
        if self.inflight is None:
            self._next()

    def submit_remap(self, tag: int, blk: tuple, desc: bytes, fds: tuple) -> None:
        """Queue a remapped request (bus lock held); this session owns fds from here (closed or declined)."""
        op, _r, _sector, count, _r2 = blk
        try:
            if self.closed or not self.can_remap:
                raise remap.RemapError("this provider does not take remapped requests")
            if op not in (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE) or not 1 <= count <= abi.PYKVM_BLK_MAX_SECTORS:
                raise remap.RemapError(f"remapped operation {op} of {count} sectors")
            if sum(1 for e in self.queue if e[3] is not None) >= MAX_WAITING_REMAPS:
                raise remap.RemapError("too many remapped requests waiting")
            offset, runs = remap.parse(desc, len(fds), count * SECTOR)
        except remap.RemapError as e:
            wire.close_fds(fds)
            return self._decline(tag, str(e))
        self.queue.append((tag, blk, b"", (fds, runs, offset)))
        if self.inflight is None:
            self._next()

    def _decline(self, tag: int, reason: str) -> None:
        self.counts["declined"] += 1
        self.last_decline = reason
        self.link.reply(tag, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0), b"", declined=True)

    def _next(self) -> None:
        while self.queue and self.channel.writer is not None and self.inflight is None:
            tag, blk, data, rm = self.queue.popleft()
            if rm is None:
                self.inflight = (tag, blk[0], blk[3], False)
                self.channel.send(INBAND, _BLK.pack(*blk) + data, tag, COMPLETION_REQ)
                return
            fds, runs, offset = rm
            try:
                self.window = remap.RemapWindow(self.channel.host.memslots, fds, runs,
                                                writable=blk[0] == abi.PYKVM_BLK_OP_READ)
            except (remap.RemapError, OSError) as e:
                self._decline(tag, str(e))
                continue
            finally:
                wire.close_fds(fds)              # the mapping keeps the pages; this VMM keeps no descriptor
            self.counts["remapped"] += 1
            self.inflight = (tag, blk[0], blk[3], True)
            op, version, sector, count, _r2 = blk
            self.channel.send(INBAND, _BLK.pack(op, version, sector, count, abi.PYKVM_PROVIDER_REQ_REMAPPED) +
                              _REMAP.pack(remap.WINDOW_GPA + offset, count * SECTOR, 0), tag, COMPLETION_REQ)
            return

    def _unmap(self) -> None:
        w, self.window = self.window, None
        if w is not None:
            w.close()
            self.counts["unmapped"] += 1

    def cancel(self, tag: int) -> None:
        """The client of `tag` went away: its pages leave this partition now (the guest's answer is dropped)."""
        if self.inflight is not None and self.inflight[0] == tag and self.inflight[3]:
            self._unmap()
        for i, e in enumerate(self.queue):
            if e[0] == tag and e[3] is not None:
                del self.queue[i]
                wire.close_fds(e[3][0])
                break

    def stats(self) -> dict:
        return dict(self.counts, registered=self.registered[0] if self.registered else None, served=self.served,
                    direct_channels=dict(self.direct_counts),
                    direct={str(t): {"slot": e.slot, "client": c, "gpa": hex(e.gpa), "mapped": e.mapped,
                                     "data_gpa": hex(e.data_gpa)}
                            for t, (e, c) in self.directs.items()},
                    queued=len(self.queue), inflight=self.inflight is not None, window_mapped=self.window is not None,
                    version=self.version)

    def close(self) -> None:
        self.closed = True
        self._unmap()
        for end, _client in self.directs.values():
            end.close()
        self.directs.clear()
        while self.queue:
            e = self.queue.popleft()
            if e[3] is not None:
                wire.close_fds(e[3][0])
        c = self.counts
        d = self.direct_counts
        if d["opened"] or d["refused"]:
            db = getattr(self.channel.host, "doorbells", None)
            self.link.log(f"provider closed: {d['opened']} direct channels opened, {d['closed']} closed, "
                          f"{d['refused']} refused; this VMM's doorbell thread woke "
                          f"{getattr(db, 'thread_wakeups', 0)} times, its link thread "
                          f"{self.link.counts.get('wakeups', 0)} times")
        if c["remapped"] or c["declined"]:
            self.link.log(f"provider closed: {self.served} served, {c['remapped']} remapped, {c['unmapped']} unmapped, "
                          f"{c['declined']} declined, window mapped: {'yes' if self.window else 'no'}")
        self.link.provider_down(self, self.channel.closed_reason)


class ProviderService(Service):
    """Offered to a partition the topology lets provide a service."""

    name = "provider"
    interface = (abi.PYKVM_BUS_IF_PROVIDER_LO, abi.PYKVM_BUS_IF_PROVIDER_HI)
    versions = (abi.PYKVM_PROVIDER_V1_2, abi.PYKVM_PROVIDER_V1_1, abi.PYKVM_PROVIDER_V1_0)

    def __init__(self, link):
        self.link = link

    def open(self, channel, version: int) -> Session:
        return ProviderSession(channel, version, self.link)
