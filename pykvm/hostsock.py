"""Listening sockets only the VM's owner can reach: unix sockets 0600 that never replace a file,
and the uid of a TCP peer on this host.

A unix socket is bound in a private directory (mode 0700, so nobody can connect before its mode
is 0600), then hard-linked to its path: link() never replaces what is there. Something already
at the path is removed only when it is a stale socket (a socket file nobody accepts on); a
regular file, a directory, a live socket or a symlink is left alone and refused.

A TCP peer is identified by the owner of its socket in /proc/net/tcp and /proc/net/tcp6 (the
line whose local address is the peer's and whose remote address is ours). The tables are
opened when the listener is made, before any sandbox, and read again with pread for every
connection. A peer with no line there (another host, another network namespace) has no
known owner and is refused like a foreign one.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import struct
import tempfile


class SocketPathError(OSError):
    """The socket path is taken by something that is not a stale socket, or cannot be bound."""


def _stale(path: str, st: os.stat_result) -> bool:
    """True when `path` is a socket file that nobody accepts on (left behind by a dead process)."""
    if not stat.S_ISSOCK(st.st_mode):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False            # a full backlog, a permission problem: someone may be serving it
    finally:
        probe.close()
    return False


def _what(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket in use")):
        if test(mode):
            return name
    return "a file that is not a socket"


def _clear_stale(path: str, private: str) -> None:
    """Move a stale socket at `path` out of the way; SocketPathError for anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not _stale(path, st):
        raise SocketPathError(errno.EEXIST, f"{path} exists and is {_what(st)}; pykvm replaces only a stale "
                                            "socket: remove it or choose another path")
    # renamed away, then checked: what moved must be the socket we probed, or it goes back
    aside = os.path.join(private, "stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = os.lstat(aside)
    if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
        try:
            os.link(aside, path, follow_symlinks=False)
        except OSError:
            pass
        raise SocketPathError(errno.EEXIST, f"{path} changed while pykvm looked at it; not replaced")
    os.unlink(aside)


def listen_unix(path: str, backlog: int = 1) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket at `path`, mode 0600; (socket, (st_dev, st_ino) of its file).

    Never removes or replaces anything but a stale socket (SocketPathError otherwise).
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        private = tempfile.mkdtemp(prefix=".pykvm-sock-", dir=parent)   # 0700
    except OSError as e:
        raise SocketPathError(e.errno, f"{path}: cannot create a socket in {parent}: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dirfd = -1
    try:
        inner = os.path.join(private, "s")
        # bound through the directory's descriptor: a unix address holds 107 bytes, a deep
        # directory's path may not fit (the link below has no such limit)
        dirfd = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock.bind(f"/proc/self/fd/{dirfd}/s")
        os.chmod(inner, 0o600)       # inside a 0700 directory: nobody reached it before this
        sock.listen(backlog)
        _clear_stale(path, private)
        try:
            os.link(inner, path)
        except FileExistsError:
            raise SocketPathError(errno.EEXIST, f"{path} appeared while pykvm was creating its socket; "
                                                "not replaced") from None
        st = os.lstat(path)
        return sock, (st.st_dev, st.st_ino)
    except SocketPathError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise SocketPathError(e.errno, f"{path}: {e.strerror or e}") from None
    finally:
        if dirfd >= 0:
            os.close(dirfd)
        shutil.rmtree(private, ignore_errors=True)


def remove_unix(path: str, ident: tuple[int, int]) -> None:
    """Remove our socket file at `path`, only if it is still the one listen_unix made."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------- TCP peers on this host
def _proc_addr4(ip: str, port: int) -> str:
    """An IPv4 endpoint as /proc/net/tcp prints it: the address as a host-order word, the port."""
    (word,) = struct.unpack("=I", socket.inet_aton(ip))
    return f"{word:08X}:{port:04X}"


def _proc_addr6(ip: str, port: int) -> str:
    raw = socket.inet_pton(socket.AF_INET6, ip)
    words = struct.unpack("=4I", raw)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _endpoints(ip: str, port: int) -> set[str]:
    """Every spelling of (ip, port) in the tcp and tcp6 tables (IPv4 peers may use mapped IPv6 sockets)."""
    if ":" in ip:
        out = {_proc_addr6(ip, port)}
        if ip.lower().startswith("::ffff:") and "." in ip:
            out.add(_proc_addr4(ip[7:], port))
        return out
    return {_proc_addr4(ip, port), _proc_addr6("::ffff:" + ip, port)}


class PeerOwners:
    """Finds the uid owning the other end of an accepted local TCP connection (descriptors opened now)."""

    def __init__(self):
        self.fds = []
        for name in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                self.fds.append(os.open(name, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                pass              # no IPv6 in this kernel: the IPv4 table is enough

    def _table(self, fd: int):
        chunks, off = [], 0
        while True:
            chunk = os.pread(fd, 65536, off)
            if not chunk:
                break
            chunks.append(chunk)
            off += len(chunk)
        return b"".join(chunks).decode("ascii", "replace").splitlines()[1:]

    def uid(self, peer: tuple, local: tuple) -> int | None:
        """The uid of the socket at `peer` connected to our `local` address, or None when not on this host."""
        theirs = _endpoints(peer[0], peer[1])
        ours = _endpoints(local[0], local[1])
        for fd in self.fds:
            try:
                lines = self._table(fd)
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) > 7 and f[1] in theirs and f[2] in ours:
                    try:
                        return int(f[7])
                    except ValueError:
                        return None
        return None

    def close(self) -> None:
        """Close the table descriptors."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
