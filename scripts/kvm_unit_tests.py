#!/usr/bin/env python3
"""Run x86 kvm-unit-tests under pykvm and under QEMU on this host and print a pass/fail table.

    python3 scripts/kvm_unit_tests.py /tmp/kvm-unit-tests [TEST ...] [--all] [--timeout S] [--no-qemu]

The suite must already be built (./configure && make) in that directory; nothing is fetched.
Statuses are read as the suite's runner reads them: the guest's exit(0) through isa-debug-exit
is status 1 (PASS); a test that skipped itself returns 77 >> 1 from report_summary(), which
debug-exit makes (38 << 1) | 1 = 77 (SKIP, autotools' number); anything else fails. Entries are
chosen as the suite's runner chooses them: a `check = PATH=VALUE ...` line whose files do not
hold those values skips the entry, and an entry in the `nodefault` group runs only when named
(or with --all). QEMU runs `-M pc` with pc-testdev and isa-debug-exit, as kvm-unit-tests' own
runner does; pykvm gets the same vCPU count, command line and test arguments on `--machine pc`
with the same test devices added.
"""

from __future__ import annotations

import argparse
import configparser
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))    # this tree's pykvm (its CPU feature names), as the runs below use

# kvm-unit-tests adds pc-testdev to QEMU's -M pc; pykvm's pc preset leaves its test devices out too
PYKVM_MACHINE = ["--machine", "pc", "--device", "pc-testdev", "--device", "pc-testdev-irq"]
STATUS = {1: "PASS", 77: "SKIP"}


def entries(cfg_path: Path, wanted: list[str]):
    """(name, section) of every x86_64 entry in unittests.cfg, in file order."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.read(cfg_path)
    for name in cp.sections():
        sec = cp[name]
        if sec.get("arch", "x86_64") != "x86_64" or (wanted and name not in wanted):
            continue
        yield name, sec


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def entry_timeout(value: str | None, default: float) -> float:
    """An entry's own `timeout` (coreutils timeout syntax: 90, 90s, 5m...), else `default`."""
    text = (value or "").strip()
    unit = text[-1:] if text[-1:] in "smhd" else ""
    try:
        seconds = float(text[:len(text) - len(unit)]) * _UNITS[unit]
    except ValueError:
        return default
    return seconds if 0 < seconds < 1e6 else default


def test_args(raw: str) -> str:
    """The guest command line an entry's test_args make once a shell has read them, as kvm-unit-tests'
    runner passes them: quotes removed, and sieve's `date +%s` replaced by the time now."""
    raw = raw.replace("`date +%s`", str(int(time.time())))
    try:
        return " ".join(shlex.split(raw))
    except ValueError:        # unbalanced quotes: what the file says
        return raw


def verdict(rc: int | None) -> str:
    """PASS / SKIP / TIMEOUT / FAIL (rc N), as the suite's runner reads a debug-exit status."""
    if rc is None:
        return "TIMEOUT"
    return STATUS.get(rc, f"FAIL (rc {rc})")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def unmet_check(check: str | None, read=_read) -> str | None:
    """Why an entry's `check = PATH=VALUE ...` rules it out here ("PATH not equal to VALUE"), or None.

    As the suite's runner does: each word is PATH=VALUE (split at the first '='), and the file's
    text with its trailing newlines removed (what `$(cat PATH)` gives) must equal VALUE; a file
    that cannot be read holds nothing.
    """
    for word in (check or "").split():
        path, _eq, value = word.partition("=")
        if not path:
            continue
        text = read(path)
        if (text or "").rstrip("\n") != value:
            return f"{path} not equal to {value}"
    return None


def nodefault(sec) -> bool:
    """Whether the entry is in the `nodefault` group (run only when asked for by name)."""
    return "nodefault" in (sec.get("groups") or "").split()


def cpu_option(qemu_params: str) -> list[str]:
    """`--cpu host,-f...` for the features QEMU's -cpu turns off (pykvm starts from the host's CPUID)."""
    from pykvm.boot.cpumodel import FEATURES
    words = shlex.split(qemu_params)
    spec = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "-cpu"), "")
    off = [t for t in spec.split(",")[1:] if t.startswith("-") and t[1:] in FEATURES]
    return ["--cpu", ",".join(["host"] + off)] if off else []


QEMU_DEVICES = {"edu": "edu", "intel-iommu": "intel-iommu"}     # QEMU -device name -> pykvm --device name
QEMU_DEVICE_OPTIONS = {"intel-iommu": ("intremap", "eim")}


def device_options(qemu_params: str) -> list[str]:
    """`--device` options for what qemu_params add: `-M q35` brings the PCI host, `-device edu` and
    `-device intel-iommu,...` their models (with the options pykvm's model knows)."""
    words = shlex.split(qemu_params)
    out = []
    for flag, value in zip(words, words[1:]):
        if flag in ("-M", "-machine") and value.split(",")[0] == "q35":
            out += ["--device", "pci-host"]
        elif flag == "-device":
            name, *opts = value.split(",")
            if name in QEMU_DEVICES:
                keep = [o for o in opts if o.partition("=")[0] in QEMU_DEVICE_OPTIONS.get(name, ())]
                out += ["--device", ",".join([QEMU_DEVICES[name]] + keep)]
    return out


def run(cmd: list[str], timeout: float, env=None) -> tuple[int | None, float, bytes]:
    """Exit status (None on timeout), wall seconds and stderr."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, env=env)
        return p.returncode, time.monotonic() - t0, p.stderr
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - t0, b""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", type=Path)
    ap.add_argument("tests", nargs="*")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds for entries without their own timeout")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--all", action="store_true", help="also run the entries in the nodefault group")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    for name, sec in entries(a.suite / "x86" / "unittests.cfg", a.tests):
        flat = a.suite / "x86" / sec["file"]
        why = "manual run only (nodefault)" if nodefault(sec) and not a.all and name not in a.tests else \
            unmet_check(sec.get("check"))
        if why:
            rows.append((name, f"SKIP ({why})", "-" if a.no_qemu else f"SKIP ({why})"))
            print(f"{name:32} SKIP ({why})", flush=True)
            continue
        smp = sec.get("smp", "1").split()[0]
        if not smp.isdigit():
            rows.append((name, "n/a", "n/a"))
            continue
        args = test_args(sec.get("test_args", ""))
        timeout = entry_timeout(sec.get("timeout"), a.timeout)
        pk = [sys.executable, "-m", "pykvm", "run", str(flat), "--cpus", smp, "--mem", "256M",
              "--timeout", str(timeout), "--no-dump", "--serial", "none", "--cmdline", args]
        pk += cpu_option(sec.get("qemu_params", ""))
        pk += PYKVM_MACHINE + device_options(sec.get("qemu_params", ""))
        rc, secs, _err = run(pk, timeout + 30, env)
        pk_v = f"{verdict(rc)} ({secs:.1f}s)"
        q_v = "-"
        if not a.no_qemu:
            q = ["qemu-system-x86_64", "-machine", "pc,accel=kvm", "-m", "256", "-smp", smp, "-display", "none",
                 "-serial", "null", "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
                 "-kernel", str(flat), "-append", args] + shlex.split(sec.get("qemu_params", ""))
            rc, secs, err = run(q, timeout)
            # QEMU's own start-up errors (an unknown -cpu model, a missing device) also exit with 1
            failed = any(b"qemu-system" in line and b"warning" not in line for line in err.splitlines())
            q_v = "QEMU error" if rc == 1 and failed else f"{verdict(rc)} ({secs:.1f}s)"
        rows.append((name, pk_v, q_v))
        print(f"{name:32} {pk_v:22} {q_v}", flush=True)
    print()
    print(f"| test | pykvm | QEMU -M pc |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
