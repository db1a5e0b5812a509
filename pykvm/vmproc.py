"""Finding a running `pykvm run` by PID, and signalling it only when it is one of ours.

`pykvm dump PID` must never signal a process that is not a pykvm VM: SIGUSR1's default
action kills. The target must be owned by the caller, be `pykvm run`/`restore` by its
command line, and already catch SIGUSR1 (the VM installs its handler once it is built).
A pidfd pins the process across the checks, so a recycled PID cannot be hit instead.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

VM_COMMANDS = ("run", "restore")


class NotAVmError(Exception):
    """The PID names no process, or one that is not a pykvm VM this user may ask for a core."""


def _is_pykvm_command(argv: list[str]) -> bool:
    """True for `... -m pykvm run|restore ...` and `.../pykvm run|restore ...`."""
    for i, arg in enumerate(argv[:-1]):
        by_module = arg == "pykvm" and i > 0 and argv[i - 1] == "-m"
        if (by_module or os.path.basename(arg) == "pykvm") and argv[i + 1] in VM_COMMANDS:
            return True
    return False


def _status_fields(proc: Path) -> dict[str, str]:
    fields = {}
    for line in (proc / "status").read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def check_vm(pid: int, proc_root: str = "/proc") -> None:
    """Raise NotAVmError unless `pid` is a pykvm VM of this user, ready for a dump request."""
    proc = Path(proc_root) / str(pid)
    try:
        argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
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
    if not _is_pykvm_command(argv):
        raise NotAVmError(f"process {pid} is not a `pykvm run` or `pykvm restore` ({' '.join(argv[:3])[:60]!r})")
    if not caught & (1 << (signal.SIGUSR1 - 1)):
        raise NotAVmError(f"process {pid} is a pykvm that is not running a guest yet; try again in a moment")


def signal_vm(pid: int, signo: int) -> None:
    """Send `signo` to `pid` after check_vm, through a pidfd so a recycled PID is never hit."""
    if pid <= 0:
        raise NotAVmError(f"{pid} is not a process id")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NotAVmError(f"no process {pid}") from None
    except OSError as e:
        raise NotAVmError(f"cannot open process {pid}: {e.strerror}") from None
    try:
        check_vm(pid)
        signal.pidfd_send_signal(pidfd, signo)
    except ProcessLookupError:
        raise NotAVmError(f"process {pid} ended") from None
    except PermissionError:
        raise NotAVmError(f"not allowed to signal process {pid}") from None
    finally:
        os.close(pidfd)
