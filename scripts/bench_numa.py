#!/usr/bin/env python3
"""Benchmark: reclaim 1 GiB from one node of a 2-node guest and hot-add 512 MiB to the other, in one run.

    PYTHONPATH=. python3 scripts/bench_numa.py [--reclaim-mib 1024] [--hotadd-mib 512] [--keep]

The numa-mem guest (fast=1: one word per page) warms node 0 completely and then idles, so
the balancer balloons node 0 down to its minimum (`--reclaim-mib` below its startup size);
node 1 asks at once for more than it has, so the balancer hot-adds its whole reserve
(`--hotadd-mib`). From the run's --memory-log and samples of the VMM's /proc status it
prints: seconds for each operation (decision to the last page released / to the guest's
acknowledgement), host memory before and after (the node's memfd bytes and the process's
RSS), pages per second, and the balancer's reaction time from a pressure report to its
decision. Reference measured in the same run: releasing the same number of touched pages of
a memfd with MADV_REMOVE straight from Python (what the release costs without a guest).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
PAGE = 4096


def reference_release(pages: int) -> float:
    """Seconds to touch-then-MADV_REMOVE `pages` pages of a memfd in 4 MiB pieces (no guest, no checks)."""
    fd = os.memfd_create("bench-ref", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, pages * PAGE)
        mm = mmap.mmap(fd, pages * PAGE)
        for off in range(0, pages * PAGE, PAGE):
            mm[off] = 1
        t = time.perf_counter()
        step = 4 * MIB
        for off in range(0, pages * PAGE, step):
            mm.madvise(mmap.MADV_REMOVE, off, min(step, pages * PAGE - off))
        dt = time.perf_counter() - t
        mm.close()
        return dt
    finally:
        os.close(fd)


def rss(pid: int) -> int | None:
    """VmRSS of a process in bytes (shared memfd pages it maps included)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main() -> int:
    """Run the scenario and print the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reclaim-mib", type=int, default=1024)
    ap.add_argument("--hotadd-mib", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--keep", action="store_true", help="keep the memory log (path printed)")
    args = ap.parse_args()
    node0_min = 128
    node0 = args.reclaim_mib + node0_min
    node1 = 64
    grow = -(-(node1 + args.hotadd_mib) * 5 // 6) + 1   # demand * 1.2 (the buffer) passes the node's max
    tmp = Path(tempfile.mkdtemp(prefix="pykvm-bench-numa-"))
    log = tmp / "memory.jsonl"
    cmd = [sys.executable, "-m", "pykvm", "run", "numa-mem",
           "--numa-node", f"mem={node0}M,cpus=0,min={node0_min}M,hotadd=0,max={node0}M",
           "--numa-node", f"mem={node1}M,cpus=1,hotadd={args.hotadd_mib}M,max={node1 + args.hotadd_mib}M",
           "-a", f"fast=1 grow={grow} step={grow} settle=50", "--memory-log", str(log),
           "--timeout", str(args.timeout), "--no-dump", "--serial", str(tmp / "serial.txt")]
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    samples = []
    while proc.poll() is None:
        v = rss(proc.pid)
        if v is not None:
            samples.append((time.monotonic() - t_start, v))
        time.sleep(0.05)
    wall = time.monotonic() - t_start
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    serial = (tmp / "serial.txt").read_text(errors="replace") if (tmp / "serial.txt").exists() else ""
    if proc.returncode != 0 or "checksums ok" not in serial:
        print(f"guest run failed: status {proc.returncode}\n{serial[-2000:]}", file=sys.stderr)
        return 1

    b0 = [e for e in events if e["event"] == "balloon" and e["node"] == 0]
    rel0 = [e for e in events if e["event"] == "released" and e["node"] == 0]
    hot = [e for e in events if e["event"] == "hotadd" and e["node"] == 1]
    acks = [e for e in events if e["event"] == "hotadd-ack" and e["node"] == 1]
    reclaim_pages = sum(e["pages"] for e in rel0)
    reclaim_s = rel0[-1]["t"] - b0[0]["t"]
    host_before = rel0[0]["host_bytes_before"]
    host_after = rel0[-1]["host_bytes"]
    freed = sum(e["host_bytes_freed"] for e in rel0)
    hot_pages = sum(e["pages"] for e in hot)
    hot_s = acks[-1]["t"] - hot[0]["t"]
    reactions = sorted(e["reaction_us"] for e in events if "reaction_us" in e)
    ref = reference_release(reclaim_pages)
    peak = max(v for _t, v in samples) if samples else 0
    final = samples[-1][1] if samples else 0

    print(f"pykvm vNUMA benchmark ({wall:.1f} s wall; guest code is slow under nested KVM: most of it is the guest "
          f"touching {node0 + node1} MiB)")
    print(f"reclaim node 0: {reclaim_pages * PAGE / MIB:.0f} MiB in {reclaim_s:.3f} s "
          f"({reclaim_pages / reclaim_s:,.0f} pages/s; decision -> last page released, guest included)")
    print(f"  node 0 host memory (memfd): {host_before / MIB:.1f} MiB before -> {host_after / MIB:.1f} MiB after; "
          f"freed {freed / MIB:.1f} MiB = {100 * freed / (reclaim_pages * PAGE):.1f}% of what was ballooned")
    print(f"  reference: MADV_REMOVE of the same {reclaim_pages * PAGE / MIB:.0f} MiB from Python: {ref:.3f} s "
          f"({reclaim_pages / ref:,.0f} pages/s); pykvm/reference time = {reclaim_s / ref:.1f}x")
    print(f"hot-add node 1: {hot_pages * PAGE / MIB:.0f} MiB in {len(hot)} piece(s), {hot_s:.3f} s from the first "
          f"decision to the last acknowledgement ({hot_pages / hot_s:,.0f} pages/s; the guest serves one request at a "
          f"time)")
    for h, a in zip(hot, acks):
        print(f"  piece of {h['pages'] * PAGE / MIB:.0f} MiB: host side (memfd + memslot + message) {h['reaction_us']} us, "
              f"decision -> guest online and acknowledged {a['t'] - h['t']:.3f} s")
    print(f"process RSS: peak {peak / MIB:.0f} MiB, at the end {final / MIB:.0f} MiB")
    if reactions:
        print(f"balancer reaction (pressure report received -> decision sent): median {reactions[len(reactions) // 2]} us, "
              f"max {reactions[-1]} us over {len(reactions)} decisions")
    if args.keep:
        print(f"memory log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
