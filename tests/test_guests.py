"""Boot every bundled guest with the real `pykvm run` and assert its exact serial output and status."""

import re

import pytest

from .helpers import guest, pykvm

pytestmark = pytest.mark.kvm


def run_ok(*args, timeout=60):
    r = pykvm("run", *args, "--timeout", "30", timeout=timeout)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def test_hello():
    status, out, err = run_ok("hello", "--cmdline", "x=1 y", "--mem", "64M")
    assert out == "Hello from pykvm!\ncpus=1 ram=64M\ncmdline=x=1 y\n", err
    assert status == 0


def test_hello_serial_to_file(tmp_path):
    log = tmp_path / "serial.log"
    status, out, _ = run_ok("hello", "--serial", str(log))
    assert status == 0 and out == ""
    assert log.read_text() == "Hello from pykvm!\ncpus=1 ram=128M\ncmdline=\n"


def test_exits_guest_exercises_every_exit_kind():
    status, out, err = run_ok("exits")
    checks = ["pio-out8", "pio-in8", "pio-out16", "pio-in16", "pio-out32", "pio-in32", "rep-outsb", "rep-insb",
              "mmio-read", "mmio-write", "fwcfg-signature", "fwcfg-cpus", "fwcfg-ram", "pvpanic", "cpuid",
              "msr-apicbase", "lapic-mmio", "lapic-timer"]
    assert out == "exits: start\n" + "".join(f"{c} ok\n" for c in checks) + "exits: all ok\n", err
    assert status == (0x21 << 1) | 1


def test_trace_io_counts_unclaimed_accesses():
    r = pykvm("run", "exits", "--trace-io", "--timeout", "30")
    err = r.stderr.decode()
    assert r.returncode == 0x43
    assert "unclaimed" in err and "mmio 0xd0000000" in err


def test_strict_io_makes_unclaimed_access_fatal():
    r = pykvm("run", "exits", "--strict-io", "--no-dump", "--timeout", "30")
    assert r.returncode == 16
    assert "claimed by no device (--strict-io)" in r.stderr.decode()


@pytest.mark.parametrize("name", ["multiboot", "multiboot-kludge"])
def test_multiboot(name, tmp_path):
    initrd = tmp_path / "initrd.txt"
    initrd.write_text("module zero\nsecond line\n")
    status, out, err = run_ok(name, "--cmdline", "a b", "--initrd", str(initrd), "--mem", "128M")
    assert out == ("multiboot: magic ok\nflags=0x24d\nmem_lower=64K mem_upper=130048K\n"
                   f"cmdline={name} a b\nmmap entries=3\nmods=1\nmod0: module zero\nfwcfg cpus=1\nmultiboot ok\n"), err
    assert status == 1


def test_higher_half_kernel_runs_at_its_virtual_addresses():
    from elftools.elf.elffile import ELFFile

    with open(guest("higherhalf"), "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        kmain = symtab.get_symbol_by_name("kmain")[0]["st_value"]
        data = symtab.get_symbol_by_name("hh_data")[0]["st_value"]
    status, out, err = run_ok("higherhalf", "--cmdline", "hh")
    assert out == ("higherhalf: running in the top 2 GiB\n"
                   f"kmain={kmain:#x} hh_data={data:#x}\n"
                   f"phys: kmain={kmain - 0xffffffff80000000:#018x} hh_data={data - 0xffffffff80000000:#018x}\n"
                   "boot info: cpus=1 cmdline=hh\nhigherhalf ok\n"), err
    assert status == (0x11 << 1) | 1


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_brings_up_every_vcpu(cpus):
    status, out, err = run_ok("smp", "--cpus", str(cpus))
    expected = f"smp: nr_cpus={cpus}\n" + "".join(f"cpu {i} online (apic id {i})\n" for i in range(cpus))
    assert out == expected + f"smp: {cpus} cpus online\n", err
    assert status == 37


def test_full_irqchip_runs_the_same_guest():
    status, out, _ = run_ok("smp", "--cpus", "2", "--irqchip", "full")
    assert status == 37 and out.endswith("smp: 2 cpus online\n")


def test_timeout_stops_a_hung_guest(tmp_path):
    hang = tmp_path / "hang.bin"
    hang.write_bytes(b"\xeb\xfe")  # jmp $
    r = pykvm("run", str(hang), "--load-addr", "0x8000", "--entry-mode", "16", "--timeout", "0.5",
              "--crash-dir", str(tmp_path / "cores"))
    assert r.returncode == 18
    assert re.search(r"--timeout 0.5s", r.stderr.decode())
