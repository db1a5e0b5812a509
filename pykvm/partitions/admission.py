"""A client partition's policy, enforced by the broker on every frame it relays from that client.

The client's own VMM asks its policy agent first (bus/services/proxy.py), so an honest
client never meets a refusal here; a compromised client VMM can send anything on its
link, so the broker asks again, keyed by the link the broker made for that partition,
and answers as the client's guest would hear it from an honest VMM: a write from a
read-only client PYKVM_BUS_E_READ_ONLY (flag READ_ONLY), a request over the size or the
outstanding limit PYKVM_BUS_E_LIMIT (FLOOD_STREAK of those in a row and the link is
dropped, as the proxy closes a flooding channel), a version the policy does not allow
PYKVM_BUS_E_VERSION, a remap the policy forbids declined (the client sends it by copy).

Units: the broker sees relayed pieces, not guest requests: an honest proxy splits one
guest request of up to max_request_sectors into at most `per_request` pieces of
PYKVM_PROVIDER_MAX_SECTORS, so the outstanding bound and the rate are counted in
pieces scaled by that factor (exact for the untrusted defaults, where it is 1). The rate
is shaped, not policed: a piece over the rate waits in its Grant's queue (which counts
as outstanding, so the queue is bounded) until the token bucket refills. Requests held
in transit and delivered together therefore cost an honest client a short wait, never a
refusal.

A Grant is the broker's state for one (client, service) pair: today one per service the
client's topology entry uses, made when the client says hello; the decision point for a
channel opened later (a direct guest-to-guest channel) is the same object.
"""

from __future__ import annotations

import time
from collections import deque

from .. import abi
from ..bus import wire
from ..bus.policy import Ledger, TopologyPolicy
from ..bus.services.proxy import FLOOD_STREAK
from ..record import replace

CHUNK = abi.PYKVM_PROVIDER_MAX_SECTORS
_OPS = {abi.PYKVM_BLK_OP_READ: "read", abi.PYKVM_BLK_OP_WRITE: "write", abi.PYKVM_BLK_OP_FLUSH: "flush",
        abi.PYKVM_BLK_OP_INFO: "info"}
_DATA_OPS = (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE)


def agent_for(topo) -> TopologyPolicy:
    """The broker's policy agent: each partition's rules in relayed pieces, its rate left to the Grants."""
    rules = {}
    for p in topo.partitions:
        k = per_request(p.rules)
        rules[p.name] = replace(p.rules, requests_per_second=0, max_outstanding=p.rules.max_outstanding * k)
    return TopologyPolicy(rules, {p.name: tuple(p.uses) for p in topo.partitions})


def per_request(rules) -> int:
    """Relayed pieces an honest proxy makes of one guest request of the largest size the rules allow."""
    return (rules.max_request_sectors + CHUNK - 1) // CHUNK


class Refused(Exception):
    """A frame the policy refuses: the reply the client gets (status, flags), or declined for a remap."""

    def __init__(self, status: int, flags: int = 0, declined: bool = False):
        super().__init__(status)
        self.status, self.flags, self.declined = status, flags, declined


class Grant:
    """One client's use of one service: its policy decisions, its queue and its share of the provider."""

    def __init__(self, client, partition, service: str, ledger: Ledger, clock=time.monotonic):
        self.client = client                      # the client's Conn
        self.partition = partition
        self.service = service
        self.ledger = ledger
        self.clock = clock
        k = per_request(partition.rules)
        self.rate = partition.rules.requests_per_second * k     # pieces per second; 0 = unlimited
        self.burst = float(partition.rules.burst * k)
        self.tokens = self.burst
        self.stamp = clock()
        self.queue: deque = deque()               # (client tag, frame body) admitted, not yet sent
        self.outstanding = 0                      # admitted and not answered (queued or at the provider)
        self.limited = 0                          # E_LIMIT refusals in a row
        self.counts = {"admitted": 0, "refused": 0}

    def admit(self, blk: tuple, data_len: int, remapped: bool) -> None:
        """Count the frame in (outstanding + 1) or raise Refused / WireError (the link is dropped)."""
        op, version, sector, count, _r2 = blk
        name = _OPS.get(op)
        if name is None:
            raise wire.WireError(f"{self.partition.name}: block operation {op} on {self.service}")
        data_op = op in _DATA_OPS
        if remapped and not data_op:
            raise wire.WireError(f"{self.partition.name}: a remapped {name} on {self.service}")
        if data_op and (not 1 <= count <= abi.PYKVM_BLK_MAX_SECTORS or sector + count > 1 << 64):
            self.counts["refused"] += 1
            raise Refused(abi.PYKVM_BUS_E_INVALID)
        want = count * abi.PYKVM_BLK_SECTOR if op == abi.PYKVM_BLK_OP_WRITE and not remapped else 0
        if not remapped and data_len != want:
            raise wire.WireError(f"{self.partition.name}: a {name} of {count} sectors with {data_len} data bytes")
        ledger = self.ledger
        if ledger.check("may_open", self.service, version) is not None:
            self.counts["refused"] += 1
            raise Refused(abi.PYKVM_BUS_E_VERSION)
        if op == abi.PYKVM_BLK_OP_WRITE and ledger.check("may_write", self.service) is not None:
            self.counts["refused"] += 1
            raise Refused(abi.PYKVM_BUS_E_READ_ONLY, abi.PYKVM_BLK_FLAG_READ_ONLY)
        if ledger.check("may_request", self.service, name, count if data_op else 0, self.outstanding) is not None:
            self.counts["refused"] += 1
            self.limited += 1
            if self.limited >= FLOOD_STREAK:
                raise wire.WireError(f"flooding: {self.limited} requests in a row over its policy's limits "
                                     f"on {self.service}")
            raise Refused(abi.PYKVM_BUS_E_LIMIT)
        self.limited = 0
        if data_op and not remapped and count > CHUNK:       # a proxy relays at most CHUNK sectors a piece
            self.counts["refused"] += 1
            raise Refused(abi.PYKVM_BUS_E_INVALID)
        if remapped and ledger.check("may_remap", self.service, count * abi.PYKVM_BLK_SECTOR) is not None:
            raise Refused(abi.PYKVM_BUS_E_IO, declined=True)
        self.outstanding += 1
        self.counts["admitted"] += 1

    def answered(self) -> None:
        """One admitted frame was answered (or failed, or dropped)."""
        self.outstanding -= 1

    def may_send(self, now: float) -> bool:
        """Whether the rate lets one more piece go to the provider now (then it is counted)."""
        if not self.rate:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def next_token(self, now: float) -> float:
        """When the bucket holds a whole token again (now when it does)."""
        if not self.rate or self.tokens >= 1:
            return now
        return now + (1 - self.tokens) / self.rate

    def snapshot(self) -> dict:
        """Counts and queue state for the broker's status."""
        return dict(self.counts, service=self.service, outstanding=self.outstanding, queued=len(self.queue))
