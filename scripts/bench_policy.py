#!/usr/bin/env python3
"""Cost of the device access policy per port access, in nanoseconds; prints numbers, asserts nothing.

Calls callbacks the way the vCPU hot loop does (`h[0](port - h[1], size[, value])`) for:
  bare      the model's own bound method (no policy, or a static-allow range: the same object)
  allow     a wrapped range, register allowed (the dma device under `trusted`: it has unlisted
            offsets, so it is wrapped and counted)
  mask      a translated write (dma CTRL under `untrusted`)
  shadow    a shadowed write and read (dma SRC_LO under `untrusted`)
  deny      a denied write (dma RESET under `untrusted`: counted, audited, logging rate-limited)
The difference "allow - bare" is what a wrapped, allowed access adds to an exit.
"""

from __future__ import annotations

import argparse
import time

from pykvm import abi
from pykvm.devices.dma import Dma
from pykvm.devices.policy import PolicyAuthority


def per_call(fn, args, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in range(n):
            fn(*args)
        best = min(best, (time.perf_counter_ns() - t) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    base = abi.PYKVM_PORT_DMA
    results = {}
    for trust in ("trusted", "untrusted"):
        dev = Dma()
        auth = PolicyAuthority(trust, log=lambda line: None)
        rd, wr = auth.wrap(dev, "port", base, dev.io_read, dev.io_write)
        results[trust] = (dev, rd, wr)
    dev, rd, wr = results["trusted"]
    scratch = abi.PYKVM_DMA_SCRATCH
    rows = [
        ("bare write (model only)", per_call(dev.io_write, (scratch, 4, 1), a.n, a.rounds)),
        ("bare read (model only)", per_call(dev.io_read, (scratch, 4), a.n, a.rounds)),
        ("wrapped allow write", per_call(wr, (scratch, 4, 1), a.n, a.rounds)),
        ("wrapped allow read", per_call(rd, (scratch, 4), a.n, a.rounds)),
    ]
    dev, rd, wr = results["untrusted"]
    rows += [
        ("untrusted mask write (CTRL)", per_call(wr, (abi.PYKVM_DMA_CTRL, 4, 0x6), a.n, a.rounds)),
        ("untrusted shadow write (SRC_LO)", per_call(wr, (abi.PYKVM_DMA_SRC_LO, 4, 0x1000), a.n, a.rounds)),
        ("untrusted shadow read (SRC_LO)", per_call(rd, (abi.PYKVM_DMA_SRC_LO, 4), a.n, a.rounds)),
        ("untrusted deny write (RESET)", per_call(wr, (abi.PYKVM_DMA_RESET, 4, 1), a.n // 10, a.rounds)),
    ]
    # the policy's own overhead, with a model callback that does nothing
    noop_r, noop_w = (lambda o, s: 0), (lambda o, s, v: None)
    auth = PolicyAuthority("trusted", log=lambda line: None)
    prd, pwr = auth.wrap(Dma(), "port", base, noop_r, noop_w)
    bare_w = per_call(noop_w, (scratch, 4, 1), a.n, a.rounds)
    bare_r = per_call(noop_r, (scratch, 4), a.n, a.rounds)
    rows += [
        ("no-op model write, bare", bare_w),
        ("no-op model write, wrapped allow", per_call(pwr, (scratch, 4, 1), a.n, a.rounds)),
        ("no-op model read, bare", bare_r),
        ("no-op model read, wrapped allow", per_call(prd, (scratch, 4), a.n, a.rounds)),
    ]
    for name, ns in rows:
        print(f"{name:36} {ns:8.0f} ns")
    print(f"{'policy overhead, allowed write':36} {rows[-3][1] - bare_w:8.0f} ns")
    print(f"{'policy overhead, allowed read':36} {rows[-1][1] - bare_r:8.0f} ns")


if __name__ == "__main__":
    main()
