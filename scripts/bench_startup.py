#!/usr/bin/env python3
"""Whole-process start-up of `pykvm run` against QEMU microvm, the in-process VM's, plus RSS and import times.

    python3 scripts/bench_startup.py [--pairs 15] [--vm-runs 20] [--venv | --pykvm CMD] [--skip-memory]

A (pykvm) and B (QEMU, when installed) boot the same tiny multiboot guest (the bundled
`multiboot`, which exits through the debug port), alternating A/B in one run; wall and
CPU (user+sys of the child, from wait4) are the medians over the pairs, printed as
pykvm/QEMU ratios, with each side's peak RSS. Then the Python API's cost for the same guest:
one process (the measured interpreter, already warm) times a whole `with VM(guest) as vm:
vm.wait()` (build, boot, run, exit, close: wall and the process's CPU) --vm-runs times,
each alternating with a QEMU microvm process booting the same file. Then the VMM's own resident memory
(anonymous + file pages, i.e. excluding guest RAM, which is a memfd and counts as
shmem) for a 128 MiB and a 4 GiB guest that touch 1 MiB, and the import time of each
subcommand's modules (`-X importtime`, best of 3) so a regression is visible.

What is measured (printed first): by default this interpreter's `-m pykvm` with the source
tree on PYTHONPATH, which also pays for whatever the interpreter's site-packages run at start
(an editable install's finder, other .pth files); --venv builds a wheel of the tree, installs
it into a fresh venv and measures that venv's `bin/pykvm`, as a user of the package runs it;
--pykvm CMD measures any other command. The interpreter's own floor (`python -S -c pass` and
`python -c pass` of the measured interpreter) is timed in the same alternation, so the
distance to it is visible. Bytecode must be cacheable: PYTHONDONTWRITEBYTECODE is removed
from the children's env.

--baseline FILE compares the import times with a previous run's (written with --save FILE)
and marks every subcommand whose imports grew by more than 20% and 2 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# 64-bit flat guest: touch one byte in each of 256 pages (1 MiB) from 2 MiB, then spin.
TOUCH_1MIB = bytes.fromhex(
    "48bf0000200000000000"  # movabs rdi, 0x200000
    "b900010000"            # mov ecx, 256
    "c60701"                # 1: mov byte [rdi], 1
    "4881c700100000"        # add rdi, 0x1000
    "ffc9"                  # dec ecx
    "75f2"                  # jnz 1b
    "f390"                  # 2: pause
    "ebfc"                  # jmp 2b
)


def env(source_tree: bool = True) -> dict:
    """Children's environment: bytecode cached; the source tree importable unless measuring an install."""
    e = dict(os.environ)
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    if source_tree:
        e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    else:
        e.pop("PYTHONPATH", None)
    return e


def make_venv(tmp: Path) -> Path:
    """A fresh venv with a wheel of this tree installed (deps from PyPI or pip's cache); its directory."""
    src, dist, venv = tmp / "src", tmp / "dist", tmp / "venv"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".hypothesis", "crashes", "*.core"))
    quiet = {"stdout": subprocess.DEVNULL, "check": True}
    print("building a wheel of the tree and installing it into a fresh venv ...", flush=True)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                   **quiet)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], **quiet)
    (wheel,) = dist.glob("pykvm-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--disable-pip-version-check", str(wheel)], **quiet)
    return venv


def timed(cmd: list[str], e: dict, expect: int = 1) -> tuple[float, float, int, int]:
    """(wall s, CPU s, peak RSS KiB, exit status) of one child run."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode != expect:  # a guest's exit_code(0): status 1 for both VMMs
        sys.exit(f"{shlex.join(cmd)}: status {p.returncode}, expected {expect}\n{err}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss, p.returncode


def startup(pykvm: list[str], python: str, guest: Path, pairs: int, e: dict) -> None:
    """Alternate pykvm and QEMU runs (and the interpreter's floor); print medians, ratios and RSS."""
    qemu = shutil.which("qemu-system-x86_64")
    a_cmd = pykvm + ["run", str(guest), "--serial", "none", "--no-dump"]
    b_cmd = [qemu, "-accel", "kvm", "-M", "microvm,isa-serial=on,rtc=off", "-nodefaults", "-display", "none",
             "-serial", "null", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", "128", "-kernel",
             str(guest)] if qemu else None
    timed(a_cmd, e)  # warm the bytecode and build caches
    if b_cmd:
        timed(b_cmd, e)
    floors = {"python -S -c pass": [python, "-S", "-c", "pass"], "python -c pass": [python, "-c", "pass"]}
    a, b = [], []
    floor_runs: dict[str, list] = {name: [] for name in floors}
    for i in range(pairs):
        order = [(a, a_cmd), (b, b_cmd)] if i % 2 == 0 else [(b, b_cmd), (a, a_cmd)]
        for out, cmd in order:
            if cmd:
                out.append(timed(cmd, e))
        for name, cmd in floors.items():
            floor_runs[name].append(timed(cmd, e, expect=0))
    print(f"start-up: {guest.name}, {pairs} alternating pairs, medians")
    print(f"  A pykvm: {shlex.join(a_cmd)}")
    rows = [("pykvm", a)]
    if b_cmd:
        print(f"  B qemu:  {shlex.join(b_cmd)}")
        rows.append(("qemu", b))
    else:
        print("  B qemu:  not installed (apt-get install qemu-system-x86): no ratio")
    med = {}
    for name, runs in rows:
        med[name] = [statistics.median(r[k] for r in runs) for k in range(3)]
        w, c, rss = med[name]
        print(f"  {name:6} wall {w * 1e3:7.1f} ms   cpu {c * 1e3:7.1f} ms   peak RSS {rss / 1024:6.1f} MiB")
    if b_cmd:
        (aw, ac, ar), (bw, bc, br) = med["pykvm"], med["qemu"]
        print(f"  ratio pykvm/qemu: wall {aw / bw:.2f} (target <= 1.0)   cpu {ac / bc:.2f} (target <= 0.7)   "
              f"RSS {ar / br:.2f}")
    print(f"  the interpreter's floor ({python}):")
    for name, runs in floor_runs.items():
        w, c = (statistics.median(r[k] for r in runs) for k in range(2))
        print(f"    {name:18} wall {w * 1e3:7.1f} ms   cpu {c * 1e3:7.1f} ms")
    cpus = sorted(r[1] for r in a)
    print(f"  noise: pykvm cpu quartiles {cpus[len(cpus) // 4] * 1e3:.1f} / {cpus[(3 * len(cpus)) // 4] * 1e3:.1f} ms")


VM_CHILD = """
import json, sys, time
from pykvm.api import VM
guest = sys.argv[1]
def once():
    t0, c0 = time.perf_counter(), time.process_time()
    with VM(guest) as vm:
        out = vm.wait(timeout=60)
    return [time.perf_counter() - t0, time.process_time() - c0, out.status]
once()                                  # warm: imports, page cache
print("ready", flush=True)
for _ in sys.stdin:
    print(json.dumps(once()), flush=True)
"""


def in_process(python: str, guest: Path, runs: int, e: dict) -> None:
    """Median wall and CPU of a whole `with VM(guest)` in one warm process, alternating with QEMU microvm processes."""
    qemu = shutil.which("qemu-system-x86_64")
    b_cmd = [qemu, "-accel", "kvm", "-M", "microvm,isa-serial=on,rtc=off", "-nodefaults", "-display", "none",
             "-serial", "null", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-m", "128", "-kernel",
             str(guest)] if qemu else None
    child = subprocess.Popen([python, "-c", VM_CHILD, str(guest)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=e)
    if child.stdout.readline().strip() != "ready":
        sys.exit(f"the in-process VM run failed (status {child.wait()})")
    a, b = [], []
    for i in range(runs):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for side in order:
            if side == "b" and b_cmd:
                b.append(timed(b_cmd, e))
            elif side == "a":
                child.stdin.write("go\n")
                child.stdin.flush()
                wall, cpu, status = json.loads(child.stdout.readline())
                if status != 1:   # the guest's exit_code(0) through the debug port
                    sys.exit(f"the in-process VM ended with status {status}, expected 1")
                a.append((wall, cpu))
    child.stdin.close()
    child.wait()
    aw, ac = (statistics.median(r[k] for r in a) for k in range(2))
    print(f"in-process VM: `with VM({guest.name!r}) as vm: vm.wait()` in one warm process, {runs} runs "
          "alternating with QEMU microvm processes, medians")
    print(f"  pykvm VM  wall {aw * 1e3:7.1f} ms   cpu {ac * 1e3:7.1f} ms")
    if b:
        bw, bc = (statistics.median(r[k] for r in b) for k in range(2))
        print(f"  qemu      wall {bw * 1e3:7.1f} ms   cpu {bc * 1e3:7.1f} ms")
        print(f"  ratio VM/qemu: wall {aw / bw:.2f}   cpu {ac / bc:.2f}")
    else:
        print("  qemu: not installed (apt-get install qemu-system-x86): no ratio")


def _proc_status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+) kB", text, re.M)}


def memory(pykvm: list[str], e: dict) -> None:
    """The VMM's own resident memory (excluding guest RAM) for guests of 128 MiB and 4 GiB touching 1 MiB."""
    print("memory: a flat 64-bit guest touches 1 MiB and spins; peak of /proc/PID/status while it runs")
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "touch.bin"
        img.write_bytes(TOUCH_1MIB)
        for mem in ("128M", "4G"):
            cmd = pykvm + ["run", str(img), "--load-addr", "0x100000", "--entry-mode", "64", "--mem", mem,
                           "--serial", "none", "--no-dump", "--timeout", "2"]
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=e)
            peak: dict[str, int] = {}
            while p.poll() is None:
                s = _proc_status(p.pid)
                own = s.get("RssAnon", 0) + s.get("RssFile", 0)
                if own > peak.get("own", 0):
                    peak = dict(s, own=own)
                time.sleep(0.02)
            print(f"  --mem {mem:5}: VMM own (anon+file) {peak.get('own', 0) / 1024:5.1f} MiB (target < 40)   "
                  f"guest shmem {peak.get('RssShmem', 0) / 1024:5.1f} MiB   VmRSS {peak.get('VmRSS', 0) / 1024:5.1f} MiB"
                  f"   (status {p.returncode}, 18 = timeout as intended)")


def import_times(py_prefix: list[str], guest: Path, e: dict, baseline: dict | None) -> dict[str, float]:
    """Import time per subcommand, from -X importtime (best of 3 runs); {subcommand: the command's own ms}.

    The command's own imports are everything after the interpreter's start-up (the top-level
    imports up to and including `site`, printed apart since an installed copy pays less there).
    """
    print("imports per subcommand (-X importtime, best of 3): the command's own self-time sum, the "
          "interpreter start-up's (site), then the 5 costliest top-level")
    own_ms: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "run": ["run", str(guest), "--serial", "none", "--no-dump"],
            "info": ["info"],
            "guests": ["guests"],
            "devices": ["devices"],
            "--help": ["--help"],
        }
        core = _make_core(py_prefix, tmp, e)
        if core:
            cases["inspect"] = ["inspect", str(core)]
        for name, args in cases.items():
            best = None
            for _ in range(3):
                r = subprocess.run(py_prefix + ["-X", "importtime", "-m", "pykvm", *args], stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, env=e)
                rows = re.findall(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$", r.stderr, re.M)
                total = sum(int(s) for s, _, _, _ in rows)
                tops = [(int(c), m) for _, c, ind, m in rows if not ind]
                names = [m for _, m in tops]
                cut = names.index("site") + 1 if "site" in names else 0
                start = sum(c for c, _ in tops[:cut])
                if best is None or total < best[0]:
                    best = (total, start, sorted(tops[cut:], reverse=True)[:5])
            total, start, top = best
            own = (total - start) / 1e3
            own_ms[name] = own
            mark = ""
            if baseline and name in baseline:
                was = baseline[name]
                grew = own - was
                mark = f"  (was {was:.1f}{'  REGRESSION' if grew > 2 and grew > 0.2 * was else ''})"
            print(f"  {name:8} {own:6.1f} ms   site {start / 1e3:5.1f} ms   "
                  + ", ".join(f"{m} {c / 1e3:.1f}" for c, m in top) + mark)
    return own_ms


def _make_core(py_prefix: list[str], tmp: str, e: dict) -> Path | None:
    r = subprocess.run(py_prefix + ["-m", "pykvm", "run", "crash-null", "--serial", "none", "--crash-dir", tmp],
                       capture_output=True, env=e)
    cores = list(Path(tmp).glob("*.core"))
    return cores[0] if r.returncode == 16 and cores else None


def main() -> None:
    """Run the three measurements."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--vm-runs", type=int, default=20, help="in-process `with VM(...)` runs (0: skip)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--venv", action="store_true", help="measure a wheel of the tree installed into a fresh venv")
    what.add_argument("--pykvm", help="command to measure (default: this python -m pykvm from the source tree)")
    ap.add_argument("--python", help="interpreter for the floor and import-time runs (default: the measured one)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--save", help="write the import times (JSON) here, for a later --baseline")
    ap.add_argument("--baseline", help="mark import-time regressions against this --save file")
    args = ap.parse_args()
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    r = subprocess.run([sys.executable, "-m", "pykvm", "guests"], capture_output=True, text=True, env=env())
    guests = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())
    if "multiboot" not in guests:
        sys.exit(f"cannot build the bundled guests: {r.stderr.strip()}")
    guest = Path(guests["multiboot"].strip())
    with tempfile.TemporaryDirectory() as tmp:
        if args.venv:
            venv = make_venv(Path(tmp))
            pykvm, python, e = [str(venv / "bin" / "pykvm")], str(venv / "bin" / "python"), env(source_tree=False)
            print(f"measuring: a wheel of {ROOT} installed into a fresh venv ({venv}), its bin/pykvm")
        else:
            python = sys.executable
            pykvm = shlex.split(args.pykvm) if args.pykvm else [python, "-m", "pykvm"]
            e = env()
            print(f"measuring: {shlex.join(pykvm)}" + ("" if args.pykvm else f" with {ROOT} on PYTHONPATH (this "
                                                       "interpreter's site-packages .pth files run at each start)"))
        python = args.python or python
        startup(pykvm, python, guest, args.pairs, e)
        if args.vm_runs:
            in_process(python, guest, args.vm_runs, e)
        if not args.skip_memory:
            memory(pykvm, e)
        own = import_times([python], guest, e, baseline)
    if args.save:
        Path(args.save).write_text(json.dumps(own, indent=1) + "\n")


if __name__ == "__main__":
    main()
