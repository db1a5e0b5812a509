#!/usr/bin/env python3
"""Reads per second from a memory-backed register window vs the same register trapped, in one run.

Boots the bundled `window-poll` guest with `--cmdline "bench N"`: it reads the identity
device's ident window N times with the window backed (a read-only memslot: no exit), switches
it to trapped mode through CONTROL (every read exits to the Python model), reads it N times
again, and brackets each phase with a write to the POST-code port (0x80) that this script
timestamps on the host. Prints both rates from host time, the guest's own rdtsc cycles per
read, and the ratios, plus the guest's cycles per read of an ordinary RAM word as the baseline a
backed read should match (it is a plain memory load), and the MMIO exits counted during each
phase. With hardware virtualization and EPT/NPT a backed read is a plain load (nanoseconds);
where the host emulates guest instructions (nested, software-assisted KVM) every load costs an
emulated instruction either way and the ratio shrinks to the price of the exit to userspace.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=200_000, help="reads per phase (default 200000)")
    ap.add_argument("--runs", type=int, default=3, help="runs; the best of each phase is reported")
    args = ap.parse_args()

    from pykvm.startup.artifacts import bundled_guests
    from pykvm.kvm import constants as C
    from pykvm.machine import Machine, MachineConfig

    kernel = bundled_guests()["window-poll"]
    best = {"backed": float("inf"), "trapped": float("inf")}
    cycles = {"backed": None, "trapped": None, "ram": None}
    for _ in range(args.runs):
        tmp = tempfile.mkdtemp(prefix="pykvm-bench-windows-")
        log = os.path.join(tmp, "serial.log")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        marks: dict[int, float] = {}
        phase_exits: dict[int, int] = {}
        cfg = MachineConfig(kernel=kernel, cmdline=f"bench {args.reads}", serial_out=fd, timeout=600,
                            devices=[("identity", {}), ("post-code", {})])
        with Machine(cfg) as m:
            post = m.devices.find("post-code")
            latch = post.io_write

            def mark(offset, size, value, latch=latch, m=m):
                marks[value] = time.perf_counter()
                phase_exits[value] = m.exit_counts[0].get(C.KVM_EXIT_MMIO, 0)
                latch(offset, size, value)

            post.io_write = mark          # bound into the dispatch tables when the device starts
            outcome = m.run()
        os.close(fd)
        text = open(log).read()
        found = re.search(r"bench: n=(\d+) backed=(\d+) trapped=(\d+) ram=(\d+)", text)
        if outcome.status != 39 or not found or set(marks) != {1, 2, 3, 4}:
            raise SystemExit(f"bench guest failed: {outcome.reason}; serial: {text!r}; marks {sorted(marks)}")
        best["backed"] = min(best["backed"], marks[2] - marks[1])
        best["trapped"] = min(best["trapped"], marks[4] - marks[3])
        for key, group in (("backed", 2), ("trapped", 3), ("ram", 4)):
            c = int(found.group(group))
            cycles[key] = c if cycles[key] is None else min(cycles[key], c)

    n = args.reads
    rb, rt = n / best["backed"], n / best["trapped"]
    print(f"window reads, {n} per phase, best of {args.runs} runs (one vCPU, identity device ident window):")
    print(f"  backed  (read-only memslot, no exit): {rb:14,.0f} reads/s   {best['backed'] / n * 1e9:9.1f} ns/read"
          f"   {cycles['backed'] / n:9.1f} guest cycles/read")
    print(f"  trapped (KVM_EXIT_MMIO to Python)   : {rt:14,.0f} reads/s   {best['trapped'] / n * 1e9:9.1f} ns/read"
          f"   {cycles['trapped'] / n:9.1f} guest cycles/read")
    print(f"  baseline: RAM word reads                                             "
          f"{cycles['ram'] / n:9.1f} guest cycles/read")
    print(f"  ratio backed/trapped: {rb / rt:,.1f}x by host time, "
          f"{cycles['trapped'] / max(cycles['backed'], 1):,.1f}x by guest cycles")
    print(f"  MMIO exits during the phases (last run): backed {phase_exits[2] - phase_exits[1]}, "
          f"trapped {phase_exits[4] - phase_exits[3]}")


if __name__ == "__main__":
    main()
