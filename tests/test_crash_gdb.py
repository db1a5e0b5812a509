"""Real gdb opens pykvm cores with the guest's own symbols (identity-mapped and higher-half kernels)."""

from __future__ import annotations

import re
import subprocess

import pytest

from pykvm.crash import write_core

from .test_crash_support import build_guest, gdb_or_skip

pytestmark = pytest.mark.gdb


def _gdb(elf, core, *commands: str) -> str:
    cmd = [gdb_or_skip(), "-nx", "-batch"]
    for c in commands:
        cmd += ["-ex", c]
    res = subprocess.run(cmd + [str(elf), str(core)], capture_output=True, text=True, timeout=120)
    return res.stdout + res.stderr


@pytest.mark.parametrize("higher_half", [False, True], ids=["identity", "higher-half"])
def test_gdb_backtrace_registers_globals_threads(tmp_path, higher_half):
    snap, elf, facts = build_guest(tmp_path, higher_half=higher_half, nvcpus=2, crashing=1)
    try:
        core = write_core(snap, tmp_path / "crashes")
    finally:
        snap.memory.close()
    out = _gdb(elf, core, "info threads", "bt", "p/x $rip", "p/x some_global", "p/x $fs_base")

    # Two vCPUs -> two threads; the crashing one (LWP 2) is current.
    threads = [line for line in out.splitlines() if re.match(r"^[* ]\s+\d+\s+LWP \d+", line)]
    assert len(threads) == 2, out
    assert re.search(r"^\*\s+1\s+LWP 2\s", out, re.M), out

    # gdb prints frame #0 once when it loads the core and again in bt: key by frame number.
    frames = dict(re.findall(r"^#(\d+)\s+(?:0x[0-9a-f]+ in )?(\w+) \(", out, re.M))
    assert [frames.get(str(i)) for i in range(4)] == ["c", "b", "a", "_start"], out
    assert f"$1 = {facts['fault_rip']:#x}" in out, out
    assert "$2 = 0xdeadbeef" in out, out  # the core's value, not the ELF's initial 0x1234
    assert "$3 = 0x5000" in out, out


def test_gdb_reads_the_other_thread(tmp_path):
    snap, elf, facts = build_guest(tmp_path, higher_half=False, nvcpus=2, crashing=0)
    try:
        core = write_core(snap, tmp_path / "crashes")
    finally:
        snap.memory.close()
    out = _gdb(elf, core, "thread 2", "p/x $rip", "x/i $pc")
    assert f"$1 = {facts['hlt_rip']:#x}" in out, out
    assert "hlt" in out, out
