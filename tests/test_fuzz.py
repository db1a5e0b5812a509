"""`pykvm fuzz` on the bundled fuzz-target guest: the reproducer path, hostile inputs, and AFL++.

The reproducer (`--input FILE`) must end with the run's status (0 done, 16 crash, 18 hang), and
a crash must leave a core with the input beside it, named in the core (pykvm inspect shows it).
Hostile inputs (fuzz-target's "hostile" records: stores into page tables, IDT and GDT, port
writes to devices, lidt, endless loops) must reset to exactly the snapshot. AFL++ must find a
planted bug through the forkserver, and two instances (-M/-S) must share one sync directory.
Tests needing afl-fuzz skip where it is missing (fail in CI, which installs Debian's afl++).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require_tool
from .helpers import ROOT, pykvm
from .test_reset import state_hash

pytestmark = pytest.mark.kvm

BUG_CHAIN = b"C\x06PYKVM!"                       # the comparison chain: page fault at NULL
BUG_LENGTH = b"R\x03\x40" + b"A" * 64            # a record overflowing slot 3 into the handlers: #GP
BENIGN = b"NC\x03abcR\x01\x04abcd"


def _fuzz(tmp_path: Path, data: bytes, *extra: str, timeout: float = 120):
    inp = tmp_path / "input.bin"
    inp.write_bytes(data)
    crashes = tmp_path / "crashes"
    r = pykvm("fuzz", "fuzz-target", "--input", str(inp), "--mem", "64M", "--crash-dir", str(crashes), *extra,
              timeout=timeout)
    return r, crashes


def test_reproducer_benign_input_runs_to_completion(tmp_path):
    r, crashes = _fuzz(tmp_path, BENIGN)
    assert r.returncode == 0, r.stderr
    assert b"input ran to completion" in r.stderr
    assert not list(crashes.glob("*.core"))


@pytest.mark.parametrize("data, vector", [(BUG_CHAIN, 14), (BUG_LENGTH, 13)], ids=["chain", "length"])
def test_reproducer_crash_leaves_core_with_input(tmp_path, data, vector):
    r, crashes = _fuzz(tmp_path, data)
    assert r.returncode == 16, r.stderr
    cores = list(crashes.glob("*.core"))
    assert len(cores) == 1
    beside = Path(str(cores[0]) + ".input")
    assert beside.read_bytes() == data
    assert str(cores[0]).encode() in r.stderr
    rep = pykvm("inspect", "--json", str(cores[0]))
    report = json.loads(rep.stdout)
    assert report["vector"] == vector
    note = report["config"]["fuzz_input"]
    assert note == {"suffix": ".input", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    text = pykvm("inspect", str(cores[0])).stdout.decode()
    assert f"fuzz input:    {cores[0]}.input" in text
    again = pykvm("fuzz", "fuzz-target", "--input", str(beside), "--mem", "64M", "--no-dump", timeout=120)
    assert again.returncode == 16                                       # the one-line reproducer


def test_reproducer_hang_is_status_18_with_core(tmp_path):
    r, crashes = _fuzz(tmp_path, b"NL", "--cmdline", "hostile", "--timeout", "2")
    assert r.returncode == 18, r.stderr
    cores = list(crashes.glob("*.core"))
    assert len(cores) == 1 and Path(str(cores[0]) + ".input").read_bytes() == b"NL"


def test_not_under_afl_without_input_is_a_usage_error():
    r = pykvm("fuzz", "fuzz-target", timeout=60)
    assert r.returncode == 2
    assert b"not started by afl-fuzz" in r.stderr


def test_guest_without_snapshot_call_is_refused(tmp_path):
    inp = tmp_path / "x"
    inp.write_bytes(b"x")
    r = pykvm("fuzz", "hello", "--input", str(inp), "--boot-timeout", "20", timeout=120)
    assert r.returncode == 2
    assert b"the guest ended before its snapshot point: guest exited: power-off" in r.stderr, r.stderr


def _hostile_input(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice("WWOIRC")
        if kind == "W":        # page tables, IDT, GDT, boot stack, the input buffer, anywhere low
            addr = rng.choice([0x20000, 0x21000, 0x11000, 0x10000, 0x1f000, 0x13000, rng.randrange(0, 0x400000)])
            out += b"W" + struct.pack("<QQ", addr + rng.randrange(0, 4096, 8), rng.getrandbits(64))
        elif kind == "O":      # serial, PIC/PIT ports, debug-exit, the fuzz port itself, DMA
            port = rng.choice([0x3f8, 0x3f9, 0x3fb, 0x3ff, 0x5d0, 0x5d4, 0x5d8, 0x5dc, 0x6c0, 0x20, 0x40, 0x80])
            out += b"O" + struct.pack("<HB", port + rng.randrange(0, 4), rng.getrandbits(8))
        elif kind == "I":
            out += b"I" + struct.pack("<HQ", rng.getrandbits(16), rng.getrandbits(64))
        elif kind == "R":
            out += b"R" + bytes([rng.getrandbits(8), 8]) + rng.randbytes(8)
        else:
            out += b"C\x06" + rng.randbytes(6)
    return out


def test_hostile_inputs_reset_to_the_exact_snapshot(tmp_path):
    """Inputs that scribble page tables, the IDT and devices, or hang: after each, the reset VM
    hashes (all RAM, every register, every device) exactly as at the snapshot."""
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget
    from pykvm.snapshot.reset import restore

    cov = CoverageMap()
    target = FuzzTarget("fuzz-target", cov, mem="64M", cmdline="hostile", crash_dir=str(tmp_path))
    try:
        m = target.machine
        want = target._on_machine(lambda: state_hash(target.vm))
        rng = random.Random(21)
        kinds = set()
        for i in range(40):
            data = b"NL" if i % 13 == 12 else _hostile_input(rng)
            result = target.run(data, timeout=3)
            kinds.add(result.kind)
            target.settle()
            got = target._on_machine(lambda: (restore(m, target.snap), state_hash(target.vm))[1])
            assert got == want, (i, data.hex(), [k for k in want if want[k] != got[k]])
        assert {"crash", "hang"} <= kinds
        assert target.run(BENIGN, timeout=10).kind == "ok"     # still fuzzable afterwards
    finally:
        target.close()
        cov.close()


# ---------------------------------------------------------------- AFL++
def _afl_env() -> dict:
    env = dict(os.environ)
    env.update(AFL_SKIP_BIN_CHECK="1", AFL_FORKSRV_INIT_TMOUT="120000", AFL_NO_UI="1", AFL_SKIP_CPUFREQ="1",
               AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1", AFL_NO_AFFINITY="1", PYTHONPATH=str(ROOT))
    return env


def _afl_cmd(afl: str, seeds: Path, out: Path, seconds: int, crash_dir: Path, *role: str) -> list:
    return [afl, "-i", str(seeds), "-o", str(out), "-V", str(seconds), "-t", "5000", *role, "--",
            sys.executable, "-m", "pykvm", "fuzz", "fuzz-target", "--mem", "64M", "--crash-dir", str(crash_dir)]


def _stats(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def test_afl_finds_the_length_bug(tmp_path):
    afl = require_tool("afl-fuzz")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a").write_bytes(b"R\x01\x04abcd")
    out, crash_dir = tmp_path / "out", tmp_path / "crashes"
    r = subprocess.run(_afl_cmd(afl, seeds, out, 90, crash_dir), env=_afl_env(), capture_output=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    stats = _stats(out / "default" / "fuzzer_stats")
    assert int(stats["execs_done"]) > 100
    found = sorted((out / "default" / "crashes").glob("id:*"))
    assert found, f"no crash in {stats['execs_done']} execs"
    cores = list(crash_dir.glob("*.core"))
    assert cores and all(Path(str(c) + ".input").exists() for c in cores)
    rep = pykvm("fuzz", "fuzz-target", "--input", str(found[0]), "--mem", "64M", "--no-dump", timeout=120)
    assert rep.returncode == 16, rep.stderr


def test_two_afl_instances_share_a_sync_dir(tmp_path):
    afl = require_tool("afl-fuzz")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "a").write_bytes(BENIGN)
    sync, crash_dir = tmp_path / "sync", tmp_path / "crashes"
    env = _afl_env()
    procs = [subprocess.Popen(_afl_cmd(afl, seeds, sync, 45, crash_dir, *role), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for role in (("-M", "main"), ("-S", "second"))]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    for name in ("main", "second"):
        stats = _stats(sync / name / "fuzzer_stats")
        assert int(stats["execs_done"]) > 50, (name, stats)
        assert (sync / name / "queue").is_dir()


def _showmap(showmap: str, tmp_path: Path, out: Path, *args: str, stdin=None):
    cmd = [showmap, "-q", "-o", str(out), "-t", "60000", *args, "--", sys.executable, "-m", "pykvm", "fuzz",
           "fuzz-target", "--mem", "64M", "--crash-dir", str(tmp_path / "crashes")]
    return subprocess.run(cmd, env=_afl_env(), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300)


def _tuples(path: Path) -> dict:
    return dict(line.split(":") for line in path.read_text().split())


def test_afl_showmap_on_one_file_runs_that_input_without_a_forkserver(tmp_path):
    """afl-showmap on one file execs the target with the input on stdin and no forkserver: pykvm
    runs that input once, its coverage as afl-showmap sees it through the forkserver, and a crash
    ends the process by the signal a native crash would (afl-showmap's status 2)."""
    showmap = require_tool("afl-showmap")
    ins = tmp_path / "in"
    ins.mkdir()
    (ins / "benign").write_bytes(BENIGN)
    r = _showmap(showmap, tmp_path, tmp_path / "maps", "-i", str(ins))         # the forkserver's view
    assert r.returncode == 0, r.stdout[-3000:]
    want = _tuples(tmp_path / "maps" / "benign")
    assert len(want) > 10
    with open(ins / "benign", "rb") as f:
        r = _showmap(showmap, tmp_path, tmp_path / "file.map", stdin=f)
    assert r.returncode == 0, r.stdout[-3000:]
    assert _tuples(tmp_path / "file.map") == want
    feed = subprocess.Popen(["cat", str(ins / "benign")], stdout=subprocess.PIPE)     # stdin a pipe: no pread
    r = _showmap(showmap, tmp_path, tmp_path / "pipe.map", stdin=feed.stdout)
    feed.wait()
    assert r.returncode == 0 and _tuples(tmp_path / "pipe.map") == want, r.stdout[-3000:]
    (tmp_path / "empty").write_bytes(b"")
    with open(tmp_path / "empty", "rb") as f:
        _showmap(showmap, tmp_path, tmp_path / "empty.map", stdin=f)
    assert len(_tuples(tmp_path / "empty.map")) < len(want)               # an input, not the boot, is measured
    (tmp_path / "bug").write_bytes(BUG_CHAIN)
    with open(tmp_path / "bug", "rb") as f:
        r = _showmap(showmap, tmp_path, tmp_path / "bug.map", stdin=f)
    assert r.returncode == 2, r.stdout[-3000:]                             # "the target crashed"
    assert list((tmp_path / "crashes").glob("*.core"))


# ---------------------------------------------------------------- the fast reset between inputs
def _phys_u64(m, gpa: int) -> int:
    r = m.memory.region_of(gpa, 8)
    return struct.unpack_from("<Q", r.view, gpa - r.gpa)[0]      # not GuestMemory.view: no host write logged


def _leaf(m, cr3: int, vaddr: int) -> tuple[int, int]:
    """(guest-physical address of the entry that maps vaddr, bytes it maps) in 4-level paging."""
    table, shift = cr3 & 0x000F_FFFF_FFFF_F000, 39
    while True:
        at = table + 8 * ((vaddr >> shift) & 0x1FF)
        e = _phys_u64(m, at)
        assert e & 1, f"{vaddr:#x} is not mapped"
        if shift == 12 or e & 0x80:
            return at, 1 << shift
        table, shift = e & 0x000F_FFFF_FFFF_F000, shift - 9


def _store(addr: int, value: int) -> bytes:
    return b"W" + struct.pack("<QQ", addr, value)


def test_a_page_table_written_in_a_run_is_not_seen_by_the_next():
    """A run remaps a virtual page and uses it (its TLB holds the new translation); the reset puts
    the old entry back, and the next run's store must go through the old one: the reset flushed.
    Runs that write no page table need no flush (the reset leaves the TLB alone)."""
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget

    cov = CoverageMap()
    target = FuzzTarget("fuzz-target", cov, mem=128 << 20, cmdline="hostile")
    try:
        m = target.machine
        st = target.snap.vcpus[0]
        assert st["tables"] is not None, "the snapshot's paging structures were not tracked"
        v = 0x4000000
        entry, size = _leaf(m, st["sregs"].cr3, v)
        other_entry, _ = _leaf(m, st["sregs"].cr3, v + size)
        x, y = v, v + size                              # identity-mapped frames of v and of the next page
        remap = _phys_u64(m, other_entry)
        for _ in range(3):
            assert target.run(b"N", timeout=10).kind == "ok"
        flushes = st["flushes"]
        for _ in range(5):
            assert target.run(b"N", timeout=10).kind == "ok"
        assert st["flushes"] == flushes, "benign runs flushed the TLB"
        for _ in range(3):
            assert target.run(_store(entry, remap) + _store(v, 0x1111), timeout=10).kind == "ok"
            assert _phys_u64(m, y) == 0x1111 and _phys_u64(m, x) != 0x1111    # the run saw its new mapping
            assert target.run(_store(v, 0x2222), timeout=10).kind == "ok"
            assert _phys_u64(m, x) == 0x2222, "the store went through a translation the reset undid"
            assert _phys_u64(m, y) != 0x2222
        assert st["flushes"] > flushes
    finally:
        target.close()
        cov.close()


def test_staged_registers_are_what_kvm_runs_with():
    """After a reset the registers wait in kvm_run's sync area: the next KVM_RUN (here one that enters
    no guest code) must load exactly the snapshot's, as the ioctls a reader triggers would, after runs
    that changed MSRs, the task priority, page tables, the IDT and devices."""
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget
    from pykvm.snapshot.reset import restore

    cov = CoverageMap()
    target = FuzzTarget("fuzz-target", cov, mem="64M", cmdline="hostile")
    try:
        m = target.machine
        v = m.vcpus[0]
        if not v.sync_fields:
            pytest.skip("this KVM has no kvm_run sync area (KVM_CAP_SYNC_REGS)")
        target.settle()
        want = target._on_machine(lambda: (restore(m, target.snap), state_hash(target.vm))[1])
        rng = random.Random(7)
        for i in range(6):
            # MSRs (the kernel GS base, SYSENTER stack, PAT) and the LAPIC's TPR change too
            msrs = b"".join(b"M" + struct.pack("<IQ", msr, rng.getrandbits(32) << 4)
                            for msr in (0xC0000102, 0x175)) + b"M" + struct.pack("<IQ", 0x277, 0x0007040600070406)
            # (a timeout loose enough for a loaded host: the MSR records must have run before it)
            target.run(msrs + b"T" + bytes([i + 1]) + _hostile_input(rng) + b"N", timeout=10)
            target.settle()

            def reset_then_enter():
                before = state_hash(target.vm)
                assert before["vcpu0 msrs"] != want["vcpu0 msrs"] and before["vcpu0 get_lapic"] != want["vcpu0 get_lapic"]
                restore(m, target.snap, ran=True)    # as the inline reset: the vCPU last ran guest code
                assert v.run_ptr.kvm_dirty_regs, "nothing was staged"
                v.immediate_exit = 1
                v.run()                      # KVM loads the sync area, then returns without entering
                v.immediate_exit = 0
                assert not v.run_ptr.kvm_dirty_regs
                return state_hash(target.vm)
            got = target._on_machine(reset_then_enter)
            assert got == want, [k for k in want if want[k] != got[k]]
    finally:
        target.close()
        cov.close()


def test_inline_resets_between_done_runs_and_the_slow_path_after_crashes(tmp_path):
    """A run that says "done" is reset on the vCPU thread; a crash or a hang takes the parked path (a
    core), and the next "done" run is inline again; the guest sees every input from the snapshot."""
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget

    cov = CoverageMap()
    target = FuzzTarget("fuzz-target", cov, mem="64M", cmdline="hostile", crash_dir=str(tmp_path))
    try:
        kinds = []
        for data in (BENIGN, BENIGN, BUG_CHAIN, BENIGN, b"L", BENIGN, BENIGN, BUG_LENGTH, BENIGN):
            kinds.append(target.run(data, timeout=3).kind)
        assert kinds == ["ok", "ok", "crash", "ok", "hang", "ok", "ok", "crash", "ok"]
        assert target.inline_resets >= 3
        assert len(list(tmp_path.glob("*.core"))) >= 2
    finally:
        target.close()
        cov.close()


def test_pages_written_run_after_run_stay_writable_until_inputs_change(monkeypatch):
    """Under manual dirty-log protection a page written in two runs running is left writable and
    restored every reset; once inputs stop writing it, it is protected again at the next relearn."""
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget
    from pykvm.snapshot import reset

    monkeypatch.setattr(reset, "HOT_RELEARN", 16)
    cov = CoverageMap()
    target = FuzzTarget("fuzz-target", cov, mem=128 << 20, cmdline="hostile")
    try:
        tracker = target.snap.tracker
        if not tracker.manual:
            pytest.skip("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        slot = tracker.slots[0]
        scratch = {0x4000000 // 4096 + i for i in range(8)}
        stores = b"".join(_store(0x4000000 + i * 4096, i + 1) for i in range(8))
        for _ in range(4):
            assert target.run(stores, timeout=10).kind == "ok"
        assert scratch <= slot.hot
        assert target.last_reset_pages >= 8
        for _ in range(40):
            assert target.run(b"N", timeout=10).kind == "ok"
        assert not scratch & slot.hot
        assert target.last_reset_pages < 8
        m = target.machine
        for i in range(8):                          # the stores never show after their runs' resets
            assert _phys_u64(m, 0x4000000 + i * 4096) == 0
    finally:
        target.close()
        cov.close()
