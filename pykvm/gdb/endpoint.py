"""Where gdb connects (--gdb): a listener only the user who started the VM can use.

A unix socket is created 0600 and never replaces anything but a stale socket (hostsock). A
TCP peer is accepted only when its socket belongs to this process's user on this host (its
line in /proc/net/tcp[6], read through descriptors opened here, before the sandbox); anyone
else is told why in a console packet, named on stderr, and disconnected.
"""

from __future__ import annotations

import os
import socket
import sys

from .. import errors, hostsock
from . import rsp


def parse_address(spec: str) -> tuple[int, object]:
    """'tcp::1234', 'tcp:HOST:1234', ':1234', '1234', 'unix:PATH' or a path -> (family, address)."""
    text = spec.strip()
    if text.startswith("unix:") or "/" in text:
        path = text[5:] if text.startswith("unix:") else text
        if not path:
            raise errors.UsageError(f"--gdb {spec!r}: unix: needs a socket path")
        return socket.AF_UNIX, path
    if text.startswith("tcp:"):
        text = text[4:]
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.UsageError(f"--gdb {spec!r}: expected tcp::PORT, tcp:HOST:PORT or unix:PATH")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


class Endpoint:
    """The listening socket, and the check every connection passes before it becomes a session."""

    def __init__(self, sock: socket.socket, path: str | None = None, ident=None, log=None):
        self.sock = sock
        self.path = path                   # a unix socket's path (removed at close when still ours)
        self._ident = ident
        self.log = log if log is not None else sys.stderr
        self.owner = os.geteuid()
        self._owners = hostsock.PeerOwners() if sock.family != socket.AF_UNIX else None

    @property
    def where(self) -> str:
        """What gdb's `target remote` takes."""
        if self.path:
            return self.path               # the socket was bound elsewhere, then linked here
        name = self.sock.getsockname()
        return f"{name[0]}:{name[1]}"

    def accept(self) -> socket.socket | None:
        """The next connection from this user, or None (a refused or failed one)."""
        try:
            conn, peer = self.sock.accept()
        except OSError:
            return None
        if self._owners is None:
            return conn                    # the socket file is 0600: only this user reached it
        try:
            uid = self._owners.uid(peer, conn.getsockname())
        except OSError:
            uid = None
        if uid == self.owner:
            return conn
        who = f"uid {uid}" if uid is not None else "an unknown user (not a socket on this host)"
        why = f"pykvm: gdb: refused a connection from {peer[0]}:{peer[1]}: {who}; only uid {self.owner}, " \
              "who started this VM, may debug it"
        print(why, file=self.log)
        try:
            conn.settimeout(1.0)
            conn.sendall(rsp.frame(b"O" + (why + "\n").encode().hex().encode()) + rsp.frame(b"E01"))
        except OSError:
            pass
        conn.close()
        return None

    def close(self) -> None:
        """Stop listening; remove our unix socket file unless sandboxed (the next run sees it stale)."""
        try:
            self.sock.close()
        except OSError:
            pass
        if self._owners is not None:
            self._owners.close()
        if self.path:
            from .. import sandbox

            if not sandbox.active():
                hostsock.remove_unix(self.path, self._ident)


def listen(spec: str, log=None) -> Endpoint:
    """The Endpoint for --gdb (made before the sandbox, which allows only accepting)."""
    family, addr = parse_address(spec)
    if family == socket.AF_UNIX:
        try:
            sock, ident = hostsock.listen_unix(addr)
        except OSError as e:
            raise errors.UsageError(f"--gdb {spec}: {e.strerror or e}") from None
        return Endpoint(sock, addr, ident, log)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise errors.UsageError(f"--gdb {spec}: {e.strerror or e}") from None
    return Endpoint(sock, log=log)
