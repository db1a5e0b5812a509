"""A partition process's connection to the broker (`pykvm up`): relayed requests, replies, provider state.

The socket is this process's end of a socketpair the broker made for this partition
before starting it (inherited; there is no named socket anyone could connect to). During
set-up a synchronous HELLO/WELCOME tells the partition its name, trust, the services it
uses and provides, and its policy. The broker enforces that policy again on every frame
(pykvm/partitions/admission.py); the proxy's own checks are the first line, not the only one. Then one thread reads frames: replies to this partition's
client requests, requests for the service its guest provides, and the state of the
services this partition uses: when a service's provider goes away the broker says
"down" and the proxied offer is rescinded in this partition's guest; when a restarted
provider registers, "up", and the service is offered again under a fresh relid (the
guest reopens it). Callbacks run with the bus lock held, as bus-thread code does. When
the broker goes away, client requests in flight fail with PYKVM_BUS_E_IO and a provider
channel is rescinded (its guest stops).

Remapped requests (pykvm/bus/remap.py) go as REMAP frames with the client's memfds
attached; their callback gets resp None when the request was declined (the proxy then
sends it by copy). A STATUS {"cancel": tag} from the broker tells the provider that the
client of a remapped request went away, so its pages leave this partition at once.
"""

from __future__ import annotations

import itertools
import socket
import sys
import threading

from .. import abi
from . import wire

CONNECT_TIMEOUT = 10.0


class LinkError(Exception):
    """The broker could not be reached or answered with something that is not a welcome."""


class PartitionLink:
    """This partition's end of the broker socket."""

    def __init__(self, sock: socket.socket, welcome: dict, log=None):
        self.sock = sock
        self.welcome = welcome
        self.name = welcome["name"]
        self.log = log or (lambda msg: print(f"pykvm: partition link: {msg}", file=sys.stderr))
        self.bus = None
        self._send_lock = threading.Lock()
        self._tags = itertools.count(1)
        self._pending: dict[int, object] = {}     # tag -> callback(resp, data), client side
        self._direct: dict[int, object] = {}      # tag -> callback(ok, reason, fd) of a direct open, client side
        self._closing: dict[int, tuple] = {}      # tag -> (service, callback()) of a direct channel closed here
        #   whose pages the service side has not yet said it unmapped
        self.provider = None                      # ProviderSession while the guest serves
        # service -> the versions its provider's guest registered (welcome, then STATUS frames)
        self.service_versions: dict[str, tuple[int, ...]] = {}
        for service, versions in (welcome.get("versions") or {}).items():
            self._set_versions(service, versions)
        self.closed = False
        self.broker_policy = None                 # the broker's decisions about this partition (it enforces them)
        self.counts = {"requests": 0, "replies": 0, "served": 0, "dropped": 0, "rescinds": 0, "reoffers": 0,
                       "remap_requests": 0, "remap_declined": 0, "direct_opens": 0, "direct_refused": 0,
                       "wakeups": 0}     # times the link thread woke to read (none per direct message)
        self._thread = None

    @classmethod
    def open(cls, sock: socket.socket, name: str, log=None) -> "PartitionLink":
        """Say hello on the broker's socket, wait for the welcome (LinkError on any failure; sock closed then)."""
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.sendall(wire.json_frame(wire.HELLO, {"name": name}))
            parser = wire.FrameParser()
            frames = []
            while not frames:
                data = sock.recv(65536)
                if not data:
                    raise LinkError("the broker closed the connection before welcoming this partition")
                frames = parser.feed(data)
            kind, body = frames[0]
            if kind != wire.WELCOME:
                raise LinkError(f"the broker answered with a {wire.KINDS[kind]} frame, expected a welcome")
            welcome = wire.parse_json(body)
            if welcome.get("name") != name or not isinstance(welcome.get("uses"), list):
                raise LinkError("the broker's welcome does not describe this partition")
        except (OSError, wire.WireError) as e:
            sock.close()
            raise LinkError(f"partition broker link: {e}") from None
        except LinkError:
            sock.close()
            raise
        sock.settimeout(None)
        link = cls(sock, welcome, log)
        link._parser = parser
        link._early = frames[1:]
        return link

    def start(self, bus) -> None:
        """Serve frames for `bus` on a thread."""
        self.bus = bus
        self._thread = threading.Thread(target=self._read, name="partition-link", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- sending (any thread)
    def _send(self, data: bytes, fds=()) -> bool:
        if self.closed:
            return False
        with self._send_lock:
            try:
                wire.send(self.sock, data, fds)
                return True
            except OSError:
                return False

    def request(self, index: int, blk: tuple, data: bytes, callback) -> None:
        """Relay one client request to the service at `index` of this partition's uses; callback(resp, data) later."""
        tag = next(self._tags)
        self._pending[tag] = callback
        self.counts["requests"] += 1
        if not self._send(wire.data_frame(wire.REQUEST, tag, index, blk, data)):
            self._pending.pop(tag, None)
            callback((abi.PYKVM_BUS_E_IO, 0, 0, 0, 0), b"")

    def request_remap(self, index: int, blk: tuple, desc: bytes, fds, callback) -> int:
        """Relay a request whose buffer the service partition maps (fds: the memfds desc names, sent, not closed)."""
        tag = next(self._tags)
        self._pending[tag] = callback
        self.counts["remap_requests"] += 1
        body = wire.TAG.pack(tag, index) + wire.BLK.pack(*blk) + desc
        if not self._send(wire.frame(wire.REMAP, body, len(fds)), fds):
            self._pending.pop(tag, None)
            callback((abi.PYKVM_BUS_E_IO, 0, 0, 0, 0), b"")
        return tag

    def open_direct(self, index: int, desc: dict, fds, callback) -> int:
        """Ask for a direct channel to the service at `index` (fds: memfds then the doorbell eventfd, sent, not
        closed); callback(ok, reason, service eventfd or -1[, unmapped=False when nobody can tell whether the
        service side mapped it]) later, on the link thread under the bus lock."""
        tag = next(self._tags)
        self._direct[tag] = callback
        if not self._send(wire.json_frame(wire.DIRECT, dict(desc, op="open", tag=tag, index=index), len(fds)), fds):
            self._direct.pop(tag, None)
            callback(False, "the broker is gone", -1)
        return tag

    def close_direct(self, tag: int, service: str, unmapped) -> None:
        """This partition closed direct channel `tag`: the service partition unmaps its pages; unmapped() runs
        once it said so, or once its provider is known down (link thread, bus lock held), never before."""
        self._direct.pop(tag, None)
        self._closing[tag] = (service, unmapped)
        self._send(wire.json_frame(wire.DIRECT, {"op": "close", "tag": tag}))

    def _unmapped(self, tags) -> None:
        for tag in tags:
            entry = self._closing.pop(tag, None)
            if entry is not None:
                entry[1]()

    def direct_ready(self, tag: int, ok: bool, reason: str | None, fd: int = -1) -> None:
        """The provider's answer to direct open `tag` (fd: its doorbell eventfd, sent, not closed)."""
        body = {"op": "ready", "tag": tag, "ok": ok}
        if reason:
            body["reason"] = reason
        self._send(wire.json_frame(wire.DIRECT, body, 1 if fd >= 0 else 0), (fd,) if fd >= 0 else ())

    def cancel_remap(self, tag: int) -> None:
        """This partition no longer waits for remapped request `tag`: its pages leave the service partition now."""
        if self._pending.pop(tag, None) is not None:
            self._send(wire.json_frame(wire.STATUS, {"cancel": tag}))

    def reply(self, tag: int, resp: tuple, data: bytes, declined: bool = False) -> None:
        """Return the guest's answer to a relayed request (declined: a remapped one this side would not map)."""
        self.counts["served" if not declined else "remap_declined"] += 1
        self._send(wire.data_frame(wire.REPLY, tag, wire.DECLINED if declined else 0, resp, data))

    def provider_up(self, session, interface: str, versions, remap: bool = False, direct: bool = False) -> None:
        """The guest registered as the provider of its service (remap: it takes remapped requests; direct: it
        serves direct channels)."""
        self.provider = session
        self._send(wire.json_frame(wire.REGISTER, {"interface": interface, "versions": list(versions),
                                                   "remap": bool(remap), "direct": bool(direct)}))

    def provider_down(self, session, reason: str | None = None) -> None:
        """The provider channel closed (reason: why the root closed it): the broker rescinds and fails its requests."""
        if self.provider is session:
            self.provider = None
            self._send(wire.json_frame(wire.STATUS, {"provider": "down", "reason": reason}))

    def _set_versions(self, service, versions) -> None:
        if (isinstance(service, str) and isinstance(versions, list) and 1 <= len(versions) <= 8
                and all(isinstance(v, int) and 0 < v < 1 << 32 for v in versions)):
            self.service_versions[service] = tuple(versions)

    # ---------------------------------------------------------------- receiving (link thread)
    def _read(self) -> None:
        frames, self._early = self._early, []
        try:
            while True:
                while frames:
                    f = frames.pop(0)
                    try:
                        self._dispatch(f[0], f[1], f.fds)
                    except wire.WireError:
                        raise
                    except Exception as e:   # a pykvm bug: keep serving the other requests, say so
                        self.log(f"internal error on a {wire.KINDS[f[0]]} frame: {type(e).__name__}: {e}")
                data, fds = wire.recv(self.sock)
                self.counts["wakeups"] += 1
                if not data:
                    wire.close_fds(fds)
                    break
                frames = self._parser.feed(data, fds)
        except (OSError, wire.WireError) as e:
            self.log(f"dropped: {e}")
        for f in frames:
            wire.close_fds(f.fds)
        self._parser.close()
        self._broker_gone()

    def _dispatch(self, kind: int, body: bytes, fds=()) -> None:
        if kind == wire.REPLY:
            tag, index, resp, data = wire.parse_data(body)
            with self.bus.lock:
                cb = self._pending.pop(tag, None)
                if cb is None:
                    self.counts["dropped"] += 1
                    return
                self.counts["replies"] += 1
                if index == wire.DECLINED:
                    self.counts["remap_declined"] += 1
                    resp = None
                cb(resp, data)
        elif kind in (wire.REQUEST, wire.REMAP):
            try:
                tag, _i, blk, data = wire.parse_data(body)
            except wire.WireError:
                wire.close_fds(fds)
                raise
            with self.bus.lock:
                if self.provider is None:
                    wire.close_fds(fds)
                    self._send(wire.data_frame(wire.REPLY, tag, wire.DECLINED if kind == wire.REMAP else 0,
                                               (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)))
                    return
                if kind == wire.REMAP:
                    self.provider.submit_remap(tag, blk, data, fds)
                else:
                    self.provider.submit(tag, blk, data)
        elif kind == wire.DIRECT:
            self._on_direct(wire.parse_json(body), tuple(fds))
        elif kind == wire.STATUS:
            obj = wire.parse_json(body)
            if "policy" in obj:                # the broker's decisions about this partition, for `ctl policy`
                if not isinstance(obj["policy"], dict):
                    raise wire.WireError("status: the broker's policy report is not an object")
                self.broker_policy = obj["policy"]
                return
            if "cancel" in obj:
                tag = obj.get("cancel")
                if type(tag) is not int:
                    raise wire.WireError(f"status {obj!r}: a cancel names a request tag")
                with self.bus.lock:
                    if self.provider is not None:
                        self.provider.cancel(tag)
                return
            service, state = obj.get("service"), obj.get("state")
            uses = self.welcome.get("uses") or []
            if service not in uses or state not in ("down", "up"):
                raise wire.WireError(f"status {obj!r}: expected a service this partition uses, down or up")
            with self.bus.lock:
                if "versions" in obj:          # a provider registered (again): the versions it serves now
                    self._set_versions(service, obj["versions"])
                self.service_state(service, state)
        else:
            wire.close_fds(fds)      # informational frames carry none (the parser ensures it); be sure

    def _on_direct(self, obj: dict, fds) -> None:
        """A direct open or close for this partition's provider, or the answer to this partition's open."""
        op, tag = obj.get("op"), obj.get("tag")
        if type(tag) is not int:
            wire.close_fds(fds)
            raise wire.WireError(f"direct frame {obj!r}: no tag")
        with self.bus.lock:
            if op == "ready":
                cb = self._direct.pop(tag, None)
                fd = fds[0] if len(fds) == 1 and obj.get("ok") is True else -1
                if cb is None:
                    wire.close_fds(fds)
                    return
                wire.close_fds(f for f in fds if f != fd)
                self.counts["direct_opens" if fd >= 0 else "direct_refused"] += 1
                reason = obj.get("reason") if isinstance(obj.get("reason"), str) else None
                cb(fd >= 0, reason, fd)
            elif op == "open":
                if self.provider is None:
                    wire.close_fds(fds)
                    return self.direct_ready(tag, False, "the service partition's guest is not serving")
                self.provider.direct_open(tag, obj, fds)
            elif op == "close":
                wire.close_fds(fds)
                if self.provider is not None:
                    self.provider.direct_close(tag, obj.get("reason") if isinstance(obj.get("reason"), str) else None)
                # no provider session: its close removed every mapping already
                self._send(wire.json_frame(wire.DIRECT, {"op": "closed", "tag": tag}))
            elif op == "closed":
                wire.close_fds(fds)
                self._unmapped([tag])
            else:
                wire.close_fds(fds)
                raise wire.WireError(f"direct frame with op {op!r}")

    def service_state(self, service: str, state: str) -> None:
        """The provider of service went down (rescind its proxied offer) or serves again (offer it anew)."""
        bus = self.bus
        current = {}                              # the proxy service object -> its newest channel
        for relid, ch in bus.channels.items():
            if getattr(ch.service, "target", None) == service and getattr(ch.service, "link", None) is self:
                if ch.service not in current or relid > current[ch.service].relid:
                    current[ch.service] = ch
        for ch in current.values():
            try:
                if state == "down" and ch.state != "rescinded":
                    bus.rescind(ch.relid)
                    self.counts["rescinds"] += 1
                    self.log(f"{service}: its provider went away; offer {ch.relid} rescinded")
                elif state == "up" and ch.state == "rescinded":
                    new = bus.reoffer(ch.relid)
                    self.counts["reoffers"] += 1
                    self.log(f"{service}: served again; offered as channel {new}")
            except ValueError as e:
                self.log(f"{service}: {e}")
        if state == "down":     # its VM, or at least its provider session, is gone with every mapping it had
            self._unmapped([t for t, (svc, _cb) in self._closing.items() if svc == service])

    def _direct_open(self) -> list:
        """The direct channels of this partition's guest, from its bus (relid, service, state)."""
        bus = self.bus
        if bus is None:
            return []
        out = []
        for relid, ch in list(bus.channels.items()):
            sess = ch.session
            if getattr(sess, "direct", False):
                out.append({"relid": relid, "service": sess.service.target, "state": sess.state})
        return out

    def _broker_gone(self) -> None:
        self.closed = True
        bus = self.bus
        with bus.lock:
            pending, self._pending = self._pending, {}
            for cb in pending.values():
                cb((abi.PYKVM_BUS_E_IO, 0, 0, 0, 0), b"")     # not None: no copy path is left either
            opening, self._direct = self._direct, {}
            for cb in opening.values():      # sent: the service side may have mapped it; nobody can say now
                cb(False, "the broker is gone", -1, unmapped=False)
            for ch in bus.channels.values():
                if ch.service.name == "provider" and ch.state != "rescinded":
                    try:
                        bus.rescind(ch.relid)
                    except ValueError:
                        pass
        try:
            self.sock.close()
        except OSError:
            pass

    def snapshot(self) -> dict:
        """Link counters for `ctl policy` / stats."""
        return dict(self.counts, name=self.name, trust=self.welcome.get("trust"), uses=self.welcome.get("uses"),
                    provides=self.welcome.get("provides"), generation=self.welcome.get("generation"),
                    service_versions={s: [f"{v >> 16}.{v & 0xFFFF}" for v in vs]
                                      for s, vs in self.service_versions.items()},
                    outstanding=len(self._pending), connected=not self.closed, broker_policy=self.broker_policy,
                    direct={svc: {"direct": why is None,
                                  "why": why or "trusted by its policy (direct = true): guest to guest"}
                            for svc, why in (self.welcome.get("direct") or {}).items()},
                    direct_open=self._direct_open())
