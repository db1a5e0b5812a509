"""The bundled `acpi` guest finds the tables as a kernel does, checks them and powers off through them."""

from __future__ import annotations

import os

import pytest

from pykvm.boot import acpi
from pykvm.boot.acpi import Node, Topology

from .helpers import guest, pykvm

pytestmark = pytest.mark.kvm

MIB = 1 << 20


def expected(cpus: int, xsdt: str = "FACP APIC", numa: str = "srat: none\nslit: none\n") -> str:
    return ('acpi: rsdp at 0xe0000 rev 2 oem "PYKVM "\n'
            "acpi: boot info rsdp matches\n"
            "acpi: rsdt matches xsdt\n"
            f"acpi: xsdt: {xsdt}\n"
            "madt: lapic 0xfee00000 pcat 0\n"
            + "".join(f"madt: cpu {i} apic {i}\n" for i in range(cpus))
            + f"madt: {cpus} cpus, 0 ioapics\n"
            "fadt: sci 9 pm1a_evt 0x600 pm1a_cnt 0x604 pm_tmr 0x0 hw_reduced 0\n"
            "facs: ok\n"
            "dsdt: _S5 slp_typ 0\n"
            + numa +
            "acpi: ok, powering off through PM1a_CNT\n")


@pytest.mark.parametrize("cpus", [1, 4])
def test_guest_walks_the_tables_pykvm_run_gives(cpus):
    r = pykvm("run", "acpi", "--cpus", str(cpus), "--timeout", "30")
    assert r.stdout.decode() == expected(cpus), r.stderr.decode()
    assert r.returncode == 0   # powered off through the FADT's PM1a_CNT with the DSDT's _S5 SLP_TYP


def test_guest_reads_a_numa_topology(tmp_path, monkeypatch):
    # vNUMA does not exist yet: hand the loader a two-node topology in-process, over 64 MiB of RAM
    from pykvm.machine import Machine, MachineConfig

    topo = Topology((0, 1, 2), (Node((0, 2), ((0, 32 * MIB),)),
                                Node((1,), ((32 * MIB, 32 * MIB),), ((1 << 32, 256 * MIB),))),
                    ((10, 21), (21, 10)))
    monkeypatch.setattr(acpi, "default_topology", lambda n: topo)
    log = tmp_path / "serial"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with Machine(MachineConfig(kernel=guest("acpi"), mem=64 * MIB, cpus=3, serial_out=fd, timeout=30)) as m:
            outcome = m.run()
    finally:
        os.close(fd)
    numa = ("srat: cpu apic 0 node 0\n"
            "srat: cpu apic 1 node 1\n"
            "srat: cpu apic 2 node 0\n"
            "srat: mem 0x0+0x2000000 node 0 enabled\n"
            "srat: mem 0x2000000+0x2000000 node 1 enabled\n"
            "srat: mem 0x100000000+0x10000000 node 1 enabled hotplug\n"
            "slit: 2 localities\n"
            "slit: 10 21\n"
            "slit: 21 10\n")
    assert log.read_text() == expected(3, "FACP APIC SRAT SLIT", numa)
    assert outcome.status == 0 and outcome.kind == "poweroff", outcome.reason
