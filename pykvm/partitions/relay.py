"""The relay inside the broker of `pykvm up`: frames between partitions, each client's policy, recovery.

A Relay owns the partitions' links (Conn, one socketpair end per partition process, made
by the broker), the services' providers, and what is in flight between them; the
Broker (broker.py) adds the processes and the loop. One handler per frame kind.

Policy: every frame a client relays is put to that client's rules here (admission.py),
whatever its own VMM decided: a compromised client VMM gets the refusals its guest would
get, and no more than its share. Each service gets at most WINDOW requests at a time,
taken round-robin from its clients' queues (each bounded by the client's policy), so a
flooding client neither starves the others nor makes a working provider look silent.

Recovery: requests sent before a provider first registers are held (in their clients'
queues) and sent once it does. When a provider that served goes away (crashed, stopped,
its link broke, timed out), every client using the service is told "down" first (its
root rescinds the proxied offer), then every request of that service not yet answered
is answered PYKVM_BUS_E_IO (the client's root drops those answers: its channel is gone,
and the client's driver re-issues what it did not see completed). When the restarted
provider registers, the clients are told "up" with the versions it registered and their
roots offer the service anew.

A provider that answers nothing for its `request_timeout` (topology, default 30 s) while
requests are outstanding is lost: the oldest unanswered request is answered
PYKVM_BUS_E_IO (it may be the one that hangs the provider, so it is not sent again), the
link is dropped with the reason, the partition is stopped and treated as a crashed one.
So is a provider that does not register within request_timeout of its start while
requests are held for it. The clock runs from the provider's last progress (a reply, or
work given while idle), so a long queue behind a working provider does not time it out.

A REMAP request (transfer by memory map change, pykvm/bus/remap.py) carries the client's
memfds; the relay passes them to a provider that registered with remap and keeps no
copy. It is never held: while the provider is down, cannot remap, or has its window
full, the client gets it back declined and sends it by copy; when the provider goes away
with it unanswered, it fails like any other request. When a client goes away, its
providers are told to unmap its pages at once.
"""

from __future__ import annotations

import itertools
import selectors
import sys
import time
from collections import deque

from .. import abi
from ..bus import wire
from ..bus.policy import Ledger
from ..record import asdict
from .admission import Grant, Refused, agent_for
from .conn import Conn

WINDOW = 8                # requests given to one provider at a time (its VMM waits with at most 8 remapped ones)
_E_IO = (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)


class Relay:
    """The links of a topology's partitions and the relay between them (the Broker adds the processes)."""

    def __init__(self, topo, log=None):
        self.topo = topo
        self.log = log or (lambda msg: print(f"pykvm: up: {msg}", file=sys.stderr))
        self.sel = selectors.DefaultSelector()
        self.conns: dict[str, Conn] = {}                   # partition name -> its live, welcomed connection
        self.providers: dict[str, Conn] = {}               # service -> the registered provider's connection
        self.grants: dict[str, deque] = {p.provides: deque() for p in topo.partitions if p.provides}
        #   service -> the Grants of its connected clients, in round-robin order
        self.inflight: dict[int, tuple] = {}               # broker tag -> (service, client conn, client tag, body, grant)
        self.remapped: set[int] = set()                    # broker tags of inflight REMAP requests
        self.remap_ok: dict[str, bool] = {}                # service -> its provider takes remapped requests
        self.interfaces: dict[str, str] = {}               # service -> the interface its provider registered
        self.direct_ok: dict[str, bool] = {}               # service -> its provider's guest serves direct channels
        self.direct: dict[int, tuple] = {}                 # broker tag -> (service, client conn, client tag, state)
        self.direct_closing: dict[int, tuple] = {}         # broker tag -> (service, client conn, client tag):
        #   closed, its provider not yet said the pages are unmapped (the client's guest may not reuse them)
        self.tags = itertools.count(1)
        self.counts = {"relayed": 0, "replies": 0, "failed": 0, "rescinds": 0, "restarts": 0, "refused": 0,
                       "remapped": 0, "remap_declined": 0, "timeouts": 0, "policy_refused": 0,
                       "direct_opened": 0, "direct_refused": 0, "direct_closed": 0, "fds_relayed": 0,
                       "wakeups": 0}     # selector returns with work (the broker's own wakeups)
        self.stopping = False
        self.generation: dict[str, int] = {p.name: 0 for p in topo.partitions}
        self.versions: dict[str, list[int]] = {}           # service -> versions its provider last registered
        #   (a service in it has been served at least once)
        self.gone: set[str] = set()                        # services whose provider ended for good
        self.down_since: dict[str, float] = {}             # service -> when its provider stopped serving
        self.wake = None                                   # when a rate-shaped request may go next
        agent = agent_for(topo)
        self.ledgers = {p.name: Ledger(agent, p.name, log=lambda m: self.log(f"policy: {m}"))
                        for p in topo.partitions}
        self._handlers = {wire.HELLO: self._on_hello, wire.REGISTER: self._on_register, wire.STATUS: self._on_status,
                          wire.REQUEST: self._on_request, wire.REPLY: self._on_reply, wire.REMAP: self._on_remap,
                          wire.DIRECT: self._on_direct}

    # ---------------------------------------------------------------- what the process owner provides
    def _kill(self, name: str) -> None:
        """Stop partition `name` at once; it is then handled as a crashed one."""

    def _running(self, name: str) -> bool:
        """Whether partition `name` has a live process."""
        return True

    def _spawn_ready(self) -> None:
        """A service registered: start the partitions that waited for it."""

    # ---------------------------------------------------------------- sending
    def _send(self, c: Conn, data: bytes, fds=()) -> None:
        try:
            c.send(data, fds)
        except OSError:
            return           # its EOF arrives through the selector
        if c.stalled:
            self._drop(c, "it does not read its link (over 16 MiB waiting)")
        elif c.pending and not c.closed:
            try:
                self.sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
            except (KeyError, ValueError):
                pass         # not in the selector (tests drive a Conn directly)

    def _reply(self, c: Conn, tag: int, resp: tuple, data: bytes = b"", declined: bool = False) -> None:
        """Answer a client's request `tag` (a declined REMAP: index DECLINED, the client copies instead)."""
        if self.conns.get(c.name) is c:
            self._send(c, wire.data_frame(wire.REPLY, tag, wire.DECLINED if declined else 0, resp, data))

    # ---------------------------------------------------------------- frames, one handler per kind
    def _frame(self, c: Conn, kind: int, body: bytes, fds=()) -> None:
        """Handle one frame from c; REMAP owns fds (closed here), no other kind carries any."""
        if c.name is None and kind != wire.HELLO:
            wire.close_fds(fds)
            raise wire.WireError(f"{wire.KINDS[kind]} before hello")
        handler = self._handlers.get(kind)
        if handler is None:
            wire.close_fds(fds)
            raise wire.WireError(f"unexpected {wire.KINDS[kind]} frame from {c.name}")
        handler(c, body, fds)

    def _on_hello(self, c: Conn, body: bytes, _fds) -> None:
        name = wire.parse_json(body).get("name")
        if c.name is not None:
            raise wire.WireError(f"{c.name} said hello twice")
        if name != c.identity:
            raise wire.WireError(f"hello as {name!r} on the link made for {c.identity}")
        p = self.topo.by_name(name)
        if name in self.conns:
            raise wire.WireError(f"hello from {name}, which is already connected")
        c.name = name
        self.conns[name] = c
        for service in p.uses:
            g = Grant(c, p, service, self.ledgers[name])
            c.grants.append(g)
            self.grants[service].append(g)
        self._send(c, wire.json_frame(wire.WELCOME, {
            "name": p.name, "trust": p.trust, "uses": list(p.uses), "provides": p.provides,
            "rules": asdict(p.rules), "generation": self.generation[p.name],
            "versions": {u: self.versions[u] for u in p.uses if u in self.versions},
            "interfaces": {u: self.interfaces[u] for u in p.uses if u in self.interfaces},
            "direct": {u: self.direct_decision(p, u) for u in p.uses}}))
        for service in p.uses:             # a client (re)starting while its service is down
            if service in self.versions and service not in self.providers:
                self._send(c, wire.json_frame(wire.STATUS, {"service": service, "state": "down"}))

    def _on_register(self, c: Conn, body: bytes, _fds) -> None:
        p = self.topo.by_name(c.name)
        obj = wire.parse_json(body)
        if p.provides is None or obj.get("interface") not in ("block", "echo") or (
                obj.get("interface") == "echo" and obj.get("direct") is not True):   # echo is never relayed
            raise wire.WireError(f"{p.name} registered {obj.get('interface')!r}, which its topology entry "
                                 "does not provide")
        versions = obj.get("versions")
        if (not isinstance(versions, list) or not 1 <= len(versions) <= 8
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 32 for v in versions)):
            raise wire.WireError(f"{p.name} registered versions {versions!r}, expected 1..8 u32 versions")
        if self.providers.get(p.provides) is c:
            raise wire.WireError(f"{p.name} registered twice")
        self.providers[p.provides] = c
        self.remap_ok[p.provides] = obj.get("remap") is True
        self.interfaces[p.provides] = obj["interface"]
        self.direct_ok[p.provides] = obj.get("direct") is True
        self.down_since.pop(p.provides, None)
        self.versions[p.provides] = versions
        c.progress = time.monotonic()
        self.log(f"{p.name} serves {p.provides} at versions "
                 f"{', '.join(f'{v >> 16}.{v & 0xFFFF}' for v in versions)} (generation {self.generation[p.name]})")
        self._pump(p.provides)
        self._tell_clients(p.provides, "up", versions)   # running clients learn a restart's versions
        self._spawn_ready()

    def _on_status(self, c: Conn, body: bytes, _fds) -> None:
        p = self.topo.by_name(c.name)
        obj = wire.parse_json(body)
        if p.provides and self.providers.get(p.provides) is c and obj.get("provider") == "down":
            reason = obj.get("reason")
            self.log(f"{p.name}: its provider channel closed" + (f": {reason}" if isinstance(reason, str) else ""))
            self._provider_lost(p.provides)
        elif type(obj.get("cancel")) is int:        # a client stopped waiting for a remapped request
            for t, (svc, client, ctag, _b, _g) in self.inflight.items():
                if client is c and ctag == obj["cancel"] and t in self.remapped and svc in self.providers:
                    self._send(self.providers[svc], wire.json_frame(wire.STATUS, {"cancel": t}))
                    break

    def _grant(self, c: Conn, index: int) -> Grant:
        if index >= len(c.grants):
            raise wire.WireError(f"{c.name} sent a request for service {index}; it uses {len(c.grants)}")
        return c.grants[index]

    def _admit(self, c: Conn, g: Grant, tag: int, blk: tuple, data_len: int, remapped: bool) -> bool:
        """Put a client's frame to its policy; False when it was answered with the refusal."""
        try:
            g.admit(blk, data_len, remapped)
        except Refused as r:
            self.counts["policy_refused"] += 1
            if r.declined:
                self.counts["remap_declined"] += 1
            self._reply(c, tag, (r.status, r.flags, 0, 0, 0), declined=r.declined)
            return False
        if (g.service in self.versions or g.service in self.gone) and g.service not in self.providers:
            # down after serving: the client's offer is (being) rescinded; it re-issues after the re-offer
            g.answered()
            self.counts["refused"] += 1
            self._reply(c, tag, _E_IO, declined=remapped)
            return False
        return True

    def _on_request(self, c: Conn, body: bytes, _fds) -> None:
        tag, index, blk, data = wire.parse_data(body)
        g = self._grant(c, index)
        if self._admit(c, g, tag, blk, len(data), False):
            g.queue.append((tag, body))
            self._pump(g.service)

    def _on_remap(self, c: Conn, body: bytes, fds) -> None:
        """A REMAP goes to the provider now with its descriptors, or is declined (never held); fds closed here."""
        try:
            tag, index, blk, _desc = wire.parse_data(body)
            g = self._grant(c, index)
            if not self._admit(c, g, tag, blk, 0, True):
                return
            service = g.service
            prov = self.providers.get(service)
            now = time.monotonic()
            if (prov is None or not self.remap_ok.get(service) or not fds or g.queue
                    or self._busy(service) >= WINDOW or not g.may_send(now)):
                g.answered()
                self.counts["remap_declined"] += 1
                return self._reply(c, tag, _E_IO, declined=True)
            btag = next(self.tags)
            if not self._busy(service):
                prov.progress = now
            self.inflight[btag] = (service, c, tag, body, g)
            self.remapped.add(btag)
            self.counts["remapped"] += 1
            self._send(prov, wire.frame(wire.REMAP, wire.TAG.pack(btag, 0) + body[wire.TAG.size:], len(fds)), fds)
        finally:
            wire.close_fds(fds)

    # ---------------------------------------------------------------- direct channels (bus/direct.py)
    def direct_decision(self, p, service: str) -> str | None:
        """None when partition p's channels to service may go guest to guest, else why not."""
        if not p.rules.direct:
            return f"{p.name} is {p.trust} and its policy says direct = false"
        if service in self.interfaces and not self.direct_ok.get(service):
            return f"the guest serving {service} does not speak direct channels"
        return None

    def _direct_rules(self, p) -> tuple[int, int, int]:
        """(PYKVM_DIRECT_RULE_* flags, max message bytes, max transfer bytes) the service guest enforces for client p."""
        flags = 0 if p.rules.write else abi.PYKVM_DIRECT_RULE_READ_ONLY
        transfer = min(p.rules.max_request_sectors, abi.PYKVM_BLK_MAX_SECTORS) * abi.PYKVM_BLK_SECTOR
        return flags, min(64 << 10, p.rules.max_request_sectors * abi.PYKVM_BLK_SECTOR + 64), transfer

    def _on_direct(self, c: Conn, body: bytes, fds) -> None:
        """A direct channel's open or close from a client, or a provider's answer; descriptors pass through, closed here."""
        try:
            obj = wire.parse_json(body)
            op, tag = obj.get("op"), obj.get("tag")
            if type(tag) is not int or op not in ("open", "close", "ready", "closed"):
                raise wire.WireError(f"direct frame {obj!r} from {c.name}: expected op open/close/ready/closed "
                                     "and a tag")
            if op == "ready":
                return self._direct_ready(c, tag, obj, fds)
            if op == "closed":
                return self._direct_closed(c, tag)
            p = self.topo.by_name(c.name)
            if op == "close":
                found = False
                for bt, (svc, client, ctag, _st) in list(self.direct.items()):
                    if client is c and ctag == tag:
                        found = True
                        self._direct_close(bt, "the client closed it")
                if not found and not any(e[1] is c and e[2] == tag for e in self.direct_closing.values()):
                    # refused, never forwarded, or its provider died since: nothing of it is mapped anywhere
                    self._send(c, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": tag}))
                return
            index = obj.get("index")
            if type(index) is not int or index < 0:
                raise wire.WireError(f"direct open from {c.name} names no service index")
            g = self._grant(c, index)
            why = self.direct_decision(p, g.service)
            prov = self.providers.get(g.service)
            if why is None and prov is None:
                why = f"{g.service} is not being served"
            if why is None and not fds:
                why = "the open carried no descriptors"
            if why is not None:
                self.counts["direct_refused"] += 1
                self.log(f"policy: {c.name}: direct channel to {g.service} refused: {why}")
                self._send(c, wire.json_frame(wire.DIRECT, {"op": "ready", "tag": tag, "ok": False, "reason": why}))
                return
            btag = next(self.tags)
            self.direct[btag] = (g.service, c, tag, "opening")
            flags, max_message, max_transfer = self._direct_rules(p)
            fwd = {k: obj.get(k) for k in ("runs", "inbound_offset", "version")}
            if "data_runs" in obj:           # checked by the provider as the ring's runs are
                fwd["data_runs"] = obj.get("data_runs")
            fwd.update(op="open", tag=btag, client=p.name, rules=flags, max_message=max_message,
                       max_transfer=max_transfer)
            self.counts["fds_relayed"] += len(fds)
            self._send(prov, wire.json_frame(wire.DIRECT, fwd, len(fds)), fds)
        finally:
            wire.close_fds(fds)

    def _direct_ready(self, c: Conn, btag: int, obj: dict, fds) -> None:
        entry = self.direct.get(btag)
        if entry is None or self.providers.get(entry[0]) is not c or entry[3] != "opening":
            return          # the client went away or closed it meanwhile; the provider hears "close" from it
        service, client, ctag, _st = entry
        ok = obj.get("ok") is True and len(fds) == 1
        reason = obj.get("reason") if isinstance(obj.get("reason"), str) else "the service side refused it"
        if ok:
            self.direct[btag] = (service, client, ctag, "open")
            self.counts["direct_opened"] += 1
            self.counts["fds_relayed"] += 1
            self._send(client, wire.json_frame(wire.DIRECT, {"op": "ready", "tag": ctag, "ok": True}, 1), fds)
        else:
            del self.direct[btag]
            self.counts["direct_refused"] += 1
            self._send(client, wire.json_frame(wire.DIRECT, {"op": "ready", "tag": ctag, "ok": False,
                                                             "reason": reason[:200]}))

    def _direct_close(self, btag: int, why: str) -> None:
        """Forget direct channel btag and tell its provider to unmap it; its client hears when that is done."""
        service, client, ctag, _st = self.direct.pop(btag)
        self.counts["direct_closed"] += 1
        prov = self.providers.get(service)
        if prov is not None:
            self.direct_closing[btag] = (service, client, ctag)
            self._send(prov, wire.json_frame(wire.DIRECT, {"op": "close", "tag": btag, "reason": why}))
        elif not client.closed:
            self._send(client, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": ctag}))

    def _direct_closed(self, c: Conn, btag: int) -> None:
        """The provider removed direct channel btag's mappings: its client's guest may reuse the pages."""
        entry = self.direct_closing.get(btag)
        if entry is None or self.providers.get(entry[0]) is not c:
            return
        del self.direct_closing[btag]
        _service, client, ctag = entry
        if not client.closed:
            self._send(client, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": ctag}))

    def _on_reply(self, c: Conn, body: bytes, _fds) -> None:
        p = self.topo.by_name(c.name)
        tag, index, resp, data = wire.parse_data(body)
        entry = self.inflight.get(tag)
        if entry is None or self.providers.get(entry[0]) is not c:
            raise wire.WireError(f"{p.name} answered transaction {tag}, which it was not given")
        del self.inflight[tag]
        declined = tag in self.remapped and index == wire.DECLINED
        self.remapped.discard(tag)
        service, client, ctag, req, g = entry
        g.answered()
        c.progress = time.monotonic()
        self.counts["replies" if not declined else "remap_declined"] += 1
        if wire.BLK.unpack_from(req, wire.TAG.size)[0] == abi.PYKVM_BLK_OP_INFO and not g.partition.rules.write:
            resp = (resp[0], resp[1] | abi.PYKVM_BLK_FLAG_READ_ONLY) + tuple(resp[2:])   # it may not write
        self._reply(client, ctag, resp, data, declined)
        self._pump(service)

    # ---------------------------------------------------------------- giving work to providers
    def _busy(self, service: str) -> int:
        return sum(1 for e in self.inflight.values() if e[0] == service)

    def _pump(self, service: str) -> None:
        """Give the provider of service queued requests, round-robin over its clients, up to WINDOW at a time."""
        prov = self.providers.get(service)
        if prov is None:
            return
        rot = self.grants[service]
        busy = self._busy(service)
        now = time.monotonic()
        while busy < WINDOW and not prov.closed:
            for _ in range(len(rot)):
                g = rot[0]
                rot.rotate(-1)
                if g.queue and g.may_send(now):
                    break
            else:
                break                       # nothing queued, or only requests waiting for their rate
            ctag, body = g.queue.popleft()
            if not busy:
                prov.progress = now          # idle until now: its clock starts with this work
            btag = next(self.tags)
            self.inflight[btag] = (service, g.client, ctag, body, g)
            self.counts["relayed"] += 1
            busy += 1
            self._send(prov, wire.frame(wire.REQUEST, wire.TAG.pack(btag, 0) + body[wire.TAG.size:]))
        waits = [g.next_token(now) for g in rot if g.queue]
        if waits and busy < WINDOW:
            self.wake = min(waits) if self.wake is None else min(self.wake, min(waits))

    def _pump_all(self) -> None:
        """Let rate-shaped requests go once their time has come."""
        if self.wake is not None and time.monotonic() >= self.wake:
            self.wake = None
            for service in self.grants:
                self._pump(service)

    def _queued(self, service: str) -> int:
        return sum(len(g.queue) for g in self.grants[service])

    def _check_timeouts(self) -> None:
        """Lose a provider that answered nothing for its request_timeout while requests were outstanding,
        or that did not register within request_timeout of its start while requests were held for it
        (after a provider served, nothing is held: requests fail until the restart registers)."""
        now = time.monotonic()
        for service, since in list(self.down_since.items()):
            p = self.topo.provider_of(service)
            held = self._queued(service)
            if held and self._running(p.name) and now - since > p.request_timeout:
                del self.down_since[service]
                self.counts["timeouts"] += 1
                self.log(f"{p.name}: {service} down for {p.request_timeout:g} s with {held} "
                         "requests held: the partition is stopped")
                self._kill(p.name)
        for service, c in list(self.providers.items()):
            p = self.topo.by_name(c.name)
            if now - c.progress <= p.request_timeout:
                continue
            mine = sorted(t for t, e in self.inflight.items() if e[0] == service)
            if not mine:
                continue
            _s, client, ctag, _b, g = self.inflight.pop(mine[0])
            self.remapped.discard(mine[0])
            g.answered()
            self.counts["timeouts"] += 1
            self._reply(client, ctag, _E_IO)
            self._drop(c, f"request {mine[0]} for {service} from {client.name} unanswered after "
                          f"{p.request_timeout:g} s: the provider is lost and stopped")
            self._kill(p.name)

    def _tell_clients(self, service: str, state: str, versions=None) -> None:
        """Send STATUS {service, state[, versions]} to every connected partition that uses service."""
        msg = {"service": service, "state": state}
        if versions is not None:
            msg["versions"] = versions
        for p in self.topo.partitions:
            c = self.conns.get(p.name)
            if c is not None and service in p.uses:
                self._send(c, wire.json_frame(wire.STATUS, msg))

    def _provider_lost(self, service: str) -> None:
        """The provider of service stopped serving: clients rescind it first, then its open requests fail."""
        if self.providers.pop(service, None) is None:
            return
        self.down_since[service] = time.monotonic()
        if not self.stopping:                 # at the end the providers are closed on purpose
            self.counts["rescinds"] += 1
        for bt in [bt for bt, e in self.direct.items() if e[0] == service]:
            del self.direct[bt]               # its mappings died with it; the clients' rescinds close their ends
            self.counts["direct_closed"] += 1
        for bt in [bt for bt, e in self.direct_closing.items() if e[0] == service]:
            _s, client, ctag = self.direct_closing.pop(bt)     # known dead: nothing of it is mapped any more
            if not client.closed:
                self._send(client, wire.json_frame(wire.DIRECT, {"op": "closed", "tag": ctag}))
        self._tell_clients(service, "down")
        lost = sorted((t, e) for t, e in self.inflight.items() if e[0] == service)
        for t, (_s, c, ctag, _body, g) in lost:
            del self.inflight[t]
            self.remapped.discard(t)          # its pages went with the provider's VM
            g.answered()
            self.counts["failed"] += 1
            self._reply(c, ctag, _E_IO)
        for g in self.grants[service]:        # given no provider yet: they fail with the others
            while g.queue:
                ctag, _body = g.queue.popleft()
                g.answered()
                self.counts["failed"] += 1
                self._reply(g.client, ctag, _E_IO)
        if not self.stopping:
            self.log(f"{service}: its provider went away with {len(lost)} requests unanswered; offers rescinded")

    def _drop(self, c: Conn, reason: str | None) -> None:
        if c.closed:
            return
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.close()
        for t, (svc, client, _ct, _b, _g) in list(self.inflight.items()):
            if client is c and t in self.remapped and self.providers.get(svc) is not None:
                self._send(self.providers[svc], wire.json_frame(wire.STATUS, {"cancel": t}))
        for bt, entry in list(self.direct.items()):
            if entry[1] is c:                 # the provider unmaps the gone client's pages now
                self._direct_close(bt, "the client partition went away")
        for bt in [bt for bt, e in self.direct_closing.items() if e[1] is c]:
            del self.direct_closing[bt]
        for g in c.grants:                    # its queued requests go with it; answers to the rest are dropped
            self.grants[g.service].remove(g)
            g.queue.clear()
        if reason:
            self.log(f"{c.name or c.identity}: link dropped: {reason}")
        if c.name is not None and self.conns.get(c.name) is c:
            del self.conns[c.name]
            p = self.topo.by_name(c.name)
            if p.provides and self.providers.get(p.provides) is c:
                self._provider_lost(p.provides)

    def _fail_held(self, service: str) -> None:
        """The provider of service is gone for good: answer everything held for it with PYKVM_BUS_E_IO."""
        self._provider_lost(service)
        for g in self.grants[service]:
            while g.queue:
                ctag, _body = g.queue.popleft()
                g.answered()
                self.counts["refused"] += 1
                self._reply(g.client, ctag, _E_IO)

    def policy_snapshot(self) -> dict:
        """The broker's policy decisions per partition (counts, recent refusals, its queues)."""
        out = {}
        for p in self.topo.partitions:
            c = self.conns.get(p.name)
            out[p.name] = dict(self.ledgers[p.name].snapshot(), trust=p.trust,
                               services=[g.snapshot() for g in c.grants] if c is not None else [],
                               direct={u: {"allowed": self.direct_decision(p, u) is None,
                                           "why": self.direct_decision(p, u) or "trusted by its policy (direct = true)",
                                           "open": sum(1 for e in self.direct.values()
                                                       if e[0] == u and e[1] is c and e[3] == "open")}
                                       for u in p.uses})
        return out
