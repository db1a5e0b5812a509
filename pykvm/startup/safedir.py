"""Directories pykvm writes and later reads back, made and checked so that no other user can write them.

The cache holds the firmware and guests pykvm builds, which it later boots. A directory
another user can write (a shared PYKVM_BUILD_DIR of mode 1777, a group-writable cache, one
owned by someone else, or one inside such a directory, which can be renamed away and
replaced) would let that user choose what runs. So, as ssh does with ~/.ssh: the directory
must be owned by this user and writable by no one else; every directory above it must be
owned by this user or root and writable by no one else, unless it is sticky (like /tmp:
others may add entries there, but not rename or remove ours). Anything else is refused
with UnsafeCacheError, which names the directory and what is wrong; pykvm never loosens or
"repairs" a directory it did not create. Directories pykvm creates are made 0700.

The checks follow the resolved path, and callers use the resolved path from then on, so a
symbolic link cannot be swapped between the check and the use.
"""

from __future__ import annotations

import os
import stat

from ..errors import UnsafeCacheError

_checked: dict[str, str] = {}


def _problem(path: str, st: os.stat_result, owners: tuple[int, ...], sticky_ok: bool) -> str | None:
    """Why a directory with this status is not safe, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid not in owners:
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        who = "group and others" if st.st_mode & 0o022 == 0o022 else "group" if st.st_mode & 0o020 else "others"
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _refuse(path: str, why: str, what: str) -> UnsafeCacheError:
    fix = ("make it yours and chmod go-w, or set PYKVM_BUILD_DIR to a directory of your own"
           if what == "cache directory" else "chmod go-w, or remove it: pykvm makes it again")
    return UnsafeCacheError(f"refusing the {what} {path}: it {why}; pykvm reads back nothing from a directory "
                            f"another user can write ({fix})")


def missing_ancestors(path: str) -> list[str]:
    """path and each of its parents that does not exist yet, deepest first."""
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return missing


def _make(path: str) -> None:
    """Create path and any missing parents, each 0700 (os.makedirs gives new parents the umask's mode)."""
    for p in reversed(missing_ancestors(path)):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass   # a concurrent pykvm made it; checked below like any existing directory


def ensure(path: str, what: str = "cache directory", owners: tuple[int, ...] = (), optional: bool = False):
    """The resolved path of directory `path`, created 0700 if missing, after checking no other user can write it or above it.

    The directory must be owned by this user (or by one of `owners`). optional: None, not an
    error, when the directory cannot be created (an unsafe one is refused all the same).
    """
    done = _checked.get(path)
    if done is not None:
        return done
    try:
        _make(path)
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError as e:
        if optional:
            return None
        raise UnsafeCacheError(f"cannot create the {what} {path}: {e.strerror} (set PYKVM_BUILD_DIR or "
                               "XDG_CACHE_HOME to a directory of your own)") from None
    uid = os.geteuid()
    why = _problem(real, st, (uid, *owners), sticky_ok=False)
    if why:
        raise _refuse(real, why, what)
    above = os.path.dirname(real)
    while True:
        st = os.stat(above)
        why = _problem(above, st, (uid, 0), sticky_ok=True)
        if why:
            raise _refuse(real, f"lies in {above}, which {why}", what)
        parent = os.path.dirname(above)
        if parent == above:
            break
        above = parent
    _checked[path] = real
    return real


def subdir(root: str, name: str, what: str = "cache directory") -> str:
    """root/name (root already ensure()d), created 0700 if missing; refused unless it is a directory of ours that no one else can write."""
    path = os.path.join(root, name)
    done = _checked.get(path)
    if done is not None:
        return done
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UnsafeCacheError(f"cannot create the {what} {path}: {e.strerror}") from None
    st = os.lstat(path)   # not followed: a link here would lead out of the checked directory
    why = "is a symbolic link" if stat.S_ISLNK(st.st_mode) else _problem(path, st, (os.geteuid(),), sticky_ok=False)
    if why:
        raise _refuse(path, why, what)
    _checked[path] = path
    return path
