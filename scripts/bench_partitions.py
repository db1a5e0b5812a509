#!/usr/bin/env python3
"""Partition benchmark: block requests served by another partition, by copy, remapping and direct channel.

One run, same machine, same client guest (bus-bench mode=disk): N sequential requests of
each size, served four ways:
  host   `pykvm run bus-bench --disk FILE`: the host's own block service (the reference)
  copy   `pykvm up`: a bus-blocksvc service partition, data copied through the broker
         (16-sector pieces, two socket hops each way)
  remap  the same topology with remapping from 512 bytes: the client's pages are mapped
         into the service partition for each request (pykvm/bus/remap.py)
  direct the same partitions with bus-blocksvc direct=1: the client's rings and data
         buffer are mapped into the service partition once, at open (pykvm/bus/direct.py);
         each request goes guest to guest, no VMM thread, broker or copy on the way
Reported per size and way: requests/s, MiB/s, VMM exits per request (every VMM of the
run: the client's, and the service partition's), VMM wakeups per request (the bus
doorbell threads and partition-link threads of every VMM, from `ctl stats`), broker
wakeups per request (its selector returns, whole run minus an n=0 run of the same
topology), host user CPU per request (user time of every process of the run, vCPU
threads included, /proc/PID/stat; guest time under KVM_RUN is system time, excluded;
10 ms ticks), and ratios against host and copy.

Echo (--echo-n, 0 to skip): messages of each size (at most 4032 bytes) one at a time,
  direct   `pykvm up`: a bus-echosvc partition serving a trusted client over a direct
           channel (pykvm/bus/direct.py): guest to guest, no VMM thread or broker per message
  bus      `pykvm run bus-bench`: the client VMM's own echo service (guest -> host bus)
  trapped  the trapped echo device (rep outsb / rep insb on a port)
The smallest block request is one 512-byte sector: a 64-byte request is not possible
with block I/O, so "64 B" is measured as 512 B. The output ends with one line per size:
"SIZE: direct/copy R, direct wakeups/req W, direct user-us/req U, copy user-us/req V"
(W: the VMMs' and the broker's wakeups together).

Timing: the guest prints "bench: ready", spins, "bench: start", runs the requests,
"bench: done", spins; this script polls the client's serial file (1 ms) and reads
`ctl stats` of every VMM during the spins, so boot and set-up are not counted. The
exits of the two marker lines are measured once (n=0) and subtracted.

    python3 scripts/bench_partitions.py [--n 200] [--sizes 512,4096,65536] [--write] [--spin 100]
        [--ways host,copy,remap,direct] [--echo-n 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPOLOGY = """
[[partition]]
name = "storage"
kernel = "bus-blocksvc"
memory = "16M"
provides = "disk0"
cmdline = "sectors=4096{service}"

[[partition]]
name = "client"
kernel = "bus-bench"
memory = "16M"
cmdline = "{cmdline}"
uses = ["disk0"]

[policy.partition.client]
remap = {remap}
remap_min_bytes = 512
"""


ECHO_TOPOLOGY = """
[[partition]]
name = "echo"
kernel = "bus-echosvc"
memory = "16M"
provides = "echo0"

[[partition]]
name = "client"
kernel = "bus-bench"
memory = "16M"
cmdline = "{cmdline}"
uses = ["echo0"]
"""


def _tree(root: int) -> list[int]:
    """root and every process below it."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def _user_seconds(root: int) -> float:
    """User CPU seconds of root's process tree so far (all threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(root):
        try:
            with open(f"/proc/{p}/stat") as f:
                total += int(f.read().rsplit(")", 1)[1].split()[11])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def _wakeups(sock: Path) -> int:
    """Wakeups of a VMM's bus threads: its doorbell thread and its partition link's reader."""
    from pykvm.control.client import request

    bus = request(str(sock), {"cmd": "stats"})["bus"] or {}
    return ((bus.get("doorbells") or {}).get("thread_wakeups") or 0) + ((bus.get("link") or {}).get("wakeups") or 0)


def _broker_wakeups(run: Path) -> int:
    import json

    try:
        return json.loads((run / "broker-policy.json").read_text())["counts"].get("wakeups", 0)
    except (OSError, ValueError, KeyError):
        return 0


def _exits(sock: Path) -> int:
    from pykvm.control.client import request

    return sum(sum(v.values()) for v in request(str(sock), {"cmd": "stats"})["exits"])


def _requests(sock: Path) -> tuple[int, int]:
    """(data requests, remapped) the client's block or proxy channel has seen."""
    from pykvm.control.client import request

    bus = request(str(sock), {"cmd": "stats"})["bus"] or {}
    for ch in bus.get("channels", []):
        s = ch.get("session") or ch.get("stats") or {}
        if "read" in s and "write" in s:
            return s["read"] + s["write"], s.get("remapped", 0)
    return 0, 0


def _wait_for(serial: Path, marker: str, proc, deadline: float) -> float:
    while True:
        now = time.perf_counter()
        try:
            if marker in serial.read_text(errors="replace"):
                return now
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before {marker!r}: status {proc.returncode}; see {serial.parent}")
        if now > deadline:
            raise SystemExit(f"no {marker!r} in {serial} within the time limit")
        time.sleep(0.001)


def measure(proc, serial: Path, socks: list[Path], client: Path, n: int) -> dict:
    """Wall time and exits of the n requests between the markers, from the serial file and ctl stats."""
    deadline = time.perf_counter() + 900
    try:
        _wait_for(serial, "bench: ready", proc, deadline)
        e0 = [_exits(s) for s in socks]
        w0 = [_wakeups(s) for s in socks]
        r0 = _requests(client) if client is not None else (0, 0)
        u0 = _user_seconds(proc.pid)
        t0 = _wait_for(serial, "bench: start", proc, deadline)
        t1 = _wait_for(serial, "bench: done", proc, deadline)
        u1 = _user_seconds(proc.pid)
        e1 = [_exits(s) for s in socks]
        w1 = [_wakeups(s) for s in socks]
        r1 = _requests(client) if client is not None else (0, 0)
        if proc.wait(timeout=300) != 0:
            raise SystemExit(f"the run failed with status {proc.returncode}; see {serial.parent}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if client is not None and r1[0] - r0[0] != n:
        print(f"  warning: the counters were read late ({r1[0] - r0[0]} of {n} requests between them); "
              "raise --spin", file=sys.stderr)
    return {"seconds": max(t1 - t0, 1e-9), "exits": sum(e1) - sum(e0), "remapped": r1[1] - r0[1],
            "wakeups": sum(w1) - sum(w0), "user": u1 - u0}


IRQ = False                     # --irq: the client guest halts for each completion instead of polling


def cmdline(n: int, sectors: int, write: bool, spin: int) -> str:
    return f"mode=disk n={n} sectors={sectors} write={int(write)} spin={spin} irq={int(IRQ)}"


def run_host(work: Path, n: int, sectors: int, write: bool, spin: int) -> dict:
    """The client guest against the host's block service (--disk)."""
    disk = work / "disk.img"
    if not disk.exists():
        with open(disk, "wb") as f:
            f.truncate(4096 * 512)
    d = Path(tempfile.mkdtemp(dir=work))
    serial, sock = d / "client.serial", d / "client.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "bus-bench", "--mem", "16M", "--disk", str(disk),
                             "--serial", str(serial), "--control", str(sock), "--cmdline",
                             cmdline(n, sectors, write, spin)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(d / "client.log", "wb"))
    return measure(proc, serial, [sock], sock, n)


def run_topology(work: Path, n: int, sectors: int, write: bool, spin: int, way: str) -> dict:
    """The client guest in a partition, served by the bus-blocksvc partition by copy, remapping or direct channel."""
    d = Path(tempfile.mkdtemp(dir=work))
    topo = d / "topo.toml"
    topo.write_text(TOPOLOGY.format(cmdline=cmdline(n, sectors, write, spin), remap=str(way == "remap").lower(),
                                    service=" direct=1" if way == "direct" else ""))
    run = d / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "up", str(topo), "--dir", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(d / "up.log", "wb"))
    # a direct channel's requests never reach the client VMM's proxy: no request counter to check there
    r = measure(proc, run / "client.serial", [run / "client.sock", run / "storage.sock"],
                run / "client.sock" if way != "direct" else None, n)
    if way == "direct" and "bench: direct channel" not in (run / "client.serial").read_text():
        raise SystemExit(f"the direct way did not get a direct channel; see {run}")
    r["broker"] = _broker_wakeups(run)
    return r


def run_echo(work: Path, way: str, n: int, size: int, spin: int) -> dict:
    """n echo messages of size bytes: direct (guest to guest), bus (guest -> host) or trapped (port device)."""
    d = Path(tempfile.mkdtemp(dir=work))
    cmd = f"mode={'port' if way == 'trapped' else 'bus'} n={n} size={size} window=1 spin={spin}"
    if way == "direct":
        topo = d / "topo.toml"
        topo.write_text(ECHO_TOPOLOGY.format(cmdline=cmd))
        run = d / "run"
        proc = subprocess.Popen([sys.executable, "-m", "pykvm", "up", str(topo), "--dir", str(run)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=open(d / "up.log", "wb"))
        r = measure(proc, run / "client.serial", [run / "client.sock", run / "echo.sock"], None, n)
        r["broker"] = _broker_wakeups(run)
        return r
    serial, sock = d / "client.serial", d / "client.sock"
    extra = ["--device", "echo-port"] if way == "trapped" else ["--bus"]
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "bus-bench", "--mem", "16M", *extra,
                             "--serial", str(serial), "--control", str(sock), "--cmdline", cmd], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(d / "client.log", "wb"))
    return measure(proc, serial, [sock], None, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="requests per size and way")
    ap.add_argument("--sizes", default="512,4096,65536",
                    help="request sizes in bytes (multiples of 512, up to 128 KiB)")
    ap.add_argument("--write", action="store_true", help="writes instead of reads")
    ap.add_argument("--spin", type=int, default=100, help="guest spin (thousands of loop iterations) around the run")
    ap.add_argument("--ways", default="host,copy,remap,direct")
    ap.add_argument("--echo-n", type=int, default=200, help="echo messages per size and way (0: no echo part)")
    ap.add_argument("--echo-sizes", default="512,4032", help="echo message sizes in bytes (at most 4032)")
    ap.add_argument("--irq", action="store_true",
                    help="the client guest waits for each completion halted (bus interrupt) instead of polling")
    a = ap.parse_args()
    global IRQ
    IRQ = a.irq
    sizes = [int(s) for s in a.sizes.split(",")]
    if any(s % 512 or not 512 <= s <= 128 << 10 for s in sizes):
        raise SystemExit("--sizes: multiples of 512 from 512 to 131072")
    ways = a.ways.split(",")
    from pykvm.startup.artifacts import bundled_guests

    bundled_guests()                       # build once, before anything is timed
    op = "writes" if a.write else "reads"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        marker = run_host(work, 0, 1, a.write, a.spin)["exits"]
        print(f"client -> service block {op}, {a.n} sequential requests per size and way "
              f"(marker lines: {marker} exits, subtracted)")
        print(f"{'size':>7} {'way':<6} {'req/s':>9} {'MiB/s':>8} {'exits/req':>10} {'remapped':>9} "
              f"{'VMM wk/req':>10} {'brk wk/req':>10} {'user-us/req':>11}")
        results = {}
        per = {}
        base = {}                     # broker wakeups of an n=0 run of each topology: set-up, not requests
        for size in sizes:
            sectors = size // 512
            for way in ways:
                if way == "host":
                    r = run_host(work, a.n, sectors, a.write, a.spin)
                else:
                    r = run_topology(work, a.n, sectors, a.write, a.spin, way)
                rate = a.n / r["seconds"]
                results[(size, way)] = rate
                if way != "host" and way not in base:
                    base[way] = run_topology(work, 0, sectors, a.write, a.spin, way)["broker"]
                brk = (r.get("broker", 0) - base.get(way, 0)) / a.n if way != "host" else 0.0
                per[(size, way)] = (r["wakeups"] / a.n, brk, r["user"] * 1e6 / a.n)
                print(f"{size:>7} {way:<6} {rate:>9.1f} {rate * size / (1 << 20):>8.2f} "
                      f"{(r['exits'] - marker) / a.n:>10.2f} {r['remapped']:>9} {per[(size, way)][0]:>10.3f} "
                      f"{brk:>10.3f} {per[(size, way)][2]:>11.0f}", flush=True)
        print("ratios of requests/s:")
        for size in sizes:
            g = lambda w: results.get((size, w))  # noqa: E731
            parts = []
            for num, den in (("copy", "host"), ("remap", "host"), ("remap", "copy"), ("direct", "host"),
                             ("direct", "copy"), ("direct", "remap")):
                if g(num) and g(den):
                    parts.append(f"{num}/{den} {g(num) / g(den):.2f}")
            print(f"{size:>7}: " + ", ".join(parts))
        if a.echo_n > 0:
            echo_part(work, a)
        if "direct" in ways and "copy" in ways:
            for size in sizes:
                d, c = per[(size, "direct")], per[(size, "copy")]
                print(f"{size}: direct/copy {results[(size, 'direct')] / results[(size, 'copy')]:.2f}, "
                      f"direct wakeups/req {d[0] + d[1]:.3f}, direct user-us/req {d[2]:.0f}, "
                      f"copy user-us/req {c[2]:.0f}")


def echo_part(work: Path, a) -> None:
    """Echo guest to guest over a direct channel, guest to host over the bus, and through a trapped port."""
    sizes = [int(s) for s in a.echo_sizes.split(",")]
    n = a.echo_n
    marker = run_echo(work, "bus", 0, 64, a.spin)["exits"]
    base = run_echo(work, "direct", 0, 64, a.spin)["broker"]
    print(f"echo, {n} messages per size and way, one at a time (marker lines: {marker} exits, subtracted)")
    print(f"{'size':>7} {'way':<8} {'msg/s':>9} {'MiB/s':>8} {'exits/msg':>10} {'VMM wk/msg':>10} "
          f"{'brk wk/msg':>10} {'user-us/msg':>11}")
    res = {}
    for size in sizes:
        for way in ("direct", "bus", "trapped"):
            r = run_echo(work, way, n, size, a.spin)
            rate = n / r["seconds"]
            brk = (r.get("broker", base) - base) / n if way == "direct" else 0.0
            res[(size, way)] = (rate, r["wakeups"] / n, brk, r["user"] * 1e6 / n)
            print(f"{size:>7} {way:<8} {rate:>9.1f} {rate * size / (1 << 20):>8.2f} {(r['exits'] - marker) / n:>10.2f} "
                  f"{r['wakeups'] / n:>10.3f} {brk:>10.3f} {r['user'] * 1e6 / n:>11.0f}", flush=True)
    for size in sizes:
        d, b = res[(size, "direct")], res[(size, "bus")]
        print(f"{size}: direct/bus {d[0] / b[0]:.2f}, direct wakeups/msg {d[1] + d[2]:.3f}, "
              f"direct user-us/msg {d[3]:.0f}, bus user-us/msg {b[3]:.0f}")


if __name__ == "__main__":
    main()
