"""The crash directory: checked at start, held open for the sandbox, and new files made in it.

Split from core.py so that a run that never crashes does not import the core writer (and what
it needs: json, datetime, struct packing) just to check and hold where cores would go.
"""

from __future__ import annotations

import errno
import os

from ..paths import clean

_held: dict[str, int] = {}      # crash directory -> descriptor kept open by hold_crash_dir
# descriptor -> the crash directory relative to it ("" when it is the crash directory itself):
# a crash directory that does not exist yet is held through its nearest existing ancestor and
# created only when the first core is written, so a run that never crashes leaves nothing behind
_sub: dict[int, str] = {}
_unusable: dict[str, str] = {}  # crash directory -> why hold_crash_dir could not use it
_proc_ok: bool | None = None


class CoreWriteError(Exception):
    """The core file could not be written; nothing was left under the final name."""


def hold_crash_dir(crash_dir, create: bool = False) -> int:
    """Open `crash_dir` and keep its descriptor for every later write_core there; returns it.

    A missing crash directory is held through its nearest existing ancestor and made by the first
    core, unless `create` (the sandbox: it lets the VMM make files in the crash directory only,
    and nothing, not even a directory, anywhere else) makes it now.

    Checks that cores can be written without a path lookup (an unnamed O_TMPFILE file, named
    through /proc/self/fd), which is what the seccomp sandbox allows; CoreWriteError otherwise,
    and every later write_core there fails with the same message without touching the filesystem.
    """
    crash_dir = clean(crash_dir)
    if crash_dir in _held:
        return _held[crash_dir]
    try:
        dfd = _hold(crash_dir, create)
    except CoreWriteError as e:
        _unusable[crash_dir] = str(e)
        raise
    _held[crash_dir] = dfd
    return dfd


def _split(path: str) -> tuple[str, str]:
    """(parent, name) of a clean() path as pathlib has them: the parent of '.' or '/' is itself, with name ''."""
    head, name = os.path.split(path)
    if not name:
        return path, ""
    return head or ".", name


def _hold(crash_dir: str, create: bool) -> int:
    base, missing = crash_dir, []
    while not create and not os.path.isdir(base) and _split(base)[0] != base and not os.path.exists(base):
        base, name = _split(base)
        missing.insert(0, name)
    dfd = _open_dir(base)
    try:
        if not _proc_fd_links():
            raise CoreWriteError(f"cannot write cores in {crash_dir} without path lookups: /proc is not mounted")
        try:
            os.close(os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dfd))
        except OSError as e:
            raise CoreWriteError(_explain(e, f"cannot create an unnamed (O_TMPFILE) core file in {crash_dir}")) from e
    except BaseException:
        os.close(dfd)
        raise
    _sub[dfd] = "/".join(missing)
    return dfd


def held_parent(crash_dir) -> bool:
    """Whether the held crash directory does not exist yet (its first core creates it with mkdirat)."""
    dfd = _held.get(clean(crash_dir))
    return dfd is not None and bool(_sub.get(dfd))


def _rel(dfd: int, name: str) -> str:
    sub = _sub.get(dfd, "")
    return f"{sub}/{name}" if sub else name


def _make_sub(dfd: int, crash_dir: str) -> None:
    """Create the missing components of a crash directory held through an ancestor (mkdirat only)."""
    sub = _sub.get(dfd, "")
    path = ""
    for part in sub.split("/") if sub else ():
        path = f"{path}/{part}" if path else part
        try:
            os.mkdir(path, 0o755, dir_fd=dfd)
        except FileExistsError:
            pass
        except OSError as e:
            raise CoreWriteError(_explain(e, f"cannot create crash directory {crash_dir}")) from e


def _open_dir(crash_dir: str) -> int:
    try:
        os.makedirs(crash_dir, exist_ok=True)
        return os.open(crash_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CoreWriteError(_explain(e, f"cannot create crash directory {crash_dir}")) from e


def check_crash_dir(crash_dir) -> None:
    """Raise CoreWriteError now if a core could not be written to `crash_dir` later; creates nothing.

    An existing directory is probed with a temporary file (the only test that sees ACLs, read-only
    mounts and quotas alike); a missing one must have a writable nearest existing ancestor.
    """
    crash_dir = clean(crash_dir)
    probe = crash_dir
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise CoreWriteError(f"cannot create crash directory {crash_dir}: {probe} is a dangling symlink")
        parent = _split(probe)[0]
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise CoreWriteError(f"cannot use crash directory {crash_dir}: {probe} is not a directory")
    if probe != crash_dir:
        try:
            probe_dir = os.path.join(probe, f".pykvm-probe-{os.getpid()}-{os.urandom(8).hex()}")
            os.mkdir(probe_dir, 0o700)      # what tempfile.mkdtemp does, without importing it on every run
            os.rmdir(probe_dir)
        except OSError as e:
            raise CoreWriteError(_explain(e, f"cannot create crash directory {crash_dir} in {probe}")) from None
        return
    try:
        dfd = os.open(crash_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CoreWriteError(_explain(e, f"cannot use crash directory {crash_dir}")) from None
    try:
        fd, tmp = _create_temp(dfd, crash_dir, "probe")
        os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
    finally:
        os.close(dfd)


def _proc_fd_links() -> bool:
    """Whether an O_TMPFILE file can be given a name through /proc/self/fd (checked once, before any sandbox)."""
    global _proc_ok
    if _proc_ok is None:
        _proc_ok = os.path.isdir("/proc/self/fd")
    return _proc_ok


def _create_temp(dfd: int, crash_dir: str, prefix: str) -> tuple[int, str | None]:
    """A new file in the directory `dfd`: unnamed (O_TMPFILE: (fd, None)) where the filesystem
    allows, else exclusively created under a temporary name ((fd, name)); same filesystem, so
    publishing is a link. Created 0600: guest memory may be sensitive."""
    if _proc_fd_links():
        try:
            return os.open(_rel(dfd, "."), os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=dfd), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise CoreWriteError(_explain(e, f"cannot create a core file in {crash_dir}")) from e
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(1000):
        tmp = _rel(dfd, f".{prefix}-{os.getpid()}-{os.urandom(8).hex()}.core.tmp")
        try:
            return os.open(tmp, flags, 0o600, dir_fd=dfd), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise CoreWriteError(_explain(e, f"cannot create a core file in {crash_dir}")) from e
    raise CoreWriteError(f"cannot find a free temporary name in {crash_dir}")


def _exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink_quietly(name: str | None, dfd: int) -> None:
    if name is None:
        return  # an unnamed file disappears with its last descriptor
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _explain(e: OSError, what: str) -> str:
    """A message that says what went wrong and what to do."""
    hints = {
        errno.ENOSPC: "the disk is full: free space or point the crash directory elsewhere",
        errno.EDQUOT: "the disk quota is exhausted: free space or point the crash directory elsewhere",
        errno.EACCES: "permission denied: make the crash directory writable or choose another",
        errno.EPERM: "operation not permitted: make the crash directory writable or choose another",
        errno.EROFS: "the filesystem is read-only: choose another crash directory",
        errno.ENOTDIR: "a path component is not a directory",
    }
    hint = hints.get(e.errno, e.strerror or str(e))
    return f"{what}: {hint} ({e})"
