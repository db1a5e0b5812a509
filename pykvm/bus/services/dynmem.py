"""dynamic memory: the guest reports each node's pressure; the host balloons, un-balloons and hot-adds per node.

Protocol (v1.0, in-band both ways) and the pressure figure: guests/include/pykvm_abi.h,
"dynamic memory". Everything the guest sends is untrusted. Malformed packets (short,
wrong type, unknown operation, range counts that do not match the length) close the
channel like any service violation. Well-formed messages with impossible contents are
refused one by one with a logged reason and never act on memory: a status report with
numbers that do not add up (rejected; a pressure below what committed/total implies is
clamped up), a balloon response naming pages outside the node, twice, beyond what was
asked, or for no outstanding request (rejected whole: nothing in it is released), a
hot-add acknowledgement for nothing outstanding. A flood of reports is coalesced: the
balancer runs at most once per `min_interval` per node.
"""

from __future__ import annotations

import struct
import time
from collections import deque

from ... import abi
from ...memory import PAGE_SIZE, GuestMemoryError
from ...memory import balancer
from ...memory.dynamic import DynamicMemory, RangeError
from ..ring import INBAND
from .base import Service, ServiceError, Session, unpack_exact

MSG = struct.Struct("<IIIIQII")           # struct pykvm_dm_msg
RANGE = struct.Struct("<QQ")              # struct pykvm_dm_range
STATUS = struct.Struct("<IIQQQ")          # struct pykvm_dm_node_status
MAX_RANGES = abi.PYKVM_DM_MAX_RANGES
PRESSURE_MAX = abi.PYKVM_DM_PRESSURE_MAX
MB = 1 << 20


class Tuning:
    """Balancer knobs (pages and seconds)."""

    hotadd_block = 4 * MB // PAGE_SIZE        # hot-add in 4 MiB pieces (or what is left)
    hysteresis = 2 * MB // PAGE_SIZE          # ignore differences below 2 MiB
    min_interval = 0.02                       # a node is decided at most this often
    request_timeout = 5.0                     # an unanswered balloon/hot-add request is dropped after this
    cooldown = 1.0                            # no balloon for a node this soon after it was grown


class _Request:
    __slots__ = ("kind", "req", "pages", "returned", "sent")

    def __init__(self, kind, req, pages):
        self.kind, self.req, self.pages, self.returned, self.sent = kind, req, pages, 0, time.monotonic()


class DynMemSession(Session):
    """One dynamic memory channel: the guest's reports in, the balancer's requests out."""

    def __init__(self, channel, version, service):
        super().__init__(channel, version)
        self.svc = service
        self.dm: DynamicMemory = service.dm
        self.pending: dict[int, _Request] = {}    # node -> its one outstanding request
        self.next_req = 1
        self.last_decided = [0.0] * len(self.dm.nodes)
        self.last_grown = [-1e9] * len(self.dm.nodes)
        self.counts = {"reports": 0, "coalesced": 0, "clamped": 0, "rejected": 0, "balloon_requests": 0,
                       "ballooned_pages": 0, "unballooned_pages": 0, "hotadds": 0, "hotadded_pages": 0,
                       "timeouts": 0}
        self.reaction_us: deque = deque(maxlen=256)

    # ---------------------------------------------------------------- guest -> host
    def on_packet(self, pkt) -> None:
        if pkt.type != INBAND:
            raise ServiceError(f"dynamic memory takes in-band packets, got type {pkt.type}")
        t0 = time.perf_counter()
        op, node, req, flags, pages, nr_ranges, _r = unpack_exact(MSG, pkt.payload, "dynamic memory message")
        body = pkt.payload[MSG.size:]
        if op == abi.PYKVM_DM_OP_STATUS:
            if not 1 <= node <= len(self.dm.nodes) or len(body) < node * STATUS.size:
                raise ServiceError(f"status report of {node} nodes carries {len(body)} bytes")
            self._status([STATUS.unpack_from(body, i * STATUS.size) for i in range(node)], req, t0)
        elif op == abi.PYKVM_DM_OP_BALLOON_RESP:
            if nr_ranges > MAX_RANGES or len(body) < nr_ranges * RANGE.size:
                raise ServiceError(f"balloon response of {nr_ranges} ranges carries {len(body)} bytes")
            ranges = [RANGE.unpack_from(body, i * RANGE.size) for i in range(nr_ranges)]
            self._balloon_response(node, req, flags, ranges)
        elif op == abi.PYKVM_DM_OP_HOTADD_ACK:
            self._hotadd_ack(node, req, pages)
        else:
            raise ServiceError(f"dynamic memory: unknown operation {op}")

    def _reject(self, node, why: str) -> None:
        self.counts["rejected"] += 1
        self.svc.event("reject", node, reason=why)

    def _status(self, entries, seq: int, t0: float) -> None:
        self.counts["reports"] += 1
        nodes = self.dm.nodes
        seen = set()
        checked = []
        for idx, pressure, total, committed, free in entries:
            if idx >= len(nodes) or idx in seen:
                return self._reject(None, f"status report names node {idx} (twice or not a node)")
            seen.add(idx)
            n = nodes[idx]
            if total == 0 or total > n.online:
                return self._reject(idx, f"node {idx}: reported total {total} pages but it has {n.online} online")
            if committed + free > total:
                return self._reject(idx, f"node {idx}: committed {committed} + free {free} > total {total}")
            floor = committed * balancer.PER_MILLE // total
            if pressure < floor:
                self.counts["clamped"] += 1
                self.svc.event("clamp", idx, reason=f"pressure {pressure} below committed/total {floor}")
                pressure = floor
            if pressure > PRESSURE_MAX:
                self.counts["clamped"] += 1
                self.svc.event("clamp", idx, reason=f"pressure {pressure} above {PRESSURE_MAX}")
                pressure = PRESSURE_MAX
            checked.append((n, (total, committed, free, pressure)))
        now = time.monotonic()
        for n, rep in checked:
            n.report = rep
            self.svc.event("report", n.index, seq=seq, total=rep[0], committed=rep[1], free=rep[2], pressure=rep[3])
        for n, _rep in checked:
            self._expire(n, now)
            if now - self.last_decided[n.index] < Tuning.min_interval:
                self.counts["coalesced"] += 1
                continue
            self.last_decided[n.index] = now
            self._decide(n, t0)

    def _expire(self, n, now: float) -> None:
        r = self.pending.get(n.index)
        if r is not None and now - r.sent > Tuning.request_timeout:
            del self.pending[n.index]
            self.counts["timeouts"] += 1
            self.svc.event("timeout", n.index, reason=f"{r.kind} request {r.req} unanswered")

    def _decide(self, n, t0: float) -> None:
        if n.index in self.pending or n.report is None:
            return
        total, committed, _free, pressure = n.report
        spec = n.spec
        view = balancer.NodeView(min=spec.min // PAGE_SIZE, max=spec.max // PAGE_SIZE, online=n.online,
                                 ballooned=n.ballooned, hot_room=n.hot_room, committed=committed, total=total,
                                 pressure=pressure, buffer=spec.buffer)
        headroom = self.dm.cfg.vm_max // PAGE_SIZE - self.dm.online_pages
        d = balancer.decide(view, headroom, Tuning.hotadd_block, Tuning.hysteresis)
        if d.action == "none":
            return
        now = time.monotonic()
        if d.action == "balloon" and now - self.last_grown[n.index] < Tuning.cooldown:
            return                  # memory just given takes a moment to show up as committed
        if d.action != "balloon":
            self.last_grown[n.index] = now
        req = self.next_req
        self.next_req = (req + 1) & 0xFFFFFFFF or 1
        if d.action == "balloon":
            self.pending[n.index] = _Request("balloon", req, d.pages)
            self.counts["balloon_requests"] += 1
            self.channel.send(INBAND, MSG.pack(abi.PYKVM_DM_OP_BALLOON, n.index, req, 0, d.pages, 0, 0), req)
        elif d.action == "unballoon":
            ranges = self.dm.take_back(n, d.pages, MAX_RANGES)
            got = sum(c for _p, c in ranges)
            self.counts["unballooned_pages"] += got
            self.channel.send(INBAND, MSG.pack(abi.PYKVM_DM_OP_UNBALLOON, n.index, req, abi.PYKVM_DM_FLAG_LAST,
                                               got, len(ranges), 0) + b"".join(RANGE.pack(*r) for r in ranges), req)
        else:
            try:
                gpa, size = self.dm.hot_add(n, d.pages)
            except (GuestMemoryError, OSError) as e:
                n.last_decision = f"hot-add refused: {e}"
                self.svc.event("hotadd-failed", n.index, reason=str(e))
                return
            self.pending[n.index] = _Request("hotadd", req, size // PAGE_SIZE)
            self.counts["hotadds"] += 1
            self.counts["hotadded_pages"] += size // PAGE_SIZE
            self.channel.send(INBAND, MSG.pack(abi.PYKVM_DM_OP_HOTADD, n.index, req, 0, size // PAGE_SIZE, 1, 0)
                              + RANGE.pack(gpa // PAGE_SIZE, size // PAGE_SIZE), req)
        us = int((time.perf_counter() - t0) * 1e6)
        self.reaction_us.append(us)
        n.last_decision = f"{d.action} {d.pages * PAGE_SIZE >> 10} KiB ({d.reason})"
        self.svc.event(d.action, n.index, pages=d.pages, target=d.target, reason=d.reason, reaction_us=us)

    def _balloon_response(self, idx: int, req: int, flags: int, ranges) -> None:
        nodes = self.dm.nodes
        r = self.pending.get(idx) if idx < len(nodes) else None
        if r is None or r.kind != "balloon" or r.req != req:
            return self._reject(idx if idx < len(nodes) else None,
                                f"balloon response for node {idx} request {req}: nothing of that was asked")
        n = nodes[idx]
        try:
            pages = self.dm.check_ranges(n, ranges)
        except RangeError as e:
            return self._reject(idx, f"balloon response: {e}")
        if r.returned + pages > r.pages:
            return self._reject(idx, f"balloon response returns {r.returned + pages} pages; {r.pages} were asked")
        if n.online - pages < n.spec.min // PAGE_SIZE:
            return self._reject(idx, "balloon response would take the node below its minimum")
        before = n.host_bytes()
        freed = self.dm.release(n, ranges)
        r.returned += pages
        self.counts["ballooned_pages"] += pages
        self.svc.event("released", idx, pages=pages, host_bytes_before=before, host_bytes_freed=freed)
        if flags & abi.PYKVM_DM_FLAG_LAST:
            del self.pending[idx]

    def _hotadd_ack(self, idx: int, req: int, status: int) -> None:
        r = self.pending.get(idx)
        if r is None or r.kind != "hotadd" or r.req != req:
            return self._reject(idx if idx < len(self.dm.nodes) else None,
                                f"hot-add acknowledgement for node {idx} request {req}: none outstanding")
        del self.pending[idx]
        self.svc.event("hotadd-ack", idx, status=status)

    def stats(self) -> dict:
        reaction = sorted(self.reaction_us)
        return {**self.counts, "pending": {str(k): v.kind for k, v in self.pending.items()},
                "reaction_us_median": reaction[len(reaction) // 2] if reaction else None}


class DynMemService(Service):
    """The dynamic memory service of a vNUMA machine; `event` feeds the memory log."""

    name = "dynmem"
    interface = (abi.PYKVM_BUS_IF_DYNMEM_LO, abi.PYKVM_BUS_IF_DYNMEM_HI)
    versions = (abi.PYKVM_DYNMEM_V1_0,)

    def __init__(self, dm: DynamicMemory, on_event=None):
        self.dm = dm
        self.on_event = on_event            # fn(kind, node, fields) for the memory log and reasons
        self.session = None
        self.rejects: deque = deque(maxlen=32)

    def open(self, channel, version: int) -> Session:
        self.session = DynMemSession(channel, version, self)
        return self.session

    def event(self, kind: str, node, **fields) -> None:
        """Record one balancer event (decisions, refusals with their reasons)."""
        if kind in ("reject", "clamp", "timeout", "hotadd-failed"):
            self.rejects.append(f"{kind} node {node}: {fields.get('reason')}")
        if self.on_event is not None:
            self.on_event(kind, node, fields)

    def stats(self) -> dict:
        return {"nodes": [n.snapshot() for n in self.dm.nodes], "refusals": list(self.rejects),
                "session": self.session.stats() if self.session is not None else None}
