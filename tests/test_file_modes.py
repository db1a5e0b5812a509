"""Files pykvm writes for the user are created 0600 (unless the file exists: it keeps its mode)."""

from __future__ import annotations

import os
import stat

import pytest

from pykvm.snapshot import state as S

from .helpers import pykvm
from .test_state import minimal_header


@pytest.mark.kvm
def test_serial_log_is_created_0600_and_an_existing_one_keeps_its_mode(tmp_path):
    old = os.umask(0o022)
    try:
        new = tmp_path / "serial.log"
        r = pykvm("run", "hello", "--serial", str(new), "--no-dump")
        assert r.returncode == 0, r.stderr
        assert b"Hello from pykvm" in new.read_bytes()
        assert stat.S_IMODE(new.stat().st_mode) == 0o600
        shared = tmp_path / "shared.log"
        shared.write_bytes(b"old")
        shared.chmod(0o644)                      # the user asked for this mode: kept
        r = pykvm("run", "hello", "--serial", str(shared), "--no-dump")
        assert r.returncode == 0 and b"Hello" in shared.read_bytes()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_state_file_is_0600_and_never_written_through_a_planted_name(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "vm.state"
        S.write_file(path, minimal_header(), [b"ram"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        victim = tmp_path / "victim"
        victim.write_text("intact")
        planted = tmp_path / f".again.state.tmp{os.getpid()}"
        os.symlink(victim, planted)
        with pytest.raises(FileExistsError):
            S.write_file(tmp_path / "again.state", minimal_header(), [b"ram"])
        assert victim.read_text() == "intact" and planted.is_symlink()
        assert not (tmp_path / "again.state").exists()
    finally:
        os.umask(old)
