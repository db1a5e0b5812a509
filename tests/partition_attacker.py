"""A compromised client VMM: speaks the broker protocol directly on the link `pykvm up` gave a partition.

Started by tests/test_broker_policy.py in place of a partition's `pykvm run`, with the same
environment a real partition VMM gets (a compromised VMM has exactly that link). It does
what its guest's policy forbids, one thing at a time, and writes what the broker answered
to the JSON file named by ATTACK_OUT. Also speaks the older named-socket link
(PYKVM_PARTITION=NAME@SOCKET), so the same test shows what happens without the fix.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pykvm import abi  # noqa: E402
from pykvm.bus import remap, wire  # noqa: E402

READ, WRITE = abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE
V1_0, V1_1 = abi.PYKVM_BLOCK_V1_0, abi.PYKVM_BLOCK_V1_0 | 1


def link() -> tuple[socket.socket, str]:
    """This partition's link, as a real VMM of either version would find it."""
    spec = os.environ["PYKVM_PARTITION"]
    name, _sep, path = spec.partition("@")
    if path:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return s, name
    return socket.socket(fileno=int(os.environ["PYKVM_BROKER_FD"])), name


class Peer:
    def __init__(self, sock):
        self.sock = sock
        self.parser = wire.FrameParser()
        self.frames = []
        self.eof = False

    def next(self, timeout=60.0):
        """The next frame, or None at EOF / timeout."""
        end = time.monotonic() + timeout
        while not self.frames and not self.eof:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, fds = wire.recv(self.sock)
            except socket.timeout:
                return None
            except OSError:
                self.eof = True
                break
            wire.close_fds(fds)
            if not data:
                self.eof = True
            self.frames += self.parser.feed(data)
            if time.monotonic() > end:
                break
        return self.frames.pop(0) if self.frames else None

    def reply(self, timeout=60.0):
        """(tag, index, (status, flags, ...), data) of the next REPLY (STATUS frames skipped), or None."""
        while True:
            f = self.next(timeout)
            if f is None:
                return None
            if f[0] == wire.REPLY:
                return wire.parse_data(f[1])


def impersonate(out: dict) -> None:
    """Take another partition's name: on this process's own link, and on any socket in the run directory."""
    as_name = os.environ["ATTACK_AS"]
    sock, _name = link()
    sock.sendall(wire.json_frame(wire.HELLO, {"name": as_name}))
    f = Peer(sock).next(timeout=10)
    out["own_link_welcome"] = bool(f and f[0] == wire.WELCOME)
    out["sockets_welcomed"] = []
    rundir = os.environ["ATTACK_RUNDIR"]
    for entry in os.scandir(rundir):
        if not stat.S_ISSOCK(entry.stat().st_mode):
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(entry.path)
            s.sendall(wire.json_frame(wire.HELLO, {"name": as_name}))
            f = Peer(s).next(timeout=5)
            if f and f[0] == wire.WELCOME:
                out["sockets_welcomed"].append(entry.name)
        except (OSError, wire.WireError):
            pass
        finally:
            s.close()


def hello(out: dict) -> None:
    """Say hello as this partition once the impersonator is done; is it welcomed?"""
    done = os.environ["ATTACK_AFTER"]
    end = time.monotonic() + 30
    while not os.path.exists(done) and time.monotonic() < end:
        time.sleep(0.05)
    sock, name = link()
    sock.sendall(wire.json_frame(wire.HELLO, {"name": name}))
    f = Peer(sock).next(timeout=10)
    out["welcome"] = bool(f and f[0] == wire.WELCOME)


def main() -> None:
    out = {}
    mode = os.environ.get("ATTACK_MODE", "client")
    if mode != "client":
        impersonate(out) if mode == "impersonate" else hello(out)
        tmp = os.environ["ATTACK_OUT"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, os.environ["ATTACK_OUT"])
        return
    sock, name = link()
    sock.sendall(wire.json_frame(wire.HELLO, {"name": name}))
    peer = Peer(sock)
    f = peer.next()
    out["welcome"] = wire.parse_json(f[1]) if f and f[0] == wire.WELCOME else None
    wait_for = os.environ.get("ATTACK_WAIT_FOR")             # start while the trusted client works
    if wait_for:
        path, _s, text = wait_for.partition("|")
        end = time.monotonic() + 120
        while time.monotonic() < end and not (os.path.exists(path) and text in open(path).read()):
            time.sleep(0.05)

    def ask(tag, blk, data=b""):
        sock.sendall(wire.data_frame(wire.REQUEST, tag, 0, blk, data))
        r = peer.reply()
        return None if r is None else {"status": r[2][0], "flags": r[2][1], "data": r[3].hex()}

    # its policy: no writes (an honest VMM answers the guest E_READ_ONLY, flag READ_ONLY)
    out["write"] = ask(1, (WRITE, V1_0, 5, 1, 0), b"X" * 512)
    out["read"] = ask(2, (READ, V1_0, 5, 1, 0))
    # over its size limit (16 sectors): E_LIMIT
    out["big"] = ask(3, (READ, V1_0, 0, 17, 0))
    # a version its policy does not allow
    out["version"] = ask(4, (READ, V1_1, 0, 1, 0))
    # remapping its own memory into the service partition: not for it (declined: the guest's copy path)
    fd = os.memfd_create("attacker", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    os.pwrite(fd, b"M" * 8192, 0)
    body = wire.TAG.pack(5, 0) + wire.BLK.pack(READ, V1_0, 0, 8, abi.PYKVM_PROVIDER_REQ_REMAPPED) + \
        remap.pack(0, [(0, 0, 1)])
    wire.send(sock, wire.frame(wire.REMAP, body, 1), [fd])
    r = peer.reply()
    out["remap"] = None if r is None else {"status": r[2][0], "index": r[1]}
    out["remap_memfd_untouched"] = os.pread(fd, 8192, 0) == b"M" * 8192
    # a flood: 500 one-sector reads at once (its policy: 16 outstanding, 200/s)
    flood = b"".join(wire.data_frame(wire.REQUEST, 1000 + i, 0, (READ, V1_0, i, 1, 0)) for i in range(500))
    try:
        sock.sendall(flood)
    except OSError:
        pass
    statuses = []
    while True:
        r = peer.reply(timeout=30)
        if r is None:
            break
        statuses.append(r[2][0])
    out["flood"] = {"ok": statuses.count(abi.PYKVM_BUS_OK), "limit": statuses.count(abi.PYKVM_BUS_E_LIMIT),
                    "other": len(statuses) - statuses.count(abi.PYKVM_BUS_OK) - statuses.count(abi.PYKVM_BUS_E_LIMIT),
                    "eof": peer.eof}
    with open(os.environ["ATTACK_OUT"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
