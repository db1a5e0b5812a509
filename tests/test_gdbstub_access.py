"""Only the user who started a VM reaches its gdb stub and control socket, and neither replaces a file.

The attacker here is another local user (a child process that drops to `nobody`), a gdb
client that never speaks (it must not hold the VM past --timeout), and a path the user
already uses for something else.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile

import pytest

from pykvm import hostsock
from pykvm.gdb import rsp

from .helpers import pykvm
from .test_gdbstub_gdb import Vmm

pytestmark = pytest.mark.kvm

NOBODY = 65534
# what the foreign user runs: pure standard library, so it needs nothing of ours
PEER = r"""
import socket, sys
kind, where = sys.argv[1], sys.argv[2]
try:
    if kind == "tcp":
        s = socket.create_connection(("127.0.0.1", int(where)), timeout=10)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(where)
except OSError as e:
    print("CONNECT-FAILED", type(e).__name__)
    sys.exit(0)
s.sendall(b"$qSupported#37")
got = b""
while True:
    try:
        chunk = s.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    got += chunk
print("GOT", got.decode("latin-1"))
"""


def as_nobody():
    os.setgid(NOBODY)
    os.setgroups([])
    os.setuid(NOBODY)


def python_for_nobody() -> str:
    """An interpreter `nobody` may run (ours may live under a private home directory)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user")
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            if subprocess.run([exe, "-S", "-c", "pass"], preexec_fn=as_nobody, cwd="/", timeout=30,
                              capture_output=True).returncode == 0:
                return exe
        except OSError:
            continue
    pytest.skip("no Python interpreter that user nobody can run")


def foreign_peer(kind: str, where) -> str:
    exe = python_for_nobody()
    r = subprocess.run([exe, "-S", "-c", PEER, kind, str(where)], preexec_fn=as_nobody,
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    return r.stdout


class Gdbd(Vmm):
    """`pykvm run GUEST --gdb SPEC --gdb-wait ARGS`."""

    def __init__(self, spec: str, *args: str, guest: str = "gdb-target"):
        super().__init__(guest, *args, gdb=spec)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        status, _out, err = super().finish(timeout)
        return status, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def read_all(conn: socket.socket) -> bytes:
    """Everything until the stub closes the connection."""
    got = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return got
        got += chunk


def owner_exchange(conn: socket.socket) -> bytes:
    conn.sendall(rsp.frame(b"qSupported:swbreak+"))
    got = b""
    while b"#" not in got.lstrip(b"+"):
        chunk = conn.recv(65536)
        assert chunk, got
        got += chunk
    return got


def test_a_foreign_uid_is_refused_on_tcp_and_the_owner_is_served():
    vmm = Gdbd("tcp::0", "--timeout", "60")
    try:
        out = foreign_peer("tcp", vmm.port)
        assert "GOT" in out
        body = out.split("GOT", 1)[1]
        assert "$E01#" in body and "qXfer" not in body            # no session: only the refusal
        hexes = re.findall(r"\$O([0-9a-f]+)#", body)
        assert hexes and "only uid 0" in bytes.fromhex(hexes[0]).decode()
        with socket.create_connection(("127.0.0.1", vmm.port), timeout=10) as conn:
            assert b"PacketSize=" in owner_exchange(conn)
    finally:
        vmm.kill()
    _status, err = vmm.finish()
    assert "refused a connection from 127.0.0.1" in err and f"uid {NOBODY}" in err


def test_unix_socket_is_0600_and_unreachable_for_another_user():
    public = tempfile.mkdtemp(prefix="pykvm-gdb-", dir="/tmp")
    os.chmod(public, 0o755)
    path = os.path.join(public, "gdb.sock")
    old = os.umask(0)           # the socket's mode must not depend on the caller's umask
    try:
        vmm = Gdbd(f"unix:{path}", "--timeout", "60")
    finally:
        os.umask(old)
    try:
        assert vmm.where == path
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert "CONNECT-FAILED PermissionError" in foreign_peer("unix", path)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(path)
            assert b"PacketSize=" in owner_exchange(conn)
    finally:
        vmm.kill()
        shutil.rmtree(public, ignore_errors=True)


def test_timeout_ends_the_vm_while_a_silent_gdb_holds_it():
    vmm = Gdbd("tcp::0", "--timeout", "3", "--no-dump")
    conn = socket.create_connection(("127.0.0.1", vmm.port), timeout=60)
    try:
        status, err = vmm.finish(timeout=60)     # before the fix: alive until the client left
        got = read_all(conn)
    finally:
        conn.close()
    assert status == 18, err
    assert b"$X0e#" in got                          # SIGALRM: gdb says "Program terminated with signal SIGALRM"
    said = [bytes.fromhex(h.decode()).decode() for h in re.findall(rb"\$O([0-9a-f]+)#", got)]
    assert any("--timeout 3s" in s for s in said), said


@pytest.mark.parametrize("option", ["--gdb", "--control"])
def test_an_existing_regular_file_is_refused_and_left_intact(tmp_path, option):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    value = f"unix:{target}" if option == "--gdb" else str(target)
    r = pykvm("run", "hello", option, value, "--timeout", "30")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "is a regular file" in err and "Traceback" not in err
    assert target.read_text() == "keep me\n"
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]    # no temporary left behind


def test_a_live_socket_is_refused_and_a_stale_one_replaced(tmp_path):
    live = tmp_path / "live.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(live))
    holder.listen(1)
    try:
        with pytest.raises(hostsock.SocketPathError, match="a socket in use"):
            hostsock.listen_unix(str(live))
    finally:
        holder.close()
    # the holder is gone: what is left is a stale socket, which is replaced
    sock, ident = hostsock.listen_unix(str(live))
    try:
        assert stat.S_IMODE(os.lstat(live).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(live))
    finally:
        sock.close()
        hostsock.remove_unix(str(live), ident)
    assert not live.exists()


def test_a_symlink_or_directory_at_the_path_is_left_alone(tmp_path):
    (tmp_path / "dir").mkdir()
    os.symlink("/etc/hostname", tmp_path / "link")
    for name, what in (("dir", "a directory"), ("link", "a symbolic link")):
        with pytest.raises(hostsock.SocketPathError, match=what):
            hostsock.listen_unix(str(tmp_path / name))
    assert (tmp_path / "dir").is_dir() and os.readlink(tmp_path / "link") == "/etc/hostname"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "link"]


def test_tcp_owner_lookup_finds_this_process(tmp_path):
    owners = hostsock.PeerOwners()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    try:
        cli = socket.create_connection(srv.getsockname())
        conn, peer = srv.accept()
        assert owners.uid(peer, conn.getsockname()) == os.geteuid()
        assert owners.uid(("127.0.0.1", 1), conn.getsockname()) is None
        cli6 = socket.socket(socket.AF_INET6)          # an IPv4 peer through a mapped IPv6 socket
        try:
            cli6.connect(("::ffff:127.0.0.1", srv.getsockname()[1]))
        except OSError:
            pytest.skip("no IPv6 here")
        conn6, peer6 = srv.accept()
        assert owners.uid(peer6, conn6.getsockname()) == os.geteuid()
        for s in (cli, conn, cli6, conn6):
            s.close()
    finally:
        srv.close()
        owners.close()


def _read_until(conn: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_timeout_ends_a_crashed_vm_that_gdb_keeps_looking_at(tmp_path):
    """A crash waits for gdb to look (SIGSEGV stop), but not past --timeout."""
    vmm = Gdbd("tcp::0", "--timeout", "5", "--crash-dir", str(tmp_path / "cores"), guest="crash-null")
    conn = socket.create_connection(("127.0.0.1", vmm.port), timeout=60)
    try:
        conn.sendall(rsp.frame(b"QStartNoAckMode"))
        _read_until(conn, b"OK")
        conn.sendall(rsp.frame(b"c"))
        stop = _read_until(conn, b"#")
        status, err = vmm.finish(timeout=60)
        rest = read_all(conn)
    finally:
        conn.close()
    assert status == 16, err
    assert b"T0b" in stop                                    # the crash, shown as SIGSEGV
    assert b"$X0b#" in rest, rest
    said = [bytes.fromhex(h.decode()).decode() for h in re.findall(rb"\$O([0-9a-f]+)#", rest)]
    assert any("--timeout 5s reached while gdb held the crashed VM" in s for s in said), said
    assert "core written to" in err
