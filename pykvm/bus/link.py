"""A partition process's connection to the broker (`pykvm up`): relayed requests, replies, provider state.

Connected during set-up (before the sandbox: no connect afterwards), with a synchronous
HELLO/WELCOME that tells the partition its name, trust, the services it uses and
provides, and its policy. Then one thread reads frames: replies to this partition's
client requests, and requests for the service its guest provides. Callbacks run with the
bus lock held, as bus-thread code does. When the broker goes away, client requests in
flight fail with PYKVM_BUS_E_IO and a provider channel is rescinded (its guest stops).
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
        self.provider = None                      # ProviderSession while the guest serves
        # service -> the versions its provider's guest registered (welcome, then STATUS frames)
        self.service_versions: dict[str, tuple[int, ...]] = {}
        for service, versions in (welcome.get("versions") or {}).items():
            self._set_versions(service, versions)
        self.closed = False
        self.counts = {"requests": 0, "replies": 0, "served": 0, "dropped": 0}
        self._thread = None

    @classmethod
    def connect(cls, path: str, name: str, log=None) -> "PartitionLink":
        """Connect, say hello, wait for the welcome (LinkError on any failure)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
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
            raise LinkError(f"partition broker {path}: {e}") from None
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
    def _send(self, data: bytes) -> bool:
        if self.closed:
            return False
        with self._send_lock:
            try:
                self.sock.sendall(data)
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

    def reply(self, tag: int, resp: tuple, data: bytes) -> None:
        """Return the guest's answer to a relayed request."""
        self.counts["served"] += 1
        self._send(wire.data_frame(wire.REPLY, tag, 0, resp, data))

    def provider_up(self, session, interface: str, versions) -> None:
        """The guest registered as the provider of its service."""
        self.provider = session
        self._send(wire.json_frame(wire.REGISTER, {"interface": interface, "versions": list(versions)}))

    def provider_down(self, session, reason: str | None = None) -> None:
        """The provider channel closed (reason: why the root closed it): the broker holds requests meanwhile."""
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
                for kind, body in frames:
                    try:
                        self._dispatch(kind, body)
                    except wire.WireError:
                        raise
                    except Exception as e:   # a pykvm bug: keep serving the other requests, say so
                        self.log(f"internal error on a {wire.KINDS[kind]} frame: {type(e).__name__}: {e}")
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                frames = self._parser.feed(data)
        except (OSError, wire.WireError) as e:
            self.log(f"dropped: {e}")
        self._broker_gone()

    def _dispatch(self, kind: int, body: bytes) -> None:
        if kind == wire.REPLY:
            tag, _i, resp, data = wire.parse_data(body)
            with self.bus.lock:
                cb = self._pending.pop(tag, None)
                if cb is None:
                    self.counts["dropped"] += 1
                    return
                self.counts["replies"] += 1
                cb(resp, data)
        elif kind == wire.REQUEST:
            tag, _i, blk, data = wire.parse_data(body)
            with self.bus.lock:
                if self.provider is None:
                    self._send(wire.data_frame(wire.REPLY, tag, 0, (abi.PYKVM_BUS_E_IO, 0, 0, 0, 0)))
                    return
                self.provider.submit(tag, blk, data)
        elif kind == wire.STATUS:
            obj = wire.parse_json(body)
            if "service" in obj:          # a provider registered (again): the versions it serves now
                self._set_versions(obj["service"], obj.get("versions"))

    def _broker_gone(self) -> None:
        self.closed = True
        bus = self.bus
        with bus.lock:
            pending, self._pending = self._pending, {}
            for cb in pending.values():
                cb((abi.PYKVM_BUS_E_IO, 0, 0, 0, 0), b"")
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
                    outstanding=len(self._pending), connected=not self.closed)
