"""Where pykvm's source tree, build outputs and bundled guests live."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABI_HEADER = ROOT / "guests" / "include" / "pykvm_abi.h"
GUESTS_SRC = ROOT / "guests"
FIRMWARE_SRC = ROOT / "firmware"


def build_dir() -> Path:
    """Directory holding built firmware and guests (PYKVM_BUILD_DIR overrides)."""
    return Path(os.environ.get("PYKVM_BUILD_DIR", ROOT / "build"))
