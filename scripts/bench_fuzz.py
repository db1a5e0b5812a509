#!/usr/bin/env python3
"""Snapshot fuzzing on the bundled fuzz-target guest: reset latency, inputs per second four ways,
and how long AFL++ takes to find a planted bug.

    python3 scripts/bench_fuzz.py [--afl-seconds 600] [--runs 3] [--rate-seconds 60] [--resets 200]
                                  [--per-input 10]

  reset latency   median and p99 (us) of the reset `pykvm fuzz` does between inputs on a 128 MiB guest,
                  after runs that dirtied 1, 16 and 256 pages (fuzz-target's "hostile" store records):
                  on the vCPU thread, from the guest's "done" to the next input written (completing
                  the port write, snapshot/reset.restore(), the input); the pages copied are printed
                  beside (the guest's own stack, globals and the page tables whose dirty bits the
                  stores set add a few; a written page table also costs a TLB flush)
  inputs/s  (a)   `pykvm fuzz` under afl-fuzz: fuzzer_stats execs_per_sec of one run of --rate-seconds
                  that no bug ends (the bug-finding runs below end within seconds: their rate is mostly
                  start-up, and is printed per run only for reference)
            (b)   the in-process API booting a fresh VM per input (FuzzTarget built, one run, closed)
            (c)   a `pykvm run fuzz-target` process per input (standalone: one empty input, power-off)
            (d)   a QEMU microvm process per input booting the bundled multiboot guest to its exit, the
                  floor any VM-per-input fuzzer pays (qemu cannot boot the pykvm-ELF target itself);
                  skipped when qemu-system-x86_64 is missing
  found-s         per run, seconds from the start of fuzzing (afl-fuzz's clock, the crash file's time:) to
                  its first saved crash of the comparison-chain bug (a crash input holding "PYKVM!";
                  the wall time since afl-fuzz was launched, VM boot included, is printed beside),
                  `none` when the run reached --afl-seconds without it; each run ends as soon as
                  that crash is saved. Both bugs' times are printed per run (any crash input without
                  "PYKVM!" is the length bug).

The last line: `reset-us R, execs/s E, afl/qemu X, found-s S1 S2 S3` (R: median reset at 16 dirty
pages; E: (a); X: a/d; S: seconds to the comparison-chain bug per run, or `none`).
On a nested, software-assisted KVM (this project's development host) a vCPU ioctl costs ~8-15 us (the
first after a run more), a guest exit ~8 us and every guest instruction ~0.5 us: the host-side figures
printed (CPU per exec, pages copied) are what carries over to VMX/SVM hosts.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRATCH = 0x4000000          # 64 MiB: guest RAM nothing else uses in a 128 MiB fuzz-target
SEED = b"NC\x03abcR\x01\x04abcd"


def _env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    return e


def _pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def reset_latency(resets: int) -> dict[int, float]:
    """Median reset time in us per dirty-page count, printed with p99: the reset as `pykvm fuzz` does it,
    on the vCPU thread between a run's "done" and the next input's entry (FuzzTarget.last_reset_us:
    completing the guest's port write, restore(), writing the input)."""
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget

    cov = CoverageMap()
    target = FuzzTarget("fuzz-target", cov, mem=128 << 20, cmdline="hostile")
    medians = {}
    try:
        for n in (1, 16, 256):
            data = b"".join(b"W" + struct.pack("<QQ", SCRATCH + i * 4096, i + 1) for i in range(n))
            times, copied = [], []
            for i in range(resets if n < 256 else max(20, resets // 2)):
                before = target.inline_resets
                result = target.run(data, timeout=30)
                assert result.kind == "ok", result.kind
                if i and target.inline_resets > before:       # the first run's reset undid another input
                    times.append(target.last_reset_us)
                    copied.append(target.last_reset_pages)
            medians[n] = statistics.median(times)
            print(f"  reset after {n:3d} dirty pages: median {medians[n]:8.1f} us   p99 {_pct(times, 0.99):8.1f} us"
                  f"   pages copied (median) {statistics.median(copied):.0f}")
    finally:
        target.close()
        cov.close()
    return medians


def reboot_rate(n: int) -> float:
    """(b) inputs/s booting a fresh in-process VM per input."""
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget

    cov = CoverageMap()
    t0 = time.perf_counter()
    for _ in range(n):
        target = FuzzTarget("fuzz-target", cov, mem=128 << 20)
        try:
            target.run(SEED, timeout=30)
        finally:
            target.close()
    cov.close()
    return n / (time.perf_counter() - t0)


def process_rate(cmd: list, n: int, expect: int) -> float:
    """Processes per second running cmd to its end."""
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())   # warm caches
    t0 = time.perf_counter()
    for _ in range(n):
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
        if r.returncode != expect:
            sys.exit(f"{' '.join(cmd)}: status {r.returncode}, expected {expect}: {r.stderr[-500:]!r}")
    return n / (time.perf_counter() - t0)


def _stats(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    return out


def _crash_times(crashes: Path, seen: dict, found: dict) -> None:
    """Record, per planted bug, the earliest crash file's time: (ms since afl-fuzz started) in seconds."""
    for f in crashes.glob("id:*"):
        if f.name in seen:
            continue
        try:
            data = f.read_bytes()
        except OSError:
            continue                     # still being written: read at the next look
        seen[f.name] = True
        bug = "chain" if b"PYKVM!" in data else "length"
        for part in f.name.split(","):
            if part.startswith("time:"):
                t = int(part[5:]) / 1000
                found[bug] = min(found.get(bug, t), t)


def afl_run(afl: str, seconds: int, work: Path, until_chain: bool = True) -> tuple[dict, float, int]:
    """One afl-fuzz run, bounded by `seconds` and (until_chain) ended as soon as a crash input holds the
    comparison chain: ({bug: seconds to its first crash}, execs_per_sec, execs_done)."""
    seeds, out, crashes = work / "seeds", work / "out", work / "crashes"
    seeds.mkdir(parents=True)
    (seeds / "seed").write_bytes(SEED)
    env = _env()
    env.update(AFL_SKIP_BIN_CHECK="1", AFL_FORKSRV_INIT_TMOUT="120000", AFL_NO_UI="1", AFL_SKIP_CPUFREQ="1",
               AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES="1", AFL_NO_AFFINITY="1")
    cmd = [afl, "-i", str(seeds), "-o", str(out), "-V", str(seconds), "-t", "5000", "--",
           sys.executable, "-m", "pykvm", "fuzz", "fuzz-target", "--crash-dir", str(crashes)]
    found: dict = {}
    seen: dict = {}
    launched = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = launched + seconds + 300
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                break
            _crash_times(out / "default" / "crashes", seen, found)
            if "chain" in found and "chain-wall" not in found:
                found["chain-wall"] = time.monotonic() - launched
            if until_chain and "chain" in found:
                proc.send_signal(signal.SIGINT)      # afl-fuzz writes its stats and ends
                proc.wait(60)
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _crash_times(out / "default" / "crashes", seen, found)
    stats = _stats(out / "default" / "fuzzer_stats")
    return found, float(stats.get("execs_per_sec", 0) or 0), int(stats.get("execs_done", 0) or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--afl-seconds", type=int, default=600, help="bound of each bug-finding afl-fuzz run")
    ap.add_argument("--runs", type=int, default=3, help="afl-fuzz runs timed to the comparison-chain bug")
    ap.add_argument("--rate-seconds", type=int, default=60, help="length of the afl-fuzz run (a) is read from")
    ap.add_argument("--resets", type=int, default=200, help="resets timed per dirty-page count")
    ap.add_argument("--per-input", type=int, default=10, help="inputs for (b), (c) and (d)")
    args = ap.parse_args()

    print("reset latency (128 MiB guest, in-process, as pykvm fuzz resets between inputs):")
    medians = reset_latency(args.resets)

    print("inputs per second:")
    b = reboot_rate(args.per_input)
    c = process_rate([sys.executable, "-m", "pykvm", "run", "fuzz-target", "--serial", "none", "--no-dump"],
                     args.per_input, 0)
    qemu = shutil.which("qemu-system-x86_64")
    d = None
    if qemu:
        r = subprocess.run([sys.executable, "-m", "pykvm", "guests"], capture_output=True, text=True, env=_env())
        guests = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())
        mb = guests["multiboot"].strip()
        d = process_rate([qemu, "-accel", "kvm", "-M", "microvm,isa-serial=on,rtc=off", "-nodefaults", "-display",
                          "none", "-serial", "null", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", "128",
                          "-kernel", mb], args.per_input, 1)
    afl = shutil.which("afl-fuzz")
    found: list = []
    a = None
    if afl:
        with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            bugs, a, done = afl_run(afl, args.rate_seconds, Path(tmp) / "rate", until_chain=False)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            print(f"  afl rate run ({args.rate_seconds} s, not stopped at a bug): {done} execs, {a:.1f} execs/s")
            if done:
                user = (after.ru_utime - before.ru_utime) / done * 1e6
                system = (after.ru_stime - before.ru_stime) / done * 1e6
                print(f"  host CPU per exec (afl-fuzz + pykvm fuzz, boot included): user {user:.0f} us, "
                      f"system {system:.0f} us")
            for i in range(args.runs):
                bugs, rate, done = afl_run(afl, args.afl_seconds, Path(tmp) / f"run{i}")
                found.append(bugs.get("chain"))
                each = ", ".join(f"{b} bug after {bugs[b]:.1f} s" if b in bugs else f"{b} bug not found"
                                 for b in ("length", "chain"))
                wall = f" ({bugs['chain-wall']:.1f} s after afl-fuzz was started, boot included)" \
                    if "chain-wall" in bugs else ""
                print(f"  afl run {i + 1} (at most {args.afl_seconds} s, ends at the chain bug): {each}{wall}; "
                      f"{done} execs, {rate:.1f} execs/s")
    print(f"  (a) pykvm fuzz under afl-fuzz:        {a if a is not None else float('nan'):8.1f} /s"
          + ("" if afl else "   (afl-fuzz not installed)"))
    print(f"  (b) in-process API, boot per input:   {b:8.1f} /s")
    print(f"  (c) pykvm run process per input:      {c:8.1f} /s")
    print("  (d) QEMU microvm process per input:   " + (f"{d:8.1f} /s" if d else "   n/a (no qemu-system-x86_64)"))
    if a:
        print(f"  a/c = {a / c:.1f}" + (f"   a/d = {a / d:.1f}" if d else ""))
    x = f"{a / d:.1f}" if a and d else "n/a"
    s = " ".join(f"{t:.1f}" if t is not None else "none" for t in found) or "none"
    print(f"reset-us {medians[16]:.0f}, execs/s {a if a is not None else float('nan'):.0f}, afl/qemu {x}, found-s {s}")


if __name__ == "__main__":
    main()
