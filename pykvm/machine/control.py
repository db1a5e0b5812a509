"""Host control channel: a unix socket taking one JSON command per line while a guest runs.

A request is {"cmd": NAME, ...args}; the reply is {"ok": true, ...} or {"ok": false, "error": "..."}.
Commands run on the machine's main thread (Machine.call), never concurrently with each other.
Built-in commands: dump, devices, stats; other layers register more with `command(name)`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

MAX_REQUEST = 64 * 1024
MAX_FDS = 4                    # descriptors one request may carry (save passes one)
COMMANDS: dict = {}


def command(name: str):
    """Register `fn(machine, request) -> dict` as the handler of a control command."""
    def deco(fn):
        COMMANDS[name] = fn
        return fn
    return deco


class ControlServer:
    """Accepts connections on `path` and forwards each request to the machine's main thread."""

    def __init__(self, machine, path: str):
        self.machine = machine
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bind a temporary name, listen, then rename: the path appears only once it accepts
        # connections (a client that sees it never gets ECONNREFUSED), and a stale socket from
        # a dead pykvm is replaced atomically
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            self.sock.bind(tmp)
            os.chmod(tmp, 0o600)
            self.sock.listen(128)
            os.replace(tmp, path)
        except BaseException:
            self.sock.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(30)
                try:
                    self._handle(conn)
                except (OSError, ValueError):
                    pass

    def _handle(self, conn) -> None:
        buf = b""
        fds: list[int] = []     # descriptors sent with the request being read (SCM_RIGHTS)
        try:
            while True:
                chunk, got, _flags, _addr = socket.recv_fds(conn, 4096, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
                fds += got
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_REQUEST or len(fds) > MAX_FDS:
                    conn.sendall(b'{"ok": false, "error": "request too large"}\n')
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    taken, fds = fds, []
                    reply = self.dispatch(line, taken)   # owns `taken` from here
                    conn.sendall(json.dumps(reply).encode() + b"\n")
        finally:
            _close_all(fds)

    def dispatch(self, line: bytes, fds: list[int] = ()) -> dict:
        """Run one request line and build the reply; closes the descriptors that came with it once used.

        They are closed by the call itself on the machine's thread, never earlier: a call that is
        still queued when its caller gives up must not find the numbers reused by something else.
        """
        fds = list(fds)

        def run_closing(fn, req):
            try:
                return fn(self.machine, req)
            finally:
                _close_all(fds)

        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("expected a JSON object with a string 'cmd'")
            if "_fds" in req:
                raise ValueError("'_fds' is reserved for descriptors passed with the request")
        except ValueError as e:
            _close_all(fds)
            return {"ok": False, "error": f"bad request: {e}"}
        if fds:
            req["_fds"] = fds
        fn = COMMANDS.get(req["cmd"])
        if fn is None:
            _close_all(fds)
            return {"ok": False, "error": f"unknown command {req['cmd']!r}; known: {', '.join(sorted(COMMANDS))}"}
        try:
            result = self.machine.call(lambda: run_closing(fn, req))
        except Exception as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True, **(result or {})}

    def close(self) -> None:
        """Stop accepting, let a reply in flight (e.g. to `save stop=true`) go out, remove the socket file."""
        try:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
            except OSError:
                pass
            self.sock.close()
            if self.thread is not threading.current_thread():
                self.thread.join(2)
        finally:
            from .. import sandbox

            if not sandbox.active():  # a sandboxed VMM cannot remove paths: the next run replaces the stale socket
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


def request(path: str, req: dict, timeout: float = 60) -> dict:
    """Client side: send one request to a running pykvm and return its reply.

    `save` with a path: this client creates the file and passes its descriptor (SCM_RIGHTS), so
    the VMM, sandboxed or not, opens no path; the file gets its final name once the VMM wrote it.
    """
    if req.get("cmd") == "save" and isinstance(req.get("path"), str) and req["path"]:
        return _save_through_descriptor(path, req, timeout)
    return _exchange(path, req, timeout)


def _exchange(path: str, req: dict, timeout: float, fds: list[int] = ()) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        data = json.dumps(req).encode() + b"\n"
        sent = socket.send_fds(s, [data], list(fds)) if fds else 0
        s.sendall(data[sent:])
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def _save_through_descriptor(path: str, req: dict, timeout: float) -> dict:
    """Create a temporary file beside the target, let the VMM write the state into it, then rename it."""
    target = Path(req["path"]).absolute()
    if not target.parent.is_dir():
        return {"ok": False, "error": f"cannot save to {target}: directory {target.parent} does not exist"}
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)  # guest RAM inside
    except OSError as e:
        return {"ok": False, "error": f"cannot save to {target}: {e.strerror}"}
    try:
        reply = _exchange(path, {**req, "path": str(target)}, timeout, [fd])
        if reply.get("ok") and reply.get("fd"):  # written through the descriptor (else: by path, or not at all)
            os.replace(tmp, target)
        return reply
    finally:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@command("dump")
def _dump(machine, req) -> dict:
    path, err = machine.host_dump()
    if path is None:
        raise RuntimeError(err or "no core written (dumping disabled with --no-dump?)")
    return {"core": str(path)}


@command("devices")
def _devices(machine, req) -> dict:
    return {"devices": [{"name": d.name, "state": d.state.value, "generation": d.generation,
                         "describe": d.describe()} for d in machine.devices.devices]}


@command("stats")
def _stats(machine, req) -> dict:
    return machine.stats()


@command("hot-add")
def _hot_add(machine, req) -> dict:
    """Add a device of a hot-pluggable registry type: type=NAME plus its options."""
    from ..devices import registry

    kind = registry.lookup(str(req.get("type", "")))
    if not kind.hotplug:
        pluggable = ", ".join(sorted(t.name for t in registry.TYPES.values() if t.hotplug))
        raise ValueError(f"device type {kind.name} cannot be hot-added (hot-pluggable: {pluggable})")
    options = {k: v for k, v in req.items() if k not in ("cmd", "type")}
    dev = machine.devices.hot_add(kind.make(machine.device_context, options))
    machine.supervisor.ensure_running()
    return {"device": dev.describe()}


@command("hot-remove")
def _hot_remove(machine, req) -> dict:
    dev = machine.devices.hot_remove(str(req.get("name", "")), surprise=bool(req.get("surprise", False)))
    return {"device": dev.name, "state": dev.state.value}


@command("power")
def _power(machine, req) -> dict:
    dev = machine.devices.find(str(req.get("name", "")))
    state = str(req.get("state", "")).lower()
    if state not in ("d0", "d3"):
        raise ValueError("state must be d0 or d3")
    machine.devices.set_power(dev, state == "d0")
    return {"device": dev.name, "state": dev.state.value}


@command("inject")
def _inject(machine, req) -> dict:
    dev = machine.devices.find(str(req.get("name", "")))
    if not hasattr(dev, "inject"):
        raise ValueError(f"device {dev.name} takes no injected faults")
    dev.inject(str(req.get("kind", "raise")))
    return {"device": dev.name, "generation": dev.generation}


@command("save")
def _save(machine, req) -> dict:
    """Save the VM (pykvm restore FILE continues it) into the file whose descriptor came with the
    request (what `request` sends), or, unsandboxed, to path=FILE; stop=true ends this VM afterwards (a move)."""
    from .. import sandbox
    from .state import save_vm

    stop = req.get("stop", False)
    if stop in ("true", "false"):
        stop = stop == "true"
    if not isinstance(stop, bool):
        raise ValueError("stop must be true or false")
    fds = req.get("_fds") or []
    if len(fds) > 1:
        raise ValueError("save takes at most one file descriptor")
    if not fds and sandbox.active():
        raise ValueError("this VMM is sandboxed and opens no paths: send the file's descriptor with the "
                         "request (pykvm ctl and control.request do)")
    return save_vm(machine, str(req.get("path", "")), stop=stop, fd=fds[0] if fds else None)


@command("shutdown")
def _shutdown(machine, req) -> dict:
    """Ask the guest to power off cleanly over the partition bus's shutdown service."""
    if machine.bus is None:
        raise ValueError("this VM has no partition bus (run it with --bus)")
    machine.bus.with_session("shutdown", lambda s: s.request())
    return {"requested": True}


@command("rescind")
def _rescind(machine, req) -> dict:
    """Withdraw a bus channel from the guest: relid=N."""
    if machine.bus is None:
        raise ValueError("this VM has no partition bus (run it with --bus)")
    relid = req.get("relid")
    if isinstance(relid, str) and relid.isdigit():
        relid = int(relid)
    if not isinstance(relid, int) or isinstance(relid, bool):
        raise ValueError("rescind needs relid=N")
    machine.bus.rescind(relid)
    return {"rescinded": relid}
