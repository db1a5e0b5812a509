"""Running the real `pykvm` command from tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pykvm(*args: str, timeout: float = 60, env: dict | None = None, stdin=subprocess.DEVNULL):
    """Run `python -m pykvm ARGS`; returns the CompletedProcess (bytes stdout/stderr)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "pykvm", *args], cwd=ROOT, capture_output=True,
                          timeout=timeout, env=full_env, stdin=stdin)


# Devices beyond the default set that bundled guests drive (pykvm run --device NAME)
MAILBOX_DEVICES = [("mailbox", {}), ("power-control", {})]
WINDOW_POLL_DEVICES = [("identity", {}), ("post-code", {})]
MAILBOX_ARGS = ("--device", "mailbox", "--device", "power-control")
WINDOW_POLL_ARGS = ("--device", "identity", "--device", "post-code")


def guest(name: str) -> Path:
    """Path of a built bundled guest (builds them on first use)."""
    from pykvm.artifacts import bundled_guests

    return bundled_guests()[name]
