"""Builds the firmware and bundled guests from source on first use, and finds them by name.

Outputs go to the cache (paths.cache_root()), one directory per build keyed by a hash
of the sources and of the toolchain's identity, so an edited guest, another checkout
or a new compiler gets its own build and a finished one is never rebuilt or mixed.
The cache and each build directory are checked first (startup/safedir.py): what pykvm
boots is never read from a directory another user can write.
An installed package ships the firmware prebuilt: a user's own kernel needs no compiler.
"""

from __future__ import annotations

import fcntl
import os
import sys

from .. import paths
from . import digest, safedir
from ..errors import ToolchainError, UnknownGuestError

REQUIRED_TOOLS = ("make", "gcc", "ld", "as", "objcopy", "nm", "ar")
_NOT_GUESTS = {"include", "ld", "runtime", "tools"}  # guests/ subdirectories shared by all guests
_ready: dict[str, str] = {}


def _which(tool: str) -> str | None:
    """shutil.which(tool) for a bare name: importing shutil (with fnmatch and re) costs a source-tree run ~3 ms."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        p = os.path.join(d or os.curdir, tool)
        if os.access(p, os.F_OK | os.X_OK) and not os.path.isdir(p):
            return p
    return None


def _toolchain() -> bytes:
    """The build tools' identity without running them: resolved path, size and mtime, plus overrides."""
    parts, missing = [], []
    for tool in REQUIRED_TOOLS:
        found = _which(tool)
        if found is None:
            missing.append(tool)
            continue
        real = os.path.realpath(found)
        st = os.stat(real)
        parts.append(f"{tool}={real}:{st.st_size}:{st.st_mtime_ns}")
    if missing:
        raise ToolchainError(f"building pykvm's firmware and guests needs {', '.join(missing)}: "
                             "install gcc, binutils and make (Debian/Ubuntu: apt-get install build-essential)")
    parts += [f"{v}={os.environ[v]}" for v in ("CC", "LD", "AR", "OBJCOPY", "NM") if v in os.environ]
    return "\n".join(parts).encode()


def _tree_hash(h, root: str, top: str) -> None:
    """Feed every file under top (relative name and content, in sorted order) into h."""
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read())
            h.update(b"\0")


def _build(kind: str, tops: list[str], make_dir: str, what: str) -> str:
    """Run make for make_dir into its keyed cache directory unless that build is already complete."""
    if kind in _ready:
        return _ready[kind]
    h = digest.new()
    h.update(_toolchain())
    for top in tops:
        _tree_hash(h, paths.SOURCE_ROOT, top)
    out = safedir.subdir(safedir.ensure(paths.cache_root()), f"{kind}-{h.hexdigest()[:16]}")
    done = os.path.join(out, ".done")
    if not os.path.exists(done):
        try:
            lock = open(os.path.join(out, ".lock"), "w")
        except OSError as e:
            raise ToolchainError(f"cannot create the build directory {out}: {e.strerror} "
                                 "(set PYKVM_BUILD_DIR or XDG_CACHE_HOME to a writable directory)") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent pykvm processes build once
            if not os.path.exists(done):
                import subprocess

                print(f"pykvm: building {what} into {out} (once per source version)...", file=sys.stderr, flush=True)
                r = subprocess.run(["make", "-s", "-C", make_dir, f"O={out}"], capture_output=True, text=True)
                if r.returncode:
                    tail = (r.stderr or r.stdout).strip().splitlines()[-15:]
                    raise ToolchainError(f"building {os.path.basename(make_dir)} failed:\n" + "\n".join(tail))
                open(done, "a").close()
    _ready[kind] = out
    return out


def guest_names() -> list[str]:
    """Names of the bundled guests' source directories (what `guests --build` compiles)."""
    g = paths.GUESTS_SRC
    return sorted(n for n in os.listdir(g) if n not in _NOT_GUESTS and os.path.isdir(os.path.join(g, n)))


def firmware_path() -> str:
    """The exception-stub firmware ELF: shipped prebuilt when installed, else built from source."""
    shipped = os.path.join(paths.PREBUILT, "firmware", "stubs.elf")
    if os.path.isfile(shipped):
        return shipped
    g = paths.GUESTS_SRC
    out = _build("firmware", [paths.FIRMWARE_SRC, os.path.join(g, "include"), os.path.join(g, "tools")],
                 paths.FIRMWARE_SRC, "the exception-stub firmware")
    return os.path.join(out, "firmware", "stubs.elf")


def guests_dir() -> str:
    """Directory of the built bundled guests (building them first if needed)."""
    n = len(guest_names())
    return os.path.join(_build("guests", [paths.GUESTS_SRC], paths.GUESTS_SRC, f"{n} bundled guests"), "guests")


def bundled_guests() -> dict[str, str]:
    """Name -> path of every built bundled guest."""
    found = {}
    d = guests_dir()
    for name in sorted(os.listdir(d)):
        stem, ext = os.path.splitext(name)
        p = os.path.join(d, name)
        if stem and ext in (".elf", ".bin") and os.path.isfile(p):
            found.setdefault(stem, p)
    return found


def resolve_kernel(spec) -> str:
    """A path to a kernel file (str or os.PathLike), or the name of a bundled guest."""
    spec = os.fspath(spec)
    p = paths.clean(spec)
    if os.path.exists(p) or os.sep in spec or spec.endswith((".elf", ".bin")):
        return p
    guests = bundled_guests()
    if spec in guests:
        return guests[spec]
    raise UnknownGuestError(f"no file or bundled guest named {spec!r}; bundled guests: {', '.join(guests) or 'none'}")
