#!/usr/bin/env python3
"""Benchmarks pykvm against references measured in the same run; prints ratios, asserts nothing.

1. Port-I/O exit round trip: the same flat real-mode guest (scripts/bench_guest.S: N one-byte
   OUTs to the POST-code port 0x80, then the debug-exit port) under pykvm and under minimon,
   a minimal C monitor (scripts/minimon.c) built here with gcc. Per-exit cost is the slope
   between two guest sizes, so start-up cost cancels out. minimon runs twice: with the
   same interrupt set-up pykvm uses (split irqchip) and bare.
2. Whole-process time from `pykvm run` to a tiny multiboot guest's exit, against
   `qemu-system-x86_64 -accel kvm` booting the same guest (skipped when QEMU is absent).

Runs alternate between monitors and the best of --rounds is kept, because a shared
machine's noise only ever adds time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SMALL, LARGE = 50_000, 250_000


def build(tmp: Path) -> tuple[Path, dict[int, Path]]:
    """Compile minimon and the guest at two sizes."""
    mon = tmp / "minimon"
    subprocess.run(["gcc", "-O2", "-o", str(mon), str(HERE / "minimon.c")], check=True)
    guests = {}
    for n in (SMALL, LARGE):
        obj, binf = tmp / f"g{n}.o", tmp / f"g{n}.bin"
        subprocess.run(["gcc", "-c", f"-DCOUNT={n}", "-DBENCH_PORT=0x80", str(HERE / "bench_guest.S"),
                        "-o", str(obj)], check=True)
        subprocess.run(["objcopy", "-O", "binary", str(obj), str(binf)], check=True)
        guests[n] = binf
    return mon, guests


def time_cmd(cmd: list[str], expect: int) -> float:
    """Wall time of one process run; insists on its exit status so a broken run can't look fast."""
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t
    if r.returncode != expect:
        sys.exit(f"{' '.join(cmd)} exited {r.returncode}, expected {expect}: {r.stderr.decode()[-500:]}")
    return elapsed


def pykvm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pykvm", "run", *args]


def exit_bench(rounds: int, tmp: Path) -> None:
    mon, guests = build(tmp)
    best: dict[str, float] = {}

    def slope(name, make_cmd, expect):
        t_small = time_cmd(make_cmd(guests[SMALL]), expect)
        t_large = time_cmd(make_cmd(guests[LARGE]), expect)
        per_exit = (t_large - t_small) / (LARGE - SMALL)
        best[name] = min(best.get(name, float("inf")), per_exit)

    for _ in range(rounds):
        slope("pykvm", lambda g: pykvm_cmd(str(g), "--load-addr", "0x8000", "--entry-mode", "16",
                                            "--device", "post-code"), 1)
        slope("C (split irqchip)", lambda g: [str(mon), str(g), "0x80", "0xf4", "split"], 0)
        slope("C (bare)", lambda g: [str(mon), str(g), "0x80", "0xf4"], 0)
    print(f"port-I/O exit round trip (best of {rounds}, slope {SMALL}..{LARGE} exits):")
    for name, v in best.items():
        print(f"  {name:20} {v * 1e6:7.2f} us/exit")
    print(f"  ratio pykvm / C (same VM set-up): {best['pykvm'] / best['C (split irqchip)']:.3f}  (target <= 1.15)")
    print(f"  ratio pykvm / C (bare):           {best['pykvm'] / best['C (bare)']:.3f}")


def boot_bench(rounds: int) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    from pykvm.startup.artifacts import bundled_guests

    guest = bundled_guests().get("multiboot")
    if guest is None:
        print("boot: bundled multiboot guest missing; skipped")
        return
    ours = pykvm_cmd(str(guest), "--serial", "none", "--mem", "128M")
    best = {"pykvm": float("inf")}
    if qemu:
        best["qemu"] = float("inf")
        theirs = [qemu, "-accel", "kvm", "-m", "128", "-kernel", str(guest), "-display", "none",
                  "-serial", "null", "-monitor", "none", "-nodefaults", "-no-user-config",
                  "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    for _ in range(rounds):
        best["pykvm"] = min(best["pykvm"], time_cmd(ours, 1))
        if qemu:
            best["qemu"] = min(best["qemu"], time_cmd(theirs, 1))
    print(f"whole process, start to guest exit (best of {rounds}):")
    print(f"  pykvm {best['pykvm'] * 1e3:7.1f} ms")
    if not qemu:
        print("  qemu-system-x86_64 not installed: no reference (apt-get install qemu-system-x86)")
        return
    print(f"  qemu  {best['qemu'] * 1e3:7.1f} ms")
    print(f"  ratio pykvm / qemu: {best['pykvm'] / best['qemu']:.3f}  (target < 1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=["exits", "boot"])
    args = ap.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("bench_exits: /dev/kvm is not usable here")
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
        if args.only in (None, "exits"):
            exit_bench(args.rounds, Path(tmp))
        if args.only in (None, "boot"):
            boot_bench(args.rounds)


if __name__ == "__main__":
    main()
