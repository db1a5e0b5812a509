#!/usr/bin/env python3
"""Benchmark the sparse core writer against a dense write of the same guest RAM.

Creates a 1 GiB guest, touches 16 MiB of it (random bytes in scattered 4 KiB
pages), then times write_core and a dense copy of all of RAM into the same
directory (every byte written, fsync'd). Prints times, the ratio, and the
core's disk usage. No asserts: the numbers are for people.

    python scripts/bench_dump.py [--dir DIR] [--size-mib 1024] [--touched-mib 16] [--repeat 3]

Each measurement is repeated (alternating core and dense) and the medians are
compared, because page-cache writeback makes single runs noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pykvm.crash import CrashSnapshot, VcpuState, write_core  # noqa: E402
from pykvm.memory import MIB, PAGE_SIZE, GuestMemory  # noqa: E402

MMIO_HOLE = 0xC0000000


def touch(mem: GuestMemory, nbytes: int, seed: int = 1) -> None:
    """Fill nbytes worth of randomly chosen pages with random non-zero data."""
    rng = random.Random(seed)
    pages = rng.sample(range(mem.size // PAGE_SIZE), nbytes // PAGE_SIZE)
    for p in pages:
        data = bytearray(rng.randbytes(PAGE_SIZE))
        data[0] |= 1  # never all zero
        mem.write(p * PAGE_SIZE, bytes(data))


def dense_write(mem: GuestMemory, path: Path, chunk: int = 8 * MIB) -> None:
    """Write every byte of guest RAM to path and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for r in mem.regions:
            for off in range(0, r.size, chunk):
                # pread from the memfd: holes read as zeros without allocating guest pages.
                buf = os.pread(r.fd, min(chunk, r.size - off), off)
                view = memoryview(buf)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _times(ts: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir under the cwd; "
                    "avoid tmpfs, where fsync costs nothing)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--touched-mib", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd(), prefix="bench-dump-") as tmp:
        tmp = Path(tmp)
        mem = GuestMemory.create(args.size_mib * MIB, MMIO_HOLE)
        try:
            touch(mem, args.touched_mib * MIB)
            vcpu = VcpuState(0, {"rip": 0}, {"cr0": 0x11}, None)
            snap = CrashSnapshot("host-request", "benchmark", [vcpu], 0, mem)

            core_times, dense_times = [], []
            for i in range(args.repeat):
                t0 = time.perf_counter()
                core = write_core(snap, tmp / "crashes")
                core_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dense_write(mem, tmp / "dense.bin")
                dense_times.append(time.perf_counter() - t0)
                os.unlink(tmp / "dense.bin")
                if i + 1 < args.repeat:
                    os.unlink(core)
            t_core, t_dense = statistics.median(core_times), statistics.median(dense_times)

            st = os.stat(core)
            used = st.st_blocks * 512
            touched = args.touched_mib * MIB
            print(f"guest RAM            {args.size_mib} MiB, touched {args.touched_mib} MiB")
            print(f"write_core           {t_core:8.3f} s   median of [{_times(core_times)}]")
            print(f"dense write + fsync  {t_dense:8.3f} s   median of [{_times(dense_times)}]")
            print(f"speed-up             {t_dense / t_core:8.1f}x   (target >= 10x)")
            print(f"core apparent size   {st.st_size / MIB:8.1f} MiB")
            print(f"core disk usage      {used / MIB:8.2f} MiB   (touched {touched / MIB:.0f} MiB, "
                  f"excess {(used - touched) / MIB:+.2f} MiB, target within 2 MiB)")
        finally:
            mem.close()


if __name__ == "__main__":
    main()
