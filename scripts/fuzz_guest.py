#!/usr/bin/env python3
"""Runs the hostile guest (guests/hostile) with random seeds for as long as asked; keeps reproducers.

Each run picks a seed, a trust level, an operation count and an ending (exit, or a fake
exception with a random stack pointer), sometimes asks for host dumps while it runs, and
checks how pykvm ended: the guest's own status (67, or 16 for end=trap) is a pass; status 20,
a Python traceback, or any other status is a finding. Findings are written to --out as
<seed>-<trust>.txt holding the exact command to repeat and the tail of stderr.

    python3 scripts/fuzz_guest.py --minutes 30 [--ops 20000] [--out fuzz-findings] [--platform]

--platform fuzzes the PC platform models instead (guests/pc-hostile: edu, intel-iommu, the I/O
APIC, PIT, RTC, ACPI PM, pc-testdev lines and PCI configuration space); its pass is status 71.

Prints a summary line per run and totals at the end; exits 1 if anything was found.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST_EXIT = (0x21 << 1) | 1
GUEST_CRASH = 16
VMM_ERROR = 20
EXTRA_DEVICES = ("identity", "mailbox", "post-code")
PLATFORM_EXIT = (0x23 << 1) | 1
PLATFORM_DEVICES = ("edu", "intel-iommu", "pit", "rtc", "acpi-pm", "pc-testdev-irq")


def one_run(rng: random.Random, ops_max: int, workdir: Path) -> tuple[list[str], int, str, int]:
    """Run once; (command, status, stderr, operations)."""
    seed = rng.getrandbits(63) | 1
    ops = rng.randint(1, ops_max)
    trust = rng.choice(["trusted", "untrusted"])
    end = rng.choice(["exit", "exit", "exit", "trap"])
    scribble = rng.choice([0, 1, 1])
    cmd = [sys.executable, "-m", "pykvm", "run", "hostile", "--cmdline",
           f"seed={seed} ops={ops} scribble={scribble} end={end}", "--trust", trust,
           "--crash-dir", str(workdir / "cores"), "--serial", str(workdir / "serial.txt"),
           "--timeout", str(max(60, ops // 200))]
    for dev in EXTRA_DEVICES:
        if rng.random() < 0.7:
            cmd += ["--device", dev]
    if rng.random() < 0.3:
        cmd += ["--cpus", "2"]
    serial = workdir / "serial.txt"
    serial.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dumps = rng.randint(0, 3)
    started = time.monotonic()
    # SIGUSR1 asks for a core only once pykvm runs the guest (before that it would end the process)
    while dumps and proc.poll() is None and time.monotonic() - started < 60:
        if serial.exists() and serial.read_bytes().startswith(b"hostile:"):
            break
        time.sleep(0.05)
    for _ in range(dumps):
        time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate()
    for core in (workdir / "cores").glob("*"):
        core.unlink()
    return cmd, proc.returncode, err.decode(errors="replace"), ops


def one_platform_run(rng: random.Random, ops_max: int, workdir: Path) -> tuple[list[str], int, str, int]:
    """Run guests/pc-hostile's register fuzzing once; (command, status, stderr, operations)."""
    seed = rng.getrandbits(63) | 1
    ops = rng.randint(1, ops_max)
    cmd = [sys.executable, "-m", "pykvm", "run", "pc-hostile", "--cmdline", f"fuzz seed={seed} ops={ops}",
           "--trust", rng.choice(["trusted", "untrusted"]), "--cpus", rng.choice(["1", "1", "2"]),
           "--crash-dir", str(workdir / "cores"), "--timeout", str(max(60, ops // 200))]
    for dev in PLATFORM_DEVICES:
        if dev == "edu" or rng.random() < 0.8:
            cmd += ["--device", dev]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for core in (workdir / "cores").glob("*"):
        core.unlink()
    return cmd, proc.returncode, proc.stderr.decode(errors="replace"), ops


def verdict(cmd: list[str], status: int, err: str) -> str | None:
    """None for an expected ending, else what is wrong."""
    if "Traceback" in err or "internal error" in err:
        return "pykvm traceback / internal error"
    if status == VMM_ERROR:
        return "status 20 (pykvm bug)"
    trap = "end=trap" in " ".join(cmd)
    expected = PLATFORM_EXIT if "pc-hostile" in cmd else GUEST_CRASH if trap else GUEST_EXIT
    if status != expected:
        return f"status {status}, expected {expected}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="how long to keep fuzzing")
    ap.add_argument("--ops", type=int, default=20000, help="most operations per run")
    ap.add_argument("--seed", type=int, help="seed of the driver's own choices (default: random)")
    ap.add_argument("--out", default="fuzz-findings", help="directory for reproducers")
    ap.add_argument("--platform", action="store_true", help="fuzz the PC platform models (guests/pc-hostile)")
    args = ap.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("fuzz_guest: /dev/kvm is not usable here")
    driver_seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(driver_seed)
    out = Path(args.out)
    deadline = time.monotonic() + args.minutes * 60
    runs = total_ops = findings = 0
    print(f"fuzz_guest: driver seed {driver_seed}")
    with tempfile.TemporaryDirectory(prefix="pykvm-fuzz-") as tmp:
        work = Path(tmp)
        while time.monotonic() < deadline:
            cmd, status, err, ops = (one_platform_run if args.platform else one_run)(rng, args.ops, work)
            runs += 1
            total_ops += ops
            problem = verdict(cmd, status, err)
            line = shlex.join(["python3"] + cmd[1:])
            print(f"run {runs}: status {status} ops {ops}: {problem or 'ok'}", flush=True)
            if problem:
                findings += 1
                out.mkdir(parents=True, exist_ok=True)
                name = cmd[cmd.index("--cmdline") + 1].split()[0].replace("=", "-")
                (out / f"{name}-{runs}.txt").write_text(
                    f"{problem}\n\nreproduce (from the repository root):\n  {line}\n\nstderr tail:\n{err[-4000:]}\n")
    print(f"fuzz_guest: {runs} runs, {total_ops} guest operations, {findings} findings"
          + (f" (reproducers in {out}/)" if findings else ""))
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
