"""Builds the firmware and bundled guests from source on first use, and finds them by name.

Outputs go to the cache (paths.cache_root()), one directory per build keyed by a hash
of the sources and of the toolchain's identity, so an edited guest, another checkout
or a new compiler gets its own build and a finished one is never rebuilt or mixed.
An installed package ships the firmware prebuilt: a user's own kernel needs no compiler.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from . import digest, paths
from .errors import ToolchainError, UnknownGuestError

REQUIRED_TOOLS = ("make", "gcc", "ld", "as", "objcopy", "nm", "ar")
_NOT_GUESTS = {"include", "ld", "runtime", "tools"}  # guests/ subdirectories shared by all guests
_ready: dict[str, Path] = {}


def _toolchain() -> bytes:
    """The build tools' identity without running them: resolved path, size and mtime, plus overrides."""
    import shutil  # run-time imports only on the build path: a plain `run` of a file never needs them

    parts, missing = [], []
    for tool in REQUIRED_TOOLS:
        found = shutil.which(tool)
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


def _tree_hash(h, root: Path, top: Path) -> None:
    """Feed every file under top (relative name and content, in sorted order) into h."""
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read())
            h.update(b"\0")


def _build(kind: str, tops: list[Path], make_dir: Path, what: str) -> Path:
    """Run make for make_dir into its keyed cache directory unless that build is already complete."""
    if kind in _ready:
        return _ready[kind]
    h = digest.new()
    h.update(_toolchain())
    for top in tops:
        _tree_hash(h, paths.SOURCE_ROOT, top)
    out = paths.cache_root() / f"{kind}-{h.hexdigest()[:16]}"
    done = out / ".done"
    if not done.exists():
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = open(out / ".lock", "w")
        except OSError as e:
            raise ToolchainError(f"cannot create the build directory {out}: {e.strerror} "
                                 "(set PYKVM_BUILD_DIR or XDG_CACHE_HOME to a writable directory)") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent pykvm processes build once
            if not done.exists():
                import subprocess

                print(f"pykvm: building {what} into {out} (once per source version)...", file=sys.stderr, flush=True)
                r = subprocess.run(["make", "-s", "-C", str(make_dir), f"O={out}"], capture_output=True, text=True)
                if r.returncode:
                    tail = (r.stderr or r.stdout).strip().splitlines()[-15:]
                    raise ToolchainError(f"building {make_dir.name} failed:\n" + "\n".join(tail))
                done.touch()
    _ready[kind] = out
    return out


def guest_names() -> list[str]:
    """Names of the bundled guests' source directories (what `guests --build` compiles)."""
    return sorted(p.name for p in paths.GUESTS_SRC.iterdir() if p.is_dir() and p.name not in _NOT_GUESTS)


def firmware_path() -> Path:
    """The exception-stub firmware ELF: shipped prebuilt when installed, else built from source."""
    shipped = paths.PREBUILT / "firmware" / "stubs.elf"
    if shipped.is_file():
        return shipped
    g = paths.GUESTS_SRC
    out = _build("firmware", [paths.FIRMWARE_SRC, g / "include", g / "tools"], paths.FIRMWARE_SRC,
                 "the exception-stub firmware")
    return out / "firmware" / "stubs.elf"


def guests_dir() -> Path:
    """Directory of the built bundled guests (building them first if needed)."""
    n = len(guest_names())
    return _build("guests", [paths.GUESTS_SRC], paths.GUESTS_SRC, f"{n} bundled guests") / "guests"


def bundled_guests() -> dict[str, Path]:
    """Name -> path of every built bundled guest."""
    found = {}
    for p in sorted(guests_dir().glob("*")):
        if p.suffix in (".elf", ".bin") and p.is_file():
            found.setdefault(p.stem, p)
    return found


def resolve_kernel(spec: str) -> Path:
    """A path to a kernel file, or the name of a bundled guest."""
    p = Path(spec)
    if p.exists() or os.sep in spec or spec.endswith((".elf", ".bin")):
        return p
    guests = bundled_guests()
    if spec in guests:
        return guests[spec]
    raise UnknownGuestError(f"no file or bundled guest named {spec!r}; bundled guests: {', '.join(guests) or 'none'}")
