#!/usr/bin/env python3
"""Time from a device model's fault to its replacement serving the guest, while the guest uses it.

Runs the bundled `mailbox` guest, injects N faults of each kind (raise: caught on the guest's
next access; corrupt: found by the supervisor's periodic consistency check; hang: found by
stack sampling after the deadline) and prints the fault-to-serving distribution per kind,
from the supervisor's own timestamps (fault detected -> dispatch switched). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=200, help="faults per kind (raise, corrupt)")
    ap.add_argument("--hangs", type=int, default=5)
    args = ap.parse_args()

    from pykvm.startup.artifacts import bundled_guests
    from pykvm.machine import Machine, MachineConfig

    tmp = tempfile.mkdtemp(prefix="pykvm-bench-recovery-")
    out = os.open(os.path.join(tmp, "serial.log"), os.O_WRONLY | os.O_CREAT)
    cfg = MachineConfig(kernel=bundled_guests()["mailbox"], cmdline="work", serial_out=out, timeout=600,
                        restart_intensity=1_000_000, device_deadline=0.1,
                        devices=[("mailbox", {}), ("power-control", {})])
    detected: dict[str, list[float]] = {"raise": [], "corrupt": [], "hang": []}
    with Machine(cfg) as m:
        def inject():
            time.sleep(0.2)
            plan = ["raise"] * args.faults + ["corrupt"] * args.faults + ["hang"] * args.hangs
            for kind in plan:
                dev = m.devices.find("mailbox")
                gen = dev.generation
                if kind == "hang":
                    dev.hang_seconds = 2.0
                t0 = time.monotonic()
                dev.inject(kind)
                while m.devices.find("mailbox").generation == gen:
                    time.sleep(0.0002)
                detected[kind].append(time.monotonic() - t0)
            m.devices.find("mailbox").host_flags |= 1

        t = threading.Thread(target=inject, daemon=True)
        t.start()
        outcome = m.run()
        recoveries = list(m.supervisor.recoveries)
        t.join(5)
    os.close(out)
    print(f"guest: {outcome.reason} (status {outcome.status}); {len(recoveries)} recoveries")

    def show(name, xs):
        xs = sorted(xs)
        if xs:
            print(f"  {name:34} median {statistics.median(xs) * 1e3:7.2f} ms   p95 {xs[int(0.95 * (len(xs) - 1))] * 1e3:7.2f} ms"
                  f"   max {xs[-1] * 1e3:7.2f} ms   (n={len(xs)})")

    print("fault detected -> replacement serving (supervisor timestamps):")
    show("all", [r["fault_to_serving_s"] for r in recoveries])
    print("injection -> replacement serving (includes detection):")
    for kind, xs in detected.items():
        show(kind, xs)


if __name__ == "__main__":
    main()
