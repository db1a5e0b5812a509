"""calc's tests: pykvm's pytest plugin boots build/kernel.elf (pytest.ini) and hands each test a VM.

Tests that only talk to calc at its prompt share one boot: pykvm_snapshot_vm boots the kernel
once per session to the first "calc> ", snapshots it there, and gives each test the VM reset to
that point (RAM, registers and devices exactly as at the snapshot). Tests that end the VM or
need other options boot their own with pykvm_vm.
"""

import os
import re
import struct

import pytest
from elftools.elf.elffile import ELFFile   # pyelftools comes with pykvm


def booted(pykvm_vm, **options):
    """A calc VM at its first prompt."""
    vm = pykvm_vm(**options)
    vm.expect(b"calc> ", timeout=30)
    return vm


def at_prompt(pykvm_snapshot_vm):
    """The session's calc VM, reset to its first prompt."""
    return pykvm_snapshot_vm(ready=b"calc> ")


def test_adds_and_multiplies(pykvm_snapshot_vm):
    vm = at_prompt(pykvm_snapshot_vm)
    vm.sendline("add 2 40")
    vm.expect(b"= 42\n")
    vm.sendline("mul 6 7")
    vm.expect(re.compile(rb"= (\d+)\n"))
    assert vm.match.group(1) == b"42"


def test_unknown_commands_are_refused(pykvm_snapshot_vm):
    vm = at_prompt(pykvm_snapshot_vm)
    vm.sendline("divide 1 0")
    vm.expect(b"error: unknown command: divide 1 0\n")


@pytest.mark.pykvm_matrix(cpus=[1, 2], mem=["64M", "256M"], trust=["trusted", "untrusted"])
def test_reports_the_machine_it_runs_on(pykvm_vm, pykvm_config):
    vm = pykvm_vm()
    vm.expect(f"cpus={pykvm_config['cpus']} ram={pykvm_config['mem']}\n")


def test_exit_status_and_power_off(pykvm_vm):
    vm = booted(pykvm_vm)
    vm.sendline("exit 3")
    assert vm.wait().status == (3 << 1) | 1
    vm = booted(pykvm_vm)
    vm.sendline("off")
    assert (vm.wait().status, vm.outcome.kind) == (0, "poweroff")


def test_guest_memory_is_readable_by_symbol(pykvm_snapshot_vm):
    vm = at_prompt(pykvm_snapshot_vm)     # reset: no command of an earlier test is counted
    for _ in range(3):
        vm.sendline("add 1 1")
        vm.expect(b"calc> ")
    with open(vm.kernel, "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("commands_run")[0]
    assert struct.unpack("<Q", vm.read_virt(sym["st_value"], 8))[0] == 3


def test_each_test_starts_from_the_snapshot(pykvm_snapshot_vm):
    for _ in range(2):
        vm = at_prompt(pykvm_snapshot_vm)
        vm.sendline("add 1 1")
        vm.expect(b"= 2\n")
        vm.expect(b"calc> ")
        with open(vm.kernel, "rb") as f:
            sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("commands_run")[0]
        assert struct.unpack("<Q", vm.read_virt(sym["st_value"], 8))[0] == 1


def test_a_crash_leaves_a_core_with_a_backtrace(pykvm_vm):
    vm = booted(pykvm_vm)
    vm.sendline("crash")
    out = vm.wait()
    assert out.kind == "crash" and out.core_path.is_file()
    frames = [f.get("symbol") or "" for f in out.report()["vcpus"][0]["backtrace"]["frames"]]
    assert any("do_crash" in f for f in frames), frames


@pytest.mark.skipif(not os.environ.get("CALC_DEMO_CRASH"), reason="set CALC_DEMO_CRASH=1 to see a crash report")
def test_demo_failure_report(pykvm_vm):
    vm = booted(pykvm_vm)
    vm.sendline("crash")
    vm.expect(b"= 42")          # never comes: the failure report shows pykvm inspect's view of the core
