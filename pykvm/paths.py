"""Where pykvm's sources, shipped artifacts and build outputs live.

Run from a source tree, the guest and firmware sources are the tree's guests/ and
firmware/. Installed from a wheel, they are package data under pykvm/_data (copied
there by setup.py, which also puts the prebuilt firmware, cffi modules and device
description data in _data/prebuilt; a source tree makes the last two in its own
build/generated: startup/generated.py). Guest and firmware builds go to the user's cache,
which startup/safedir.py checks before any use; no code is ever loaded from it.

Paths are plain strings: `pykvm run` never imports pathlib (with what it pulls in,
urllib.parse and ipaddress among them, ~4 ms of every run).
"""

from __future__ import annotations

import os

PACKAGE = os.path.dirname(os.path.realpath(__file__))
_DATA = os.path.join(PACKAGE, "_data")
INSTALLED = os.path.isdir(os.path.join(_DATA, "guests"))
SOURCE_ROOT = _DATA if INSTALLED else os.path.dirname(PACKAGE)
GUESTS_SRC = os.path.join(SOURCE_ROOT, "guests")
FIRMWARE_SRC = os.path.join(SOURCE_ROOT, "firmware")
ABI_HEADER = os.path.join(GUESTS_SRC, "include", "pykvm_abi.h")
PREBUILT = os.path.join(_DATA, "prebuilt")  # only in an installed package


def clean(path) -> str:
    """A str or os.PathLike path as str(pathlib.Path(path)) spells it: no empty or '.' components, no trailing '/'."""
    s = os.fspath(path)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    parts = [c for c in s.split("/") if c and c != "."]
    root = "//" if s.startswith("//") and not s.startswith("///") else "/" if s.startswith("/") else ""
    return root + "/".join(parts) if root or parts else "."


def cache_root() -> str:
    """Directory for everything pykvm generates: PYKVM_BUILD_DIR, else $XDG_CACHE_HOME/pykvm (~/.cache/pykvm)."""
    explicit = os.environ.get("PYKVM_BUILD_DIR")
    if explicit:
        return clean(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(clean(base), "pykvm")


_SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./_-")


def shell_word(text: str) -> str:
    """`text` as one POSIX shell word, for commands printed for people to copy (shlex.quote's rule, no import)."""
    if text and all(c in _SHELL_SAFE for c in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"
