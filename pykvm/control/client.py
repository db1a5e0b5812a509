"""The `pykvm ctl` side of the control channel: one request line out, one reply line back."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def request(path: str, req: dict, timeout: float = 60) -> dict:
    """Client side: send one request to a running pykvm and return its reply.

    `save` with a path: this client creates the file and passes its descriptor (SCM_RIGHTS), so
    the VMM, sandboxed or not, opens no path; the file gets its final name once the VMM wrote it.
    """
    if req.get("cmd") == "save" and isinstance(req.get("path"), str) and req["path"]:
        return _save_through_descriptor(path, req, timeout)
    return _exchange(path, req, timeout)


def _exchange(path: str, req: dict, timeout: float, fds: list[int] = ()) -> dict:
    return exchange_raw(path, json.dumps(req).encode() + b"\n", timeout, fds)


def exchange_raw(path: str, data: bytes, timeout: float, fds: list[int] = ()) -> dict:
    """Send bytes as they are (descriptors attached to the first) and parse the one reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
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
