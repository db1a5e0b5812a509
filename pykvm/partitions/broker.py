"""The broker of `pykvm up`: starts one process per partition and relays between them.

Process model: every partition is its own `pykvm run` process (own VM, own sandbox, own
control socket, own crash directory), so a partition that crashes writes its own core and
stops alone. The broker process runs no guest code: it starts the partitions with
PYKVM_PARTITION=NAME@SOCKET, welcomes each on its unix socket with what the topology gives
it, and relays block requests from clients to the partition providing the service, by
copy. While a provider is down (crashed, restarting, not yet registered) its requests
are held, in order, and sent again once it registers: a client sees a slow request, never
a lost or doubled completion. A crashed partition is started again up to its `restarts`
(the command line gets generation=K); once every client partition has ended, the broker
closes the providers' links, their provider channels are rescinded and they power off.

Versions: a provider registers the versions its guest serves; a partition that uses
services is started once their providers have registered (or ended for good, or after
START_WAIT), and its welcome carries those versions, so its proxy offers exactly what the
service partition speaks. A provider registering again (a restart) sends the new list.

A provider that answers nothing for its `request_timeout` (topology, default 30 s) while
requests are outstanding is lost: the oldest unanswered request is answered
PYKVM_BUS_E_IO (it may be the one that hangs the provider, so it is not sent again), the
link is dropped with the reason, the partition is stopped (SIGKILL) and treated as a
crashed one: restarted within its `restarts`, the rest of its requests held meanwhile.
So is a provider whose service stays down (its channel closed for a protocol violation,
the guest still running) for request_timeout while requests are held for it.
"""

from __future__ import annotations

import itertools
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from .. import abi
from ..bus import wire

POLL = 0.2
MAX_HELD = 4096           # requests held for a service that is down; more are answered E_IO
STOP_GRACE = 10.0
START_WAIT = 120.0        # longest a partition waits to start for the services it uses to register


class _Conn:
    def __init__(self, sock):
        self.sock = sock
        self.parser = wire.FrameParser()
        self.name = None
        self.progress = 0.0        # a provider: when it last answered (or was given work while idle)


class Broker:
    """Owns the partitions of a topology and the relay between them."""

    def __init__(self, topo, rundir: Path, log=None):
        self.topo = topo
        self.rundir = Path(rundir)
        self.log = log or (lambda msg: print(f"pykvm: up: {msg}", file=sys.stderr))
        self.sel = selectors.DefaultSelector()
        self.path = str(self.rundir / "broker.sock")
        self.procs: dict[str, subprocess.Popen] = {}
        self.generation: dict[str, int] = {p.name: 0 for p in topo.partitions}
        self.status: dict[str, int] = {}
        self.conns: dict[str, _Conn] = {}                  # partition name -> its live connection
        self.providers: dict[str, _Conn] = {}              # service -> the registered provider's connection
        self.held: dict[str, deque] = {p.provides: deque() for p in topo.partitions if p.provides}
        self.inflight: dict[int, tuple] = {}               # broker tag -> (service, client conn, client tag, frame body)
        self.tags = itertools.count(1)
        self.counts = {"relayed": 0, "replies": 0, "held": 0, "resent": 0, "restarts": 0, "refused": 0,
                       "timeouts": 0}
        self.stopping = False
        self.versions: dict[str, list[int]] = {}           # service -> versions its provider registered
        self.gone: set[str] = set()                        # services whose provider ended for good
        self.waiting = [p for p in topo.partitions if p.uses]   # started once their services are up
        self.down_since: dict[str, float] = {}             # service -> when its provider stopped serving
        self.start_deadline = 0.0

    # ---------------------------------------------------------------- partitions
    def files(self, p, gen: int = 0) -> dict:
        """Where a partition's serial output, control socket, crash cores and VMM log go."""
        sfx = f".gen{gen}" if gen else ""
        return {"serial": self.rundir / f"{p.name}{sfx}.serial", "control": self.rundir / f"{p.name}.sock",
                "crashes": self.rundir / f"{p.name}-crashes", "log": self.rundir / f"{p.name}{sfx}.log"}

    def spawn(self, p) -> None:
        """Start (or restart) partition p as a `pykvm run` process."""
        gen = self.generation[p.name]
        f = self.files(p, gen)
        cmdline = (p.cmdline + f" generation={gen}").strip() if gen else p.cmdline
        argv = [sys.executable, "-m", "pykvm", "run", p.kernel, "--mem", str(p.memory >> 10) + "K",
                "--cpus", str(p.cpus), "--cmdline", cmdline, "--serial", str(f["serial"]),
                "--control", str(f["control"]), "--crash-dir", str(f["crashes"]), "--trust", p.trust]
        env = dict(os.environ, PYKVM_PARTITION=f"{p.name}@{self.path}")
        with open(f["log"], "wb") as log:
            self.procs[p.name] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True)
        self.status.pop(p.name, None)
        if p.provides:
            self.down_since[p.provides] = time.monotonic()     # a (re)start gets its full time to register

    def start(self) -> None:
        """Listen, then start every partition (providers first)."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.lsock.listen(64)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
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
            for key, _ev in self.sel.select(POLL):
                if key.data is None:
                    self._accept()
                else:
                    self._readable(key.data)
            self._check_timeouts()
            self._reap()
            if self.waiting and not self.stopping:
                self._spawn_ready()
            if self.stopping and time.monotonic() > self.deadline:
                self.kill_stragglers()
        return self.status

    def _accept(self) -> None:
        try:
            sock, _ = self.lsock.accept()
        except OSError:
            return
        sock.setblocking(True)
        c = _Conn(sock)
        self.sel.register(sock, selectors.EVENT_READ, c)

    def _readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            return self._drop(c, None)
        try:
            frames = c.parser.feed(data)
            for kind, body in frames:
                self._frame(c, kind, body)
        except wire.WireError as e:
            self._drop(c, str(e))

    def _send(self, c: _Conn, data: bytes) -> None:
        try:
            c.sock.sendall(data)
        except OSError:
            pass            # its EOF arrives through the selector

    def _frame(self, c: _Conn, kind: int, body: bytes) -> None:
        if c.name is None:
            if kind != wire.HELLO:
                raise wire.WireError(f"{wire.KINDS[kind]} before hello")
            name = wire.parse_json(body).get("name")
            p = self.topo.by_name(name) if isinstance(name, str) else None
            if p is None or name in self.conns:
                raise wire.WireError(f"hello from {name!r}, which is no partition or already connected")
            c.name = name
            self.conns[name] = c
            self._send(c, wire.json_frame(wire.WELCOME, {
                "name": p.name, "trust": p.trust, "uses": list(p.uses), "provides": p.provides,
                "rules": asdict(p.rules), "generation": self.generation[p.name],
                "versions": {u: self.versions[u] for u in p.uses if u in self.versions}}))
            return
        p = self.topo.by_name(c.name)
        if kind == wire.REGISTER:
            obj = wire.parse_json(body)
            if p.provides is None or obj.get("interface") != "block":
                raise wire.WireError(f"{p.name} registered {obj.get('interface')!r}, which its topology entry "
                                     "does not provide")
            versions = obj.get("versions")
            if (not isinstance(versions, list) or not 1 <= len(versions) <= 8
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 32 for v in versions)):
                raise wire.WireError(f"{p.name} registered versions {versions!r}, expected 1..8 u32 versions")
            self.providers[p.provides] = c
            self.down_since.pop(p.provides, None)
            self.versions[p.provides] = versions
            c.progress = time.monotonic()
            self.log(f"{p.name} serves {p.provides} at versions "
                     f"{', '.join(f'{v >> 16}.{v & 0xFFFF}' for v in versions)} (generation {self.generation[p.name]})")
            for q in self.topo.partitions:       # clients running already learn the versions of a restart
                qc = self.conns.get(q.name)
                if qc is not None and p.provides in q.uses:
                    self._send(qc, wire.json_frame(wire.STATUS, {"service": p.provides, "versions": versions}))
            self._flush(p.provides)
            self._spawn_ready()
        elif kind == wire.STATUS:
            obj = wire.parse_json(body)
            if p.provides and self.providers.get(p.provides) is c and obj.get("provider") == "down":
                reason = obj.get("reason")
                self.log(f"{p.name}: its provider channel closed" + (f": {reason}" if isinstance(reason, str) else ""))
                self._provider_lost(p.provides)
        elif kind == wire.REQUEST:
            tag, index, blk, _data = wire.parse_data(body)
            if index >= len(p.uses):
                raise wire.WireError(f"{p.name} sent a request for service {index}; it uses {len(p.uses)}")
            service = p.uses[index]
            q = self.held[service]
            if len(q) >= MAX_HELD or (service in self.gone and service not in self.providers):
                self.counts["refused"] += 1
                return self._send(c, wire.data_frame(wire.REPLY, tag, 0, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)))
            q.append((c, tag, body))
            self._flush(service)
        elif kind == wire.REPLY:
            tag, _i, resp, data = wire.parse_data(body)
            entry = self.inflight.get(tag)
            if entry is None or self.providers.get(entry[0]) is not c:
                raise wire.WireError(f"{p.name} answered transaction {tag}, which it was not given")
            del self.inflight[tag]
            _svc, client, ctag, _b = entry
            c.progress = time.monotonic()
            self.counts["replies"] += 1
            if self.conns.get(client.name) is client:
                self._send(client, wire.data_frame(wire.REPLY, ctag, 0, resp, data))
        else:
            raise wire.WireError(f"unexpected {wire.KINDS[kind]} frame from {p.name}")

    def _flush(self, service: str) -> None:
        """Send the held requests of service to its provider, if it is up."""
        prov = self.providers.get(service)
        q = self.held[service]
        if prov is not None and q and not any(e[0] == service for e in self.inflight.values()):
            prov.progress = time.monotonic()       # idle until now: its clock starts with this work
        while prov is not None and q:
            c, ctag, body = q.popleft()
            if self.conns.get(c.name) is not c:
                continue                     # the client went away meanwhile
            btag = next(self.tags)
            self.inflight[btag] = (service, c, ctag, body)
            self.counts["relayed"] += 1
            self._send(prov, wire.frame(wire.REQUEST, wire.TAG.pack(btag, 0) + body[wire.TAG.size:]))

    def _check_timeouts(self) -> None:
        """Lose a provider that answered nothing for its request_timeout while requests were outstanding,
        or whose service stayed down that long with requests held (its channel closed, the guest alive)."""
        now = time.monotonic()
        for service, since in list(self.down_since.items()):
            p = self.topo.provider_of(service)
            proc = self.procs.get(p.name)
            if self.held[service] and proc is not None and now - since > p.request_timeout:
                del self.down_since[service]
                self.counts["timeouts"] += 1
                self.log(f"{p.name}: {service} down for {p.request_timeout:g} s with {len(self.held[service])} "
                         "requests held: the partition is stopped")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
        for service, c in list(self.providers.items()):
            p = self.topo.by_name(c.name)
            if now - c.progress <= p.request_timeout:
                continue
            mine = sorted(t for t, e in self.inflight.items() if e[0] == service)
            if not mine:
                continue
            _s, client, ctag, _b = self.inflight.pop(mine[0])
            self.counts["timeouts"] += 1
            if self.conns.get(client.name) is client:
                self._send(client, wire.data_frame(wire.REPLY, ctag, 0, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)))
            self._drop(c, f"request {mine[0]} for {service} from {client.name} unanswered after "
                          f"{p.request_timeout:g} s: the provider is lost and stopped")
            proc = self.procs.get(p.name)
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass

    def _provider_lost(self, service: str) -> None:
        """The provider of service stopped serving: hold what it had not answered, oldest first."""
        if self.providers.pop(service, None) is not None:
            self.down_since[service] = time.monotonic()
        back = sorted((t, e) for t, e in self.inflight.items() if e[0] == service)
        for t, (_s, c, ctag, body) in reversed(back):
            del self.inflight[t]
            self.held[service].appendleft((c, ctag, body))
            self.counts["resent"] += 1
        if back:
            self.log(f"{service}: its provider went away with {len(back)} requests unanswered; holding them")

    def _drop(self, c: _Conn, reason: str | None) -> None:
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        if reason:
            self.log(f"{c.name or 'a partition'}: link dropped: {reason}")
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
            if rc != 0 and not self.stopping and self.generation[name] < p.restarts:
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

    def _fail_held(self, service: str) -> None:
        """The provider of service is gone for good: answer everything held for it with PYKVM_BUS_E_IO."""
        self._provider_lost(service)
        q = self.held[service]
        while q:
            c, ctag, _body = q.popleft()
            self.counts["refused"] += 1
            if self.conns.get(c.name) is c:
                self._send(c, wire.data_frame(wire.REPLY, ctag, 0, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)))

    def _stop_providers(self) -> None:
        """Every client has ended: close the providers' links (their guests see a rescind and power off)."""
        self.stopping = True
        self.deadline = time.monotonic() + STOP_GRACE
        for name in list(self.procs):
            c = self.conns.get(name)
            if c is not None:
                self._drop(c, None)
        self.sel.unregister(self.lsock)
        self.lsock.close()

    def kill_stragglers(self) -> None:
        """After the grace period, stop partitions that did not end by themselves."""
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def close(self) -> None:
        """Stop every partition still running and remove the broker socket."""
        self.kill_stragglers()
        for proc in self.procs.values():
            proc.wait()
        try:
            os.unlink(self.path)
        except OSError:
            pass
