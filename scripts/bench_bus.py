#!/usr/bin/env python3
"""Partition bus benchmark: echo over the bus against a trapped port-I/O echo device, and block reads vs dd.

One run, same machine, same guest (bus-bench): for each mode the guest is booted with n=0
and with n=N, so boot and set-up cancel out; reported per message:
  messages/s, VMM exits (KVM_RUN returns that reached pykvm) and guest doorbells.
Targets (issue 7): <= 0.01 exits per message on the bus, >= 10x the trapped device's rate.
Also: 4 KiB block reads through the block service against `dd bs=4k` of the same file.

    python3 scripts/bench_bus.py [--n 3000] [--size 64] [--window 32] [--blocks 2000]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_ticks() -> tuple[int, int]:
    """(this process's user+system ticks, its guest ticks): KVM counts time in the guest separately."""
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[40])


def run_guest(cmdline: str, devices=(), disks=(), bus=True):
    """(seconds from run() to the end, total exits, serial text, VMM CPU seconds) of one bus-bench run."""
    from pykvm.startup.artifacts import bundled_guests
    from pykvm.machine import Machine, MachineConfig

    with tempfile.TemporaryFile() as out:
        cfg = MachineConfig(kernel=bundled_guests()["bus-bench"], cmdline=cmdline, serial_out=out.fileno(),
                            timeout=600, crash_dir=None, bus=bus, disks=list(disks),
                            devices=[(d, {}) for d in devices])
        with Machine(cfg) as m:
            c0, g0 = _cpu_ticks()
            t0 = time.perf_counter()
            outcome = m.run()
            dt = time.perf_counter() - t0
            c1, g1 = _cpu_ticks()
            exits = sum(sum(c.values()) for c in m.exit_summary())
            bus_cpu = ((m.bus_final or {}).get("doorbells") or {}).get("thread_cpu_seconds") or 0.0
        out.seek(0)
        text = out.read().decode(errors="replace")
    if outcome.status != 0:
        raise SystemExit(f"bus-bench {cmdline!r} failed: {outcome.reason}\n{text}")
    hz = os.sysconf("SC_CLK_TCK")
    return dt, exits, text, bus_cpu


def measure(mode: str, n: int, extra: str, **kw):
    """(messages/s, exits, doorbells and bus-thread CPU µs per message, seconds) from an n=0 and an n=N run."""
    t0, e0, _, v0 = run_guest(f"mode={mode} n=0 {extra}", **kw)
    t1, e1, text, v1 = run_guest(f"mode={mode} n={n} {extra}", **kw)
    bells = int(re.search(r"(\d+) doorbells", text).group(1))
    per = max(t1 - t0, 1e-9)
    return n / per, (e1 - e0) / n, bells / n, per, max(v1 - v0, 0) / n * 1e6


def dd_rate(path: str, blocks: int) -> float:
    """4 KiB reads/s of dd over the same file (page cache warm, as the VMM's are)."""
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4k", f"count={blocks}"], capture_output=True, check=True)
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4k", f"count={blocks}"], capture_output=True, check=True)
    return blocks / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="echo messages per mode")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--window", type=int, default=32, help="bus messages in flight")
    ap.add_argument("--blocks", type=int, default=2000, help="4 KiB block reads")
    a = ap.parse_args()

    bus = measure("bus", a.n, f"size={a.size} window={a.window}")
    port = measure("port", a.n, f"size={a.size}", devices=["echo-port"], bus=False)
    print(f"echo, {a.size}-byte messages, {a.n} each (guest bus-bench; n=0 run subtracted)")
    print(f"  {'':8} {'msgs/s':>10} {'exits/msg':>10} {'doorbells/msg':>14} {'seconds':>8}")
    for name, (rate, exits, bells, secs, _cpu) in (("bus", bus), ("trapped", port)):
        print(f"  {name:8} {rate:>10.0f} {exits:>10.4f} {bells:>14.4f} {secs:>8.2f}")
    print(f"  bus/trapped messages/s: {bus[0] / port[0]:.2f}x   (target >= 10x; bus exits/msg target <= 0.01)")
    # Where guest code is emulated (nested, software-assisted KVM) the guest bounds both rates; what
    # bounds them on an ordinary host is the VMM's work per message: the bus thread's CPU for the bus,
    # and for the trapped device one exit round trip per exit (measured by scripts/bench_exits.py).
    print(f"  host work per message: bus thread {bus[4]:.1f} us of CPU; trapped device {port[1]:.0f} exits "
          f"(x the exit cost scripts/bench_exits.py measures, ~9 us here)")

    with tempfile.NamedTemporaryFile(suffix=".img", delete=False) as f:
        f.write(os.urandom(a.blocks * 4096))
        disk = f.name
    try:
        blk = measure("block", a.blocks, f"window={min(a.window, 16)}", disks=[(disk, True)])
        dd = dd_rate(disk, a.blocks)
    finally:
        os.unlink(disk)
    print(f"block, 4 KiB reads, {a.blocks}: bus {blk[0]:.0f} reads/s ({blk[0] * 4 / 1024:.1f} MiB/s), "
          f"{blk[1]:.4f} exits/read; host dd {dd:.0f} reads/s; bus/dd {blk[0] / dd:.3f}")


if __name__ == "__main__":
    main()
