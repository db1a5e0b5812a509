"""The broker of `pykvm up`: starts one process per partition and relays between them.

Process model: every partition is its own `pykvm run` process (own VM, own sandbox, own
control socket, own crash directory), so a partition that crashes writes its own core and
stops alone. The broker process runs no guest code: it makes a socketpair for each
partition, starts it with one end (PYKVM_PARTITION=NAME, PYKVM_BROKER_FD=N), welcomes it
with what the topology gives it, and relays block requests from clients to the partition
providing the service (relay.py), enforcing each client's policy as it does. There is no
named socket: who speaks on a link is fixed by the broker when it starts the process, so
no other process can take a partition's name.

A crashed partition is started again up to its `restarts`, and at most `intensity` times
in `period` seconds (`pykvm up --restart-intensity N/SECONDS`; the command line gets
generation=K). Versions: a provider registers the versions its guest serves; a partition
that uses services is started once their providers have registered (or ended for good,
or after START_WAIT), and its welcome carries those versions, so its proxy offers exactly
what the service partition speaks. Once every client partition has ended, the broker
closes the providers' links, their provider channels are rescinded and they power off.
The policy decisions are counted per partition and written to DIR/broker-policy.json.
"""

from __future__ import annotations

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

from ..bus import wire
from .conn import Conn
from .relay import Relay

POLL = 0.2
STOP_GRACE = 10.0
START_WAIT = 120.0        # longest a partition waits to start for the services it uses to register
STATUS_EVERY = 1.0        # seconds between rewrites of broker-policy.json while decisions change
ENV_NAME, ENV_FD = "PYKVM_PARTITION", "PYKVM_BROKER_FD"


class Broker(Relay):
    """Owns the partitions of a topology (their processes) and the relay between them."""

    def __init__(self, topo, rundir: Path, log=None, intensity: tuple[int, float] = (5, 60.0)):
        super().__init__(topo, log)
        self.intensity, self.period = intensity
        self.restarted: dict[str, deque] = {p.name: deque() for p in topo.partitions}   # restart times
        self.rundir = Path(rundir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.status: dict[str, int] = {}
        self.waiting = [p for p in topo.partitions if p.uses]   # started once their services are up
        self.start_deadline = 0.0
        self.status_path = self.rundir / "broker-policy.json"
        self._status_written = (None, 0.0)

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
            logfd = os.open(self.files(p, gen)["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(logfd, "wb") as log:
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
            ready = self.sel.select(timeout)
            if ready:
                self.counts["wakeups"] += 1
            for key, ev in ready:
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

    def _running(self, name: str) -> bool:
        return name in self.procs

    def _kill(self, name: str) -> None:
        """Stop partition `name` at once (SIGKILL to its process group); _reap then handles it as a crash."""
        proc = self.procs.get(name)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

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
    def _write_status(self, force: bool = False) -> None:
        """Rewrite DIR/broker-policy.json (0600) and tell each client its part, when decisions changed,
        at most every STATUS_EVERY seconds."""
        n = (sum(sum(ld.allowed.values()) + sum(ld.refused.values()) for ld in self.ledgers.values()),
             sum(v for k, v in self.counts.items() if k != "wakeups"))   # decisions, and what the relay did
        now = time.monotonic()
        last, when = self._status_written
        if not force and (n == last or now - when < STATUS_EVERY):
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
        snap = self.policy_snapshot()
        for name, c in list(self.conns.items()):     # `pykvm ctl SOCK policy` of a client shows them too
            if c.grants:
                self._send(c, wire.json_frame(wire.STATUS, {"policy": snap[name]}))

    def close(self) -> None:
        """Stop every partition still running; write the final policy status."""
        self.stopping = True
        self.kill_stragglers()
        for proc in self.procs.values():
            proc.wait()
        for key in list(self.sel.get_map().values()):
            self._drop(key.data, None)
        self._write_status(force=True)
