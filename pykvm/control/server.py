"""Host control channel: a unix socket taking one JSON command per line while a guest runs.

A request is {"cmd": NAME, ...args}; the reply is {"ok": true, ...} or {"ok": false, "error": "..."}.
Commands run on the machine's main thread (Machine.call), never concurrently with each other.
The commands and their handlers are in commands.py.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time

from .. import hostsock
from ..bus.wire import close_fds
from .commands import COMMANDS

MAX_REQUEST = 64 * 1024          # bytes in one request line
MAX_DEPTH = 16                   # nesting of [ and { in one request (requests are flat objects)
MAX_CLIENTS = 256                # connections served at once; more wait in the listen backlog
MAX_REPLY_BACKLOG = 4 << 20      # unsent reply bytes a client may leave unread before it is dropped
IDLE_TIMEOUT = 30.0              # a connection silent this long is closed (it blocks nobody meanwhile)
MAX_FDS = 4                      # descriptors one request may carry (save passes one)


def nesting_depth(line: bytes) -> int:
    """Deepest [ / { nesting in a JSON text, skipping strings; computed without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for b in line:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:        # backslash
                escaped = True
            elif b == 0x22:
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_request(line: bytes) -> dict:
    """One request line as a dict with a string 'cmd'; ValueError with a one-line reason otherwise."""
    if len(line) > MAX_REQUEST:
        raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    if nesting_depth(line) > MAX_DEPTH:
        raise ValueError(f"request nested deeper than {MAX_DEPTH} levels")
    try:
        req = json.loads(line)
    except RecursionError:  # unreachable after the depth check; kept so no input can end the thread
        raise ValueError("request nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise ValueError("expected a JSON object with a string 'cmd'")
    return req


class _Client:
    """One connection's buffers."""

    __slots__ = ("sock", "inbuf", "outbuf", "last", "closing", "fds")

    def __init__(self, sock):
        self.sock = sock
        self.fds: list[int] = []        # descriptors received with the request being read (SCM_RIGHTS)
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last = time.monotonic()
        self.closing = False


class ControlServer:
    """Serves every connection on `path` from one thread with a selector.

    No client can block another: sockets are non-blocking, a partial line just waits in its
    client's buffer, replies are queued per client, and idle connections are closed after
    IDLE_TIMEOUT. Requests run one at a time on the machine's main thread (Machine.call).
    """

    def __init__(self, machine, path: str):
        self.machine = machine
        self.path = path
        # 0600 from the start, and never in place of anything but a stale socket (hostsock)
        self.sock, self._ident = hostsock.listen_unix(path, socket.SOMAXCONN)
        self.sock.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._listening = True
        self._busy = False               # a request is running (its reply is not queued yet)
        self.clients: dict = {}
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ the serving thread
    def _serve(self) -> None:
        try:
            while not self._stop:
                for key, events in self.sel.select(timeout=1.0):
                    if key.data == "wake":
                        continue
                    if key.data is None:
                        self._accept()
                    else:
                        try:
                            self._service(key.data, events)
                        except (OSError, ValueError, KeyError):
                            if self._stop:
                                return      # closed under us at shutdown
                            self._drop(key.data)
                self._expire()
        except (OSError, ValueError):
            if not self._stop:
                raise
        finally:
            for c in list(self.clients.values()):
                try:
                    self._drop(c)
                except (OSError, ValueError, KeyError):
                    pass

    def _accept(self) -> None:
        while len(self.clients) < MAX_CLIENTS:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            c = _Client(conn)
            self.clients[conn.fileno()] = c
            self.sel.register(conn, selectors.EVENT_READ, c)
        if len(self.clients) >= MAX_CLIENTS and self._listening:  # the backlog holds the rest until one leaves
            self.sel.unregister(self.sock)
            self._listening = False

    def _service(self, c: _Client, events: int) -> None:
        try:
            if events & selectors.EVENT_READ and not c.closing:
                self._read(c)
            if c.outbuf:
                self._write(c)
        except OSError:
            self._drop(c)
            return
        if c.closing and not c.outbuf:
            self._drop(c)
        elif c.sock.fileno() >= 0:
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.outbuf else 0)
            if c.closing:
                want = selectors.EVENT_WRITE
            self.sel.modify(c.sock, want, c)

    def _read(self, c: _Client) -> None:
        try:
            chunk, got, _flags, _addr = socket.recv_fds(c.sock, 65536, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        c.fds += got
        if len(c.fds) > MAX_FDS:
            close_fds(c.fds)
            c.fds = []
            self._reply(c, {"ok": False, "error": f"bad request: more than {MAX_FDS} descriptors"})
            c.closing = True
            return
        if not chunk:
            c.closing = True
            return
        c.last = time.monotonic()
        c.inbuf += chunk
        while not c.closing:
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                if len(c.inbuf) > MAX_REQUEST:
                    self._reply(c, {"ok": False, "error": f"bad request: longer than {MAX_REQUEST} bytes"})
                    c.closing = True
                return
            line = bytes(c.inbuf[:nl])
            del c.inbuf[:nl + 1]
            taken, c.fds = c.fds, []
            if not line.strip():
                close_fds(taken)
                continue
            self._busy = True
            try:
                self._reply(c, self.dispatch(line, taken))    # owns `taken` from here
            finally:
                self._busy = False

    def _reply(self, c: _Client, reply: dict) -> None:
        c.outbuf += json.dumps(reply).encode() + b"\n"
        if len(c.outbuf) > MAX_REPLY_BACKLOG:  # it does not read its replies
            c.outbuf.clear()
            c.closing = True

    def _write(self, c: _Client) -> None:
        try:
            n = c.sock.send(c.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        del c.outbuf[:n]
        c.last = time.monotonic()

    def _expire(self) -> None:
        now = time.monotonic()
        for c in [c for c in self.clients.values() if now - c.last > IDLE_TIMEOUT]:
            self._drop(c)

    def _drop(self, c: _Client) -> None:
        close_fds(c.fds)
        c.fds = []
        fd = c.sock.fileno()
        if fd >= 0:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            self.clients.pop(fd, None)
            c.sock.close()
        if not self._listening and not self._stop and len(self.clients) < MAX_CLIENTS:
            self.sel.register(self.sock, selectors.EVENT_READ, None)
            self._listening = True

    # ------------------------------------------------------------ requests
    def dispatch(self, line: bytes, fds: list[int] = ()) -> dict:
        """Run one request line and build the reply; never raises; closes the descriptors that came with it.

        They are closed by the call itself on the machine's thread, never earlier: a call that is
        still queued when its caller gives up must not find the numbers reused by something else.
        """
        fds = list(fds)

        def run_closing(fn, req):
            try:
                return fn(self.machine, req)
            finally:
                close_fds(fds)

        try:
            req = parse_request(line)
            if "_fds" in req:
                raise ValueError("'_fds' is reserved for descriptors passed with the request")
        except ValueError as e:
            close_fds(fds)
            return {"ok": False, "error": f"bad request: {e}"}
        if fds:
            req["_fds"] = fds
        fn = COMMANDS.get(req["cmd"])
        if fn is None:
            close_fds(fds)
            return {"ok": False, "error": f"unknown command {req['cmd'][:64]!r}; known: {', '.join(sorted(COMMANDS))}"}
        try:
            result = self.machine.call(lambda: run_closing(fn, req))
        except Exception as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        try:
            return json.loads(json.dumps({"ok": True, **(result or {})}))
        except (TypeError, ValueError) as e:
            return {"ok": False, "error": f"reply is not JSON data: {e}"}

    def close(self) -> None:
        """Stop serving (a reply in flight, e.g. to `save stop=true`, goes out first); remove the socket file.

        The path goes first, so a client never finds a socket file nobody answers (a sandboxed
        VMM cannot remove paths: the next run replaces the stale socket).
        """
        from .. import sandbox

        if not sandbox.active():
            hostsock.remove_unix(self.path, self._ident)
        self._flush_replies(2.0)
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self.thread is not threading.current_thread():
            self.thread.join(2)
        self.sel.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def _flush_replies(self, timeout: float) -> None:
        """Give queued replies a moment to reach their clients before the connections close."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._busy or any(c.outbuf for c in list(self.clients.values()))):
            time.sleep(0.01)
