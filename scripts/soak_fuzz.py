#!/usr/bin/env python3
"""Long-run soak of snapshot fuzzing: N inputs through one FuzzTarget, and whether memory,
descriptors or threads grow.

    python3 scripts/soak_fuzz.py [--runs 1000000] [--seed 1] [--every 100000]

The bundled fuzz-target guest (command line "hostile", 128 MiB) runs a seeded mix of inputs as
`pykvm fuzz` does between AFL's requests: most parse records and end "done" (the inline reset on
the vCPU thread), some write 1-64 scratch pages (more pages to restore, hot-page learning), and
about 1 in 50 are hostile: stores anywhere in low memory (page tables, IDT, GDT, stack), writes to
device ports, a loaded IDT, the length bug. Those crash or end otherwise and go the slow path
(pause, reset from the machine thread). Hangs are left out: each costs the run timeout.

Every --every runs it prints the rate and the process's anonymous RSS (its heap; guest RAM is a
memfd), open descriptors and threads; the
last line is
    soak: R runs (I inline resets, C crashes) in S s, anon rss +M MiB, fds +F, threads +T after the first P runs
(growth measured from the first checkpoint, so start-up and warm-up are not counted). Exit status 1
when descriptors or threads grew.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRATCH = 0x4000000          # 64 MiB: guest RAM nothing else uses in a 128 MiB fuzz-target


def _rss_kib() -> int:
    """Anonymous resident memory (the VMM's own heap): guest RAM is a memfd, counted as RssShmem, and
    grows as inputs touch scratch pages the first time, which is the guest's memory, not a leak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _benign(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randint(1, 8)):
        kind = rng.choice("NCR")
        if kind == "N":
            out += b"N"
        elif kind == "C":
            n = rng.randint(0, 5)                         # shorter than "PYKVM!": never the planted bug
            out += b"C" + bytes([n]) + rng.randbytes(n)
        else:
            n = rng.randint(0, 32)                        # within one slot: never the length bug
            out += b"R" + bytes([rng.getrandbits(8), n]) + rng.randbytes(n)
    return out


def _scratch(rng: random.Random) -> bytes:
    pages = rng.sample(range(4096), rng.randint(1, 64))
    return b"".join(b"W" + struct.pack("<QQ", SCRATCH + p * 4096 + rng.randrange(0, 4096, 8), rng.getrandbits(64))
                    for p in pages)


def _hostile(rng: random.Random) -> bytes:
    kind = rng.choice("WWOIR")
    if kind == "W":
        addr = rng.choice([0x20000, 0x21000, 0x11000, 0x10000, 0x1f000, 0x13000, rng.randrange(0, 0x400000)])
        return b"W" + struct.pack("<QQ", addr + rng.randrange(0, 4096, 8), rng.getrandbits(64))
    if kind == "O":
        port = rng.choice([0x3f8, 0x3fb, 0x5d0, 0x5d8, 0x6c0, 0x20, 0x40, 0x80])
        return b"O" + struct.pack("<HB", port + rng.randrange(0, 4), rng.getrandbits(8))
    if kind == "I":
        return b"I" + struct.pack("<HQ", rng.getrandbits(16), rng.getrandbits(64))
    return b"R" + bytes([rng.getrandbits(8), 200]) + rng.randbytes(200)   # the length bug


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--every", type=int, default=100_000, help="runs between checkpoints")
    a = ap.parse_args()
    from pykvm.fuzz.coverage import CoverageMap
    from pykvm.fuzz.target import FuzzTarget

    rng = random.Random(a.seed)
    cov = CoverageMap()
    target = FuzzTarget("fuzz-target", cov, mem=128 << 20, cmdline="hostile", cores=False)
    base = None
    status = 0
    try:
        t0 = last_t = time.perf_counter()
        last_n = 0
        for i in range(1, a.runs + 1):
            r = rng.random()
            data = _hostile(rng) if r < 0.02 else _scratch(rng) if r < 0.10 else _benign(rng)
            result = target.run(data, timeout=10)
            if result.kind != "ok":
                target.settle()
            if i % a.every == 0 or i == a.runs:
                now = time.perf_counter()
                point = (_rss_kib(), _fds(), threading.active_count())
                if base is None:
                    base = (i, *point)
                print(f"  {i:9d} runs  {(i - last_n) / (now - last_t):7.0f} runs/s  inline resets {target.inline_resets}"
                      f"  crashes {target.crashes}  anon rss {point[0] / 1024:7.1f} MiB  fds {point[1]}"
                      f"  threads {point[2]}", flush=True)
                last_t, last_n = now, i
        rss, fds, threads = _rss_kib(), _fds(), threading.active_count()
        first, rss0, fds0, threads0 = base
        print(f"soak: {a.runs} runs ({target.inline_resets} inline resets, {target.crashes} crashes) in "
              f"{time.perf_counter() - t0:.0f} s, anon rss {(rss - rss0) / 1024:+.1f} MiB, fds {fds - fds0:+d}, "
              f"threads {threads - threads0:+d} after the first {first} runs")
        status = 1 if fds > fds0 or threads > threads0 else 0
    finally:
        target.close()
        cov.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
