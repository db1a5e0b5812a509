"""examples/calc builds with its own Makefile and its tests pass under the pytest plugin."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import require_tool
from .test_pytest_plugin import plugin_args

CALC = Path(__file__).resolve().parent.parent / "examples" / "calc"


@pytest.mark.kvm
def test_calc_example_builds_and_its_tests_pass(pytester, tmp_path):
    require_tool("make")
    build = tmp_path / "build"
    r = subprocess.run(["make", "-s", "-C", str(CALC), f"BUILD={build}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kernel = build / "kernel.elf"
    assert kernel.read_bytes()[:4] == b"\x7fELF"
    result = pytester.runpytest_subprocess(
        *plugin_args(), "-c", str(CALC / "pytest.ini"), "-p", "no:cacheprovider", "-rs",
        "--pykvm-kernel", str(kernel), str(CALC / "tests"), timeout=600)
    result.assert_outcomes(passed=14, skipped=1)
    assert not (CALC / "build").exists()   # everything went to tmp_path


EXAMPLES = CALC.parent


def pykvm_on_path(tmp_path: Path) -> dict:
    """An environment whose `pykvm` is this tree's, run by this interpreter (as an installed one would be)."""
    import os
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "pykvm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pykvm "$@"\n')
    shim.chmod(0o755)
    root = str(EXAMPLES.parent)
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}",
                PYTHONPATH=f"{root}:{path}" if path else root)


def _sector(seed: int, s: int) -> bytes:
    """bus-block's write pattern (seed 0: bus-blocksvc's initial RAM disk)."""
    return bytes((seed * 73 + s * 151 + i * 7 + (i >> 8)) & 0xff for i in range(512))


def _copy_and_up(tmp_path: Path, name: str):
    work = tmp_path / "work"
    work.mkdir()
    (work / name).write_text((EXAMPLES / "partitions" / name).read_text())
    return work, lambda: subprocess.run(["pykvm", "up", name], cwd=work, env=pykvm_on_path(tmp_path),
                                        capture_output=True, text=True, timeout=600)


@pytest.mark.kvm
def test_two_partitions_example(tmp_path):
    work, up = _copy_and_up(tmp_path, "two-partitions.toml")
    r = up()
    run = work / "up-two-partitions"
    client = (run / "client.serial").read_text()
    assert r.returncode == 0, (r.stdout, r.stderr, client)
    assert "partition storage: status 0" in r.stdout and "partition client: status 0" in r.stdout
    assert "block: read back 16 sectors at 100: pattern ok\n" in client and client.endswith("block: done\n")


@pytest.mark.kvm
def test_service_and_clients_example(tmp_path):
    work, up = _copy_and_up(tmp_path, "service-clients.toml")
    r = up()
    assert r.returncode == 34 and "disk.img" in r.stderr       # the disk file must exist first, as it says
    subprocess.run(["truncate", "-s", "1M", "disk.img"], cwd=work, check=True)
    r = up()
    run = work / "up-service-clients"
    trusted, untrusted = (run / "trusted.serial").read_text(), (run / "untrusted.serial").read_text()
    assert r.returncode == 0, (r.stdout, r.stderr, trusted, untrusted)
    assert "block: read back 40 sectors at 100: pattern ok\n" in trusted
    assert "read-only 1\n" in untrusted and "block: write refused: read-only\n" in untrusted
    assert "refused: untrusted may not write to disk0" in (run / "untrusted.log").read_text()
    disk = (work / "disk.img").read_bytes()        # the trusted client's 40 sectors, nothing of the untrusted one
    assert len(disk) == 1 << 20
    for s in range(2048):
        want = _sector(3, s) if 100 <= s < 140 else bytes(512)
        assert disk[s * 512:(s + 1) * 512] == want, f"sector {s}"


@pytest.mark.kvm
def test_vnuma_example(tmp_path):
    import json

    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run(["sh", str(EXAMPLES / "numa" / "two-nodes.sh")], cwd=work, env=pykvm_on_path(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "numa-mem: checksums ok:" in r.stdout
    events = [json.loads(line) for line in (work / "mem.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"report", "balloon", "hotadd"} <= kinds, kinds
    assert {e["node"] for e in events if e["event"] == "balloon"} == {0}
