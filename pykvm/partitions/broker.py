"""The broker of `pykvm up`: starts one process per partition and relays between them.

Process model: every partition is its own `pykvm run` process (own VM, own sandbox, own
control socket, own crash directory), so a partition that crashes writes its own core and
stops alone. The broker process runs no guest code: it makes a socketpair for each
partition, starts it with one end (PYKVM_PARTITION=NAME, PYKVM_BROKER_FD=N), welcomes it
with what the topology gives it, and relays block requests from clients to the partition
providing the service, by copy. There is no named socket: who speaks on a link is fixed
by the broker when it starts the process, so no other process can take a partition's name.

Policy: every frame a client relays is put to that client's rules here (admission.py),
whatever its own VMM decided: a compromised client VMM gets the refusals its guest would
get, and no more than its share. Each service gets at most WINDOW requests at a time,
taken round-robin from its clients' queues (each bounded by the client's policy), so a
flooding client neither starves the others nor makes a working provider look silent.
The decisions are counted per partition and written to DIR/broker-policy.json.

Recovery: requests sent before a provider first registers are held (bounded) and sent
once it does. When a provider that served goes away (crashed, stopped, its link broke,
timed out), every client using the service is told "down" first (its root rescinds the
proxied offer), then every request of that service not yet answered is answered
PYKVM_BUS_E_IO (the client's root drops those answers: its channel is gone, and the
client's driver re-issues what it did not see completed). A crashed partition is
started again up to its `restarts`, and at most `intensity` times in `period` seconds
(`pykvm up --restart-intensity N/SECONDS`; the command line gets generation=K); when it
registers, the clients are told "up" with the versions it registered and their roots
offer the service anew. Once every client partition has ended, the broker closes the
providers' links, their provider channels are rescinded and they power off.

Versions: a provider registers the versions its guest serves; a partition that uses
services is started once their providers have registered (or ended for good, or after
START_WAIT), and its welcome carries those versions, so its proxy offers exactly what the
service partition speaks. A provider registering again (a restart) sends the new list
with its "up".

A provider that answers nothing for its `request_timeout` (topology, default 30 s) while
requests are outstanding is lost: the oldest unanswered request is answered
PYKVM_BUS_E_IO (it may be the one that hangs the provider, so it is not sent again), the
link is dropped with the reason, the partition is stopped (SIGKILL) and treated as a
crashed one (rescind, fail, restart within its `restarts`). So is a provider that does
not register within request_timeout of its first start while requests are held for it.

A REMAP request (transfer by memory map change, pykvm/bus/remap.py) carries the client's
memfds; the broker passes them to a provider that registered with remap and keeps no
copy. It is never held: while the provider is down or cannot remap, the client gets it
back declined and sends it by copy; when the provider goes away with it unanswered, it
fails like any other request. When a client goes away, its providers are told to unmap
its pages at once.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from .. import abi
from ..bus import wire
from ..bus.policy import Ledger
from ..record import asdict
from .admission import Grant, Refused, agent_for
from .conn import Conn

POLL = 0.2
WINDOW = 8                # requests given to one provider at a time (its VMM waits with at most 8 remapped ones)
STOP_GRACE = 10.0
START_WAIT = 120.0        # longest a partition waits to start for the services it uses to register
STATUS_EVERY = 1.0        # seconds between rewrites of broker-policy.json while decisions change
ENV_NAME, ENV_FD = "PYKVM_PARTITION", "PYKVM_BROKER_FD"
_E_IO = (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)


class Broker:
    """Owns the partitions of a topology and the relay between them."""

    def __init__(self, topo, rundir: Path, log=None, intensity: tuple[int, float] = (5, 60.0)):
        self.topo = topo
        self.intensity, self.period = intensity
        self.restarted: dict[str, deque] = {p.name: deque() for p in topo.partitions}   # restart times
        self.rundir = Path(rundir)
        self.log = log or (lambda msg: print(f"pykvm: up: {msg}", file=sys.stderr))
        self.sel = selectors.DefaultSelector()
        self.procs: dict[str, subprocess.Popen] = {}
        self.generation: dict[str, int] = {p.name: 0 for p in topo.partitions}
        self.status: dict[str, int] = {}
        self.conns: dict[str, Conn] = {}                   # partition name -> its live, welcomed connection
        self.providers: dict[str, Conn] = {}               # service -> the registered provider's connection
        self.grants: dict[str, deque] = {p.provides: deque() for p in topo.partitions if p.provides}
        #   service -> the Grants of its connected clients, in round-robin order
        self.inflight: dict[int, tuple] = {}               # broker tag -> (service, client conn, client tag, body, grant)
        self.remapped: set[int] = set()                    # broker tags of inflight REMAP requests
        self.remap_ok: dict[str, bool] = {}                # service -> its provider takes remapped requests
        self.tags = itertools.count(1)
        self.counts = {"relayed": 0, "replies": 0, "failed": 0, "rescinds": 0, "restarts": 0, "refused": 0,
                       "remapped": 0, "remap_declined": 0, "timeouts": 0, "policy_refused": 0}
        self.stopping = False
        self.versions: dict[str, list[int]] = {}           # service -> versions its provider last registered
        #   (a service in it has been served at least once)
        self.gone: set[str] = set()                        # services whose provider ended for good
        self.waiting = [p for p in topo.partitions if p.uses]   # started once their services are up
        self.down_since: dict[str, float] = {}             # service -> when its provider stopped serving
        self.start_deadline = 0.0
        self.wake = None                                   # when a rate-shaped request may go next
        agent = agent_for(topo)
        self.ledgers = {p.name: Ledger(agent, p.name, log=lambda m: self.log(f"policy: {m}"))
                        for p in topo.partitions}
        self.status_path = self.rundir / "broker-policy.json"
        self._status_written = (-1, 0.0)
        self._handlers = {wire.HELLO: self._on_hello, wire.REGISTER: self._on_register, wire.STATUS: self._on_status,
                          wire.REQUEST: self._on_request, wire.REPLY: self._on_reply, wire.REMAP: self._on_remap}

    # ---------------------------------------------------------------- partitions
    def files(self, p, gen: int = 0) -> dict:
        """Where a partition's serial output, control socket, crash cores and VMM log go."""
        sfx = f".gen{gen}" if gen else ""
        return {"serial": self.rundir / f"{p.name}{sfx}.serial", "control": self.rundir / f"{p.name}.sock",
                "crashes": self.rundir / f"{p.name}-crashes", "log": self.rundir / f"{p.name}{sfx}.log"}

    def command(self, p, gen: int) -> list[str]:
        """The argv that starts generation gen of partition p."""
        f = self.files(p, gen)
        cmdline = (p.cmdline + f" generation={gen}").strip() if gen else p.cmdline
        argv = [sys.executable, "-m", "pykvm", "run", p.kernel, "--mem", str(p.memory >> 10) + "K",
                "--cpus", str(p.cpus), "--cmdline", cmdline, "--serial", str(f["serial"]),
                "--control", str(f["control"]), "--crash-dir", str(f["crashes"]), "--trust", p.trust]
        if p.disk:
            argv += ["--disk", p.disk]
        return argv

    def spawn(self, p) -> None:
        """Start (or restart) partition p as a `pykvm run` process holding its end of a new socketpair."""
        gen = self.generation[p.name]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ, **{ENV_NAME: p.name, ENV_FD: str(theirs.fileno())})
        try:
            with open(self.files(p, gen)["log"], "wb") as log:
                os.fchmod(log.fileno(), 0o600)
                self.procs[p.name] = subprocess.Popen(self.command(p, gen), env=env, stdin=subprocess.DEVNULL,
                                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                      pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()                  # the child's now: its end closes when the child ends
        c = Conn(ours, p.name)
        self.sel.register(ours, selectors.EVENT_READ, c)
        self.status.pop(p.name, None)
        if p.provides:
            self.down_since[p.provides] = time.monotonic()     # a (re)start gets its full time to register

    def start(self) -> None:
        """Start every partition (providers first)."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        self.start_deadline = time.monotonic() + START_WAIT
        for p in self.topo.partitions:
            if not p.uses:
                self.spawn(p)
        self._spawn_ready()

    def _spawn_ready(self) -> None:
        """Start the waiting partitions whose services have all registered or ended (all after START_WAIT)."""
        late = time.monotonic() > self.start_deadline
        for p in list(self.waiting):
            if late or all(u in self.versions or u in self.gone for u in p.uses):
                if late:
                    missing = [u for u in p.uses if u not in self.versions and u not in self.gone]
                    if missing:
                        self.log(f"{p.name}: starting without {', '.join(missing)}, not registered after "
                                 f"{START_WAIT:.0f} s")
                self.waiting.remove(p)
                self.spawn(p)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, int]:
        """Relay until every partition has ended; their exit statuses."""
        while self.procs or self.waiting:
            timeout = POLL if self.wake is None else max(0.0, min(POLL, self.wake - time.monotonic()))
            for key, ev in self.sel.select(timeout):
                if ev & selectors.EVENT_WRITE and not key.data.closed:
                    self._writable(key.data)
                if ev & selectors.EVENT_READ and not key.data.closed:
                    self._readable(key.data)
            self._pump_all()
            self._check_timeouts()
            self._reap()
            if self.waiting and not self.stopping:
                self._spawn_ready()
            if self.stopping and time.monotonic() > self.deadline:
                self.kill_stragglers()
            self._write_status()
        return self.status

    def _readable(self, c: Conn) -> None:
        frames = []
        try:
            data, fds = wire.recv(c.sock)
            if not data:
                wire.close_fds(fds)
                return self._drop(c, None)
            frames = c.parser.feed(data, fds)
            while frames and not c.closed:
                f = frames.pop(0)
                self._frame(c, f[0], f[1], f.fds)
        except OSError:
            self._drop(c, None)
        except wire.WireError as e:
            self._drop(c, str(e))
        for f in frames:
            wire.close_fds(f.fds)

    def _writable(self, c: Conn) -> None:
        try:
            c.flush()
        except OSError:
            return self._drop(c, None)
        if not c.pending:
            self.sel.modify(c.sock, selectors.EVENT_READ, c)

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
            "versions": {u: self.versions[u] for u in p.uses if u in self.versions}}))
        for service in p.uses:             # a client (re)starting while its service is down
            if service in self.versions and service not in self.providers:
                self._send(c, wire.json_frame(wire.STATUS, {"service": service, "state": "down"}))

    def _on_register(self, c: Conn, body: bytes, _fds) -> None:
        p = self.topo.by_name(c.name)
        obj = wire.parse_json(body)
        if p.provides is None or obj.get("interface") != "block":
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
        while busy < WINDOW:
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
            proc = self.procs.get(p.name)
            held = self._queued(service)
            if held and proc is not None and now - since > p.request_timeout:
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

    def _kill(self, name: str) -> None:
        """Stop partition `name` at once (SIGKILL to its process group); _reap then handles it as a crash."""
        proc = self.procs.get(name)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

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

    def _reap(self) -> None:
        for name, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del self.procs[name]
            p = self.topo.by_name(name)
            c = self.conns.get(name)
            if c is not None:
                self._drop(c, None)
            self.status[name] = rc
            if rc != 0 and not self.stopping and self._may_restart(p):
                self.generation[name] += 1
                self.counts["restarts"] += 1
                self.log(f"{name} ended with status {rc}; restart {self.generation[name]} of {p.restarts}")
                self.spawn(p)
            else:
                self.log(f"{name} ended with status {rc}")
                if p.provides and not self.stopping:
                    self.gone.add(p.provides)
                    self._fail_held(p.provides)
        clients = [p.name for p in self.topo.partitions if not p.provides]
        if not self.stopping and clients and not self.waiting and not any(n in self.procs for n in clients):
            self._stop_providers()

    def _may_restart(self, p) -> bool:
        """Whether crashed partition p is within its `restarts` and the restart intensity (then counted)."""
        if self.generation[p.name] >= p.restarts:
            return False
        now, times = time.monotonic(), self.restarted[p.name]
        while times and now - times[0] > self.period:
            times.popleft()
        if len(times) >= self.intensity:
            self.log(f"{p.name}: {len(times)} restarts within {self.period:g} s; not restarting it again")
            return False
        times.append(now)
        return True

    def _fail_held(self, service: str) -> None:
        """The provider of service is gone for good: answer everything held for it with PYKVM_BUS_E_IO."""
        self._provider_lost(service)
        for g in self.grants[service]:
            while g.queue:
                ctag, _body = g.queue.popleft()
                g.answered()
                self.counts["refused"] += 1
                self._reply(g.client, ctag, _E_IO)

    def _stop_providers(self) -> None:
        """Every client has ended: close the providers' links (their guests see a rescind and power off)."""
        self.stopping = True
        self.deadline = time.monotonic() + STOP_GRACE
        for name in list(self.procs):
            c = self.conns.get(name)
            if c is not None:
                self._drop(c, None)

    def kill_stragglers(self) -> None:
        """After the grace period, stop partitions that did not end by themselves."""
        for name in list(self.procs):
            self._kill(name)

    # ---------------------------------------------------------------- status
    def policy_snapshot(self) -> dict:
        """The broker's policy decisions per partition (counts, recent refusals, its queues)."""
        out = {}
        for p in self.topo.partitions:
            c = self.conns.get(p.name)
            out[p.name] = dict(self.ledgers[p.name].snapshot(), trust=p.trust,
                               services=[g.snapshot() for g in c.grants] if c is not None else [])
        return out

    def _write_status(self, force: bool = False) -> None:
        """Rewrite DIR/broker-policy.json (0600) when decisions changed, at most every STATUS_EVERY seconds."""
        n = sum(sum(ld.allowed.values()) + sum(ld.refused.values()) for ld in self.ledgers.values())
        now = time.monotonic()
        last, when = self._status_written
        if n == last or (not force and now - when < STATUS_EVERY):
            return
        self._status_written = (n, now)
        tmp = self.status_path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with open(fd, "w") as f:
                json.dump({"policy": self.policy_snapshot(), "counts": self.counts}, f, indent=1)
            os.replace(tmp, self.status_path)
        except OSError as e:
            self.log(f"{self.status_path}: {e.strerror}")

    def close(self) -> None:
        """Stop every partition still running; write the final policy status."""
        self.stopping = True
        self.kill_stragglers()
        for proc in self.procs.values():
            proc.wait()
        for key in list(self.sel.get_map().values()):
            self._drop(key.data, None)
        self._write_status(force=True)
