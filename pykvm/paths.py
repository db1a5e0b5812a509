"""Where pykvm's sources, shipped artifacts and build outputs live.

Run from a source tree, the guest and firmware sources are the tree's guests/ and
firmware/. Installed from a wheel, they are package data under pykvm/_data (copied
there by setup.py, which also puts the prebuilt firmware and cffi modules in
_data/prebuilt). Build outputs never go into either: they go to the user's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
_DATA = PACKAGE / "_data"
INSTALLED = (_DATA / "guests").is_dir()
SOURCE_ROOT = _DATA if INSTALLED else PACKAGE.parent
GUESTS_SRC = SOURCE_ROOT / "guests"
FIRMWARE_SRC = SOURCE_ROOT / "firmware"
ABI_HEADER = GUESTS_SRC / "include" / "pykvm_abi.h"
PREBUILT = _DATA / "prebuilt"  # only in an installed package


def cache_root() -> Path:
    """Directory for everything pykvm generates: PYKVM_BUILD_DIR, else $XDG_CACHE_HOME/pykvm (~/.cache/pykvm)."""
    explicit = os.environ.get("PYKVM_BUILD_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "pykvm"

