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


def pykvm_up(tmp_path: Path, topology: str, timeout: float = 300):
    """`pykvm up` of a topology text in tmp_path, asserted to succeed: (run dir, stdout, stderr, logs by file name)."""
    topo = tmp_path / "topo.toml"
    topo.write_text(topology)
    run = tmp_path / "run"
    r = pykvm("up", str(topo), "--dir", str(run), timeout=timeout)
    out, err = r.stdout.decode(), r.stderr.decode()
    logs = {f.name: f.read_text() for f in run.glob("*.log")}
    serials = {f.name: f.read_text() for f in run.glob("*.serial")}
    assert r.returncode == 0, (out, err, logs, serials)
    return run, out, err, logs


# Devices beyond the default set that bundled guests drive (pykvm run --device NAME)
MAILBOX_DEVICES = [("mailbox", {}), ("power-control", {})]
WINDOW_POLL_DEVICES = [("identity", {}), ("post-code", {})]
MAILBOX_ARGS = ("--device", "mailbox", "--device", "power-control")
WINDOW_POLL_ARGS = ("--device", "identity", "--device", "post-code")


def guest(name: str) -> Path:
    """Path of a built bundled guest (builds them on first use)."""
    from pykvm.startup.artifacts import bundled_guests

    return Path(bundled_guests()[name])
