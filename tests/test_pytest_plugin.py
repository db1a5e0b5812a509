"""The pytest plugin, driven through pytest's own pytester: fixtures, the matrix marker, crash reports."""

from __future__ import annotations

import tomllib
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def plugin_args() -> list[str]:
    """-p for the plugin unless its entry point is installed (loading it twice is an error)."""
    if any(ep.value == "pykvm.pytest_plugin" for ep in entry_points(group="pytest11")):
        return []
    return ["-p", "pykvm.pytest_plugin"]


def test_registered_as_a_pytest11_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"pykvm": "pykvm.pytest_plugin"}


def test_matrix_marker_needs_keyword_lists(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.pykvm_matrix(cpus=[])
        def test_empty(pykvm_config):
            pass
    """)
    r = pytester.runpytest(*plugin_args())
    assert r.ret != 0
    r.stdout.fnmatch_lines(["*pykvm_matrix(cpus=...) needs a non-empty list*"])


def test_matrix_expands_to_one_case_per_combination_without_booting(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.pykvm_matrix(cpus=[1, 2], trust=["trusted", "untrusted"])
        def test_cfg(pykvm_config):
            assert set(pykvm_config) == {"cpus", "trust"}
    """)
    r = pytester.runpytest(*plugin_args(), "-v")
    r.assert_outcomes(passed=4)
    r.stdout.fnmatch_lines(["*test_cfg?cpus=1-trust=trusted? PASSED*", "*test_cfg?cpus=2-trust=untrusted? PASSED*"])


@pytest.mark.kvm
def test_fixture_boots_a_kernel_and_hands_over_the_vm(pytester):
    pytester.makepyfile("""
        import re

        def test_hello(pykvm_vm):
            vm = pykvm_vm("hello", mem="64M", cmdline="from-a-test")
            m = vm.expect(re.compile(rb"ram=(\\d+)M"))
            assert m.group(1) == b"64"
            vm.expect(b"cmdline=from-a-test\\n")
            out = vm.wait()
            assert (out.status, out.kind) == (0, "poweroff")
            assert out.transcript.startswith(b"Hello from pykvm!\\n")
    """)
    pytester.runpytest(*plugin_args()).assert_outcomes(passed=1)


@pytest.mark.kvm
def test_matrix_runs_one_kernel_under_each_configuration(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.pykvm_matrix(cpus=[1, 2], mem=["64M", "96M"], trust=["untrusted"])
        def test_hello(pykvm_vm, pykvm_config):
            vm = pykvm_vm("hello")
            want = "cpus=%d ram=%s" % (pykvm_config["cpus"], pykvm_config["mem"])
            vm.expect(want.encode())
            assert vm.wait().status == 0
    """)
    r = pytester.runpytest(*plugin_args(), "-v")
    r.assert_outcomes(passed=4)
    r.stdout.fnmatch_lines(["*test_hello?cpus=2-mem=96M-trust=untrusted? PASSED*"])


CRASHING_TEST = """
    def test_guest_crashes(pykvm_vm):
        vm = pykvm_vm("crash-null")
        vm.expect(b"this never comes", timeout=60)
"""


@pytest.mark.kvm
def test_a_crashing_guest_fails_the_test_with_the_inspect_report_and_junit_core(pytester):
    pytester.makepyfile(CRASHING_TEST)
    xml = pytester.path / "junit.xml"
    r = pytester.runpytest(*plugin_args(), f"--junitxml={xml}")
    r.assert_outcomes(failed=1)
    out = r.stdout.str()
    assert "EOF: expect(b'this never comes'): the VM ended (crash:" in out
    r.stdout.fnmatch_lines([
        "*- pykvm crash: *pykvm-crashes/pykvm-*.core -*",
        "crash: guest crashed on vCPU 0: exception #PF page fault*",
        "inspect: pykvm inspect *.core --kernel *crash-null.elf",
        "*trigger:*#PF page fault (vector 14)*",
        "*rip 0x*",
        "*backtrace*",
        "*crash-null: about to dereference NULL*",
    ])
    assert "c ()" in out or " c" in out   # the backtrace names the guest's functions (kmain -> a -> b -> c)
    props = [p.attrib for p in ET.parse(xml).iter("property")]
    assert [p["name"] for p in props] == ["pykvm_core"]
    core = Path(props[0]["value"])
    assert core.is_file() and core.parent.name == "pykvm-crashes"
    assert core.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.kvm
def test_parallel_runs_write_cores_to_distinct_directories(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_a=CRASHING_TEST, test_b=CRASHING_TEST)
    xml = pytester.path / "junit.xml"
    r = pytester.runpytest_subprocess(*plugin_args(), "-n", "2", f"--junitxml={xml}", timeout=300)
    r.assert_outcomes(failed=2)
    cores = [Path(p.attrib["value"]) for p in ET.parse(xml).iter("property") if p.attrib["name"] == "pykvm_core"]
    assert len(cores) == 2 and all(c.is_file() for c in cores)
    assert cores[0].parent != cores[1].parent


@pytest.mark.kvm
def test_snapshot_fixture_hands_each_test_the_vm_reset_to_its_ready_point(pytester):
    pytester.makepyfile("""
        import struct

        SCRATCH = 0x3f00000      # guest RAM the scribble guest never writes

        def test_first(pykvm_snapshot_vm):
            vm = pykvm_snapshot_vm("scribble", ready=b" cpus\\n", mem="64M", cpus=2)
            assert vm.read_phys(SCRATCH, 8) == bytes(8)
            vm.write_phys(SCRATCH, b"leftover")
            vm.send(b"unread input")

        def test_second(pykvm_snapshot_vm):
            vm = pykvm_snapshot_vm("scribble", ready=b" cpus\\n", mem="64M", cpus=2)
            assert vm.read_phys(SCRATCH, 8) == bytes(8)       # the first test's write is gone
            assert vm.running

        def test_guest_call_ready_point_and_a_test_that_ends_the_vm(pykvm_snapshot_vm):
            for _ in range(2):           # the first run crashes the VM: the second boots afresh
                vm = pykvm_snapshot_vm("fuzz-target", ready="guest", mem="64M")
                port = vm.machine.built["fuzz"]
                assert vm.paused                 # held at its snapshot call until the input is in place
                vm.write_phys(port.input_gpa, struct.pack("<II", 8, 0) + b"C\\x06PYKVM!")   # the comparison chain (tests/test_fuzz.py BUG_CHAIN)
                vm.resume()
                out = vm.wait(60)
                assert out.kind == "crash" and "page fault" in out.reason
    """)
    pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider").assert_outcomes(passed=3)
