"""Finding a running `pykvm run` by PID, and signalling it only when it proves it is a pykvm VM.

`pykvm dump PID` must never signal a process that is not a pykvm VM: SIGUSR1's default action
kills, and other programs give it other meanings. A command line proves nothing (any process
can carry `pykvm run` in its argv), so a VM that accepts dump requests says so in a way only
it can: it listens on the abstract unix socket `pykvm-vm-<its pid>` (announce()). The kernel
records who called listen(), and a connecting client reads that back (SO_PEERCRED): a process
that is not PID cannot pass for it, whatever name it binds. `pykvm dump` then checks

  - the process belongs to the caller (/proc/PID/status, and the socket's credentials);
  - the process listening on `pykvm-vm-PID` is PID itself;
  - it already catches SIGUSR1 (the VM installs the handler when it announces itself);

and signals through a pidfd opened first, so a PID recycled meanwhile is never hit (the
signal fails instead). A process of the same user that deliberately imitates all of this
opted in to receiving the request; nothing stops a same-user process from acting as a VM,
and nothing here lets a non-VM be hit by accident or by a look-alike command line.

The VM never reads from that socket: the connections `pykvm dump` left are accepted and
closed when the dump request arrives (drain()). Abstract names live in the network
namespace: run `pykvm dump` in the VM's.
"""

from __future__ import annotations

import os
import signal
import struct

NAME = "pykvm-vm-{pid}"
_CRED = struct.Struct("=iII")       # struct ucred: pid, uid, gid


class NotAVmError(Exception):
    """The PID names no process, or one that is not a pykvm VM this user may ask for a core."""


def _address(pid: int) -> str:
    return "\0" + NAME.format(pid=pid)


def announce():
    """Listen on `pykvm-vm-<pid>` (before the sandbox) so `pykvm dump` can tell this process is a VM.

    Uses _socket, not socket: `pykvm run` does not otherwise import the socket module (~3 ms).
    None when the name is taken (another process squats it): then this VM cannot be asked by
    PID, and says so.
    """
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC | _socket.SOCK_NONBLOCK)
    try:
        sock.bind(_address(os.getpid()))
        sock.listen(16)
    except OSError as e:
        sock.close()
        import sys

        print(f"pykvm: warning: `pykvm dump {os.getpid()}` will not reach this VM: cannot listen on "
              f"@{NAME.format(pid=os.getpid())}: {e.strerror}", file=sys.stderr)
        return None
    return sock


def drain(sock) -> None:
    """Close the connections `pykvm dump` left in the backlog (the main thread, at a dump request)."""
    if sock is None:
        return
    while True:
        try:
            fd, _addr = sock._accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        os.close(fd)


def _status_fields(proc) -> dict[str, str]:
    fields = {}
    for line in (proc / "status").read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def check_vm(pid: int, proc_root: str = "/proc") -> None:
    """Raise NotAVmError unless `pid` is a process of this user that catches SIGUSR1 (what /proc says)."""
    from pathlib import Path     # `pykvm dump` only: a run announces itself without it

    proc = Path(proc_root) / str(pid)
    try:
        status = _status_fields(proc)
    except FileNotFoundError:
        raise NotAVmError(f"no process {pid}") from None
    except OSError as e:
        raise NotAVmError(f"cannot look at process {pid}: {e.strerror}") from None
    try:
        real, effective = (int(x) for x in status["Uid"].split()[:2])
        caught = int(status["SigCgt"], 16)
    except (KeyError, ValueError):
        raise NotAVmError(f"cannot read the status of process {pid}") from None
    if os.getuid() not in (real, effective):
        raise NotAVmError(f"process {pid} belongs to another user; only the owner may ask it for a core")
    if not caught & (1 << (signal.SIGUSR1 - 1)):
        raise NotAVmError(f"process {pid} is not a pykvm VM running a guest (it does not take dump requests; "
                          "a VM just starting takes them in a moment)")


def prove_vm(pid: int) -> None:
    """Raise NotAVmError unless the process listening on `pykvm-vm-PID` is PID itself, of this user."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(2.0)
        try:
            sock.connect(_address(pid))
        except (ConnectionRefusedError, FileNotFoundError):
            raise NotAVmError(f"process {pid} is not a `pykvm run` or `pykvm restore` (it does not announce "
                              "itself as a VM)") from None
        except OSError as e:
            raise NotAVmError(f"cannot reach process {pid}'s VM announcement: {e.strerror or e}") from None
        peer_pid, peer_uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    finally:
        sock.close()
    if peer_pid != pid:
        raise NotAVmError(f"process {pid} is not a pykvm VM: process {peer_pid} answers in its name")
    if peer_uid != os.geteuid():
        raise NotAVmError(f"process {pid} belongs to another user; only the owner may ask it for a core")


def signal_vm(pid: int, signo: int) -> None:
    """Send `signo` to `pid` once check_vm and prove_vm pass, through a pidfd so a recycled PID is never hit."""
    if pid <= 0:
        raise NotAVmError(f"{pid} is not a process id")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotAVmError(f"no process {pid}") from None
    except OSError as e:
        raise NotAVmError(f"cannot open process {pid}: {e.strerror}") from None
    try:
        prove_vm(pid)
        check_vm(pid)
        signal.pidfd_send_signal(pidfd, signo)
    except ProcessLookupError:
        raise NotAVmError(f"process {pid} ended") from None
    except PermissionError:
        raise NotAVmError(f"not allowed to signal process {pid}") from None
    finally:
        os.close(pidfd)
