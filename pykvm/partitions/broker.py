"""The broker of `pykvm up`: starts one process per partition and relays between them.

Process model: every partition is its own `pykvm run` process (own VM, own sandbox, own
control socket, own crash directory), so a partition that crashes writes its own core and
stops alone. The broker process runs no guest code: it starts the partitions with
PYKVM_PARTITION=NAME@SOCKET, welcomes each on its unix socket with what the topology gives
it, and relays block requests from clients to the partition providing the service, by
copy.

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
from ..record import asdict

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

    def __init__(self, topo, rundir: Path, log=None, intensity: tuple[int, float] = (5, 60.0)):
        self.topo = topo
        self.intensity, self.period = intensity
        self.restarted: dict[str, deque] = {p.name: deque() for p in topo.partitions}   # restart times
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
        self.remapped: set[int] = set()                    # broker tags of inflight REMAP requests
        self.remap_ok: dict[str, bool] = {}                # service -> its registered provider takes REMAP
        self.tags = itertools.count(1)
        self.counts = {"relayed": 0, "replies": 0, "failed": 0, "rescinds": 0, "restarts": 0, "refused": 0,
                       "remapped": 0, "remap_declined": 0, "timeouts": 0}
        self.stopping = False
        self.versions: dict[str, list[int]] = {}           # service -> versions its provider last registered
        #   (a service in it has been served at least once)
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
        if p.disk:
            argv += ["--disk", p.disk]
        env = dict(os.environ, PYKVM_PARTITION=f"{p.name}@{self.path}")
        with open(os.open(f["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as log:
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
        frames = []
        try:
            data, fds = wire.recv(c.sock)
            if not data:
                wire.close_fds(fds)
                return self._drop(c, None)
            frames = c.parser.feed(data, fds)
            while frames:
                f = frames.pop(0)
                if f.fds and f[0] == wire.REMAP:
                    self._remap(c, f[1], f.fds)       # owns f.fds from here
                else:
                    self._frame(c, f[0], f[1])
        except OSError:
            self._drop(c, None)
        except wire.WireError as e:
            self._drop(c, str(e))
        for f in frames:
            wire.close_fds(f.fds)

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
            for service in p.uses:             # a client (re)starting while its service is down
                if service in self.versions and service not in self.providers:
                    self._send(c, wire.json_frame(wire.STATUS, {"service": service, "state": "down"}))
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
            if self.providers.get(p.provides) is c:
                raise wire.WireError(f"{p.name} registered twice")
            self.providers[p.provides] = c
            self.remap_ok[p.provides] = obj.get("remap") is True
            self.down_since.pop(p.provides, None)
            self.versions[p.provides] = versions
            c.progress = time.monotonic()
            self.log(f"{p.name} serves {p.provides} at versions "
                     f"{', '.join(f'{v >> 16}.{v & 0xFFFF}' for v in versions)} (generation {self.generation[p.name]})")
            self._flush(p.provides)
            self._tell_clients(p.provides, "up", versions)   # running clients learn a restart's versions
            self._spawn_ready()
        elif kind == wire.STATUS:
            obj = wire.parse_json(body)
            if p.provides and self.providers.get(p.provides) is c and obj.get("provider") == "down":
                reason = obj.get("reason")
                self.log(f"{p.name}: its provider channel closed" + (f": {reason}" if isinstance(reason, str) else ""))
                self._provider_lost(p.provides)
            elif type(obj.get("cancel")) is int:        # a client stopped waiting for a remapped request
                for t, (svc, client, ctag, _b) in self.inflight.items():
                    if client is c and ctag == obj["cancel"] and t in self.remapped and svc in self.providers:
                        self._send(self.providers[svc], wire.json_frame(wire.STATUS, {"cancel": t}))
                        break
        elif kind == wire.REQUEST:
            tag, index, blk, _data = wire.parse_data(body)
            if index >= len(p.uses):
                raise wire.WireError(f"{p.name} sent a request for service {index}; it uses {len(p.uses)}")
            service = p.uses[index]
            q = self.held[service]
            if len(q) >= MAX_HELD or ((service in self.versions or service in self.gone)
                                      and service not in self.providers):
                # down after serving: the client's offer is (being) rescinded; it re-issues after the re-offer
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
            declined = tag in self.remapped and _i == wire.DECLINED
            self.remapped.discard(tag)
            _svc, client, ctag, _b = entry
            c.progress = time.monotonic()
            self.counts["replies" if not declined else "remap_declined"] += 1
            if self.conns.get(client.name) is client:
                self._send(client, wire.data_frame(wire.REPLY, ctag, wire.DECLINED if declined else 0, resp, data))
        elif kind == wire.REMAP:
            self._remap(c, body, ())
        else:
            raise wire.WireError(f"unexpected {wire.KINDS[kind]} frame from {p.name}")

    def _remap(self, c: _Conn, body: bytes, fds) -> None:
        """A client's REMAP request: to its provider with the descriptors, or declined; fds are closed here."""
        try:
            p = self.topo.by_name(c.name) if c.name else None
            if p is None:
                raise wire.WireError("remap before hello")
            tag, index, _blk, _desc = wire.parse_data(body)
            if index >= len(p.uses):
                raise wire.WireError(f"{p.name} sent a request for service {index}; it uses {len(p.uses)}")
            service = p.uses[index]
            prov = self.providers.get(service)
            if prov is None or not self.remap_ok.get(service) or not fds or self.held[service]:
                self.counts["remap_declined"] += 1
                return self._send(c, wire.data_frame(wire.REPLY, tag, wire.DECLINED, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)))
            btag = next(self.tags)
            self.inflight[btag] = (service, c, tag, body)
            self.remapped.add(btag)
            self.counts["remapped"] += 1
            try:
                wire.send(prov.sock, wire.frame(wire.REMAP, wire.TAG.pack(btag, 0) + body[wire.TAG.size:], len(fds)),
                          fds)
            except OSError:
                pass            # its EOF arrives through the selector; the request is declined then
        finally:
            wire.close_fds(fds)

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
        or that did not register within request_timeout of its start while requests were held for it
        (after a provider served, nothing is held: requests fail until the restart registers)."""
        now = time.monotonic()
        for service, since in list(self.down_since.items()):
            p = self.topo.provider_of(service)
            proc = self.procs.get(p.name)
            if self.held[service] and proc is not None and now - since > p.request_timeout:
                del self.down_since[service]
                self.counts["timeouts"] += 1
                self.log(f"{p.name}: {service} down for {p.request_timeout:g} s with {len(self.held[service])} "
                         "requests held: the partition is stopped")
                self._kill(p.name)
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
        for t, (_s, c, ctag, _body) in lost:
            del self.inflight[t]
            self.remapped.discard(t)          # its pages went with the provider's VM
            self.counts["failed"] += 1
            if self.conns.get(c.name) is c:
                self._send(c, wire.data_frame(wire.REPLY, ctag, 0, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)))
        if not self.stopping:
            self.log(f"{service}: its provider went away with {len(lost)} requests unanswered; offers rescinded")

    def _drop(self, c: _Conn, reason: str | None) -> None:
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        c.parser.close()
        for t, (svc, client, _ct, _b) in list(self.inflight.items()):
            if client is c and t in self.remapped and self.providers.get(svc) is not None:
                self._send(self.providers[svc], wire.json_frame(wire.STATUS, {"cancel": t}))
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
        for name in list(self.procs):
            self._kill(name)

    def close(self) -> None:
        """Stop every partition still running and remove the broker socket."""
        self.kill_stragglers()
        for proc in self.procs.values():
            proc.wait()
        try:
            os.unlink(self.path)
        except OSError:
            pass
