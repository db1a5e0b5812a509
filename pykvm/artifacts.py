"""Builds the firmware and bundled guests from source on first use, and finds them by name."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from .errors import ToolchainError, UnknownGuestError
from .paths import FIRMWARE_SRC, GUESTS_SRC, build_dir

REQUIRED_TOOLS = ("make", "gcc", "ld", "as", "objcopy")
_built = False


def _newest_source_mtime() -> float:
    newest = 0.0
    for top in (FIRMWARE_SRC, GUESTS_SRC):
        for dirpath, _dirs, files in os.walk(top):
            for f in files:
                newest = max(newest, os.stat(os.path.join(dirpath, f)).st_mtime)
    return newest


def ensure_built() -> Path:
    """Run make for firmware and guests when any source is newer than the last build; return the build dir."""
    global _built
    out = build_dir()
    if _built:
        return out
    stamp = out / ".stamp"
    try:
        if stamp.stat().st_mtime >= _newest_source_mtime():
            _built = True
            return out
    except FileNotFoundError:
        pass
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise ToolchainError(f"building pykvm's firmware and guests needs {', '.join(missing)}: "
                             "install gcc, binutils and make (Debian/Ubuntu: apt-get install build-essential)")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent pykvm processes build once
        for src in (FIRMWARE_SRC, GUESTS_SRC):
            r = subprocess.run(["make", "-s", "-C", str(src), f"O={out}"], capture_output=True, text=True)
            if r.returncode:
                tail = (r.stderr or r.stdout).strip().splitlines()[-15:]
                raise ToolchainError(f"building {src.name} failed:\n" + "\n".join(tail))
        stamp.touch()
    _built = True
    return out


def firmware_path() -> Path:
    """The built exception-stub firmware ELF."""
    return ensure_built() / "firmware" / "stubs.elf"


def bundled_guests() -> dict[str, Path]:
    """Name -> path of every built bundled guest."""
    gdir = ensure_built() / "guests"
    found = {}
    for p in sorted(gdir.glob("*")):
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
