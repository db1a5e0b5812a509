"""The bundled `pc-hostile` guest attacks the PC platform models the way issue 19 found them failing:
an MSI or DMA aimed at nothing, interrupts no local APIC takes (from a vCPU, from the PIT and RTC
threads, from the IOMMU's events), and a PCI BAR walked over every base. Each once ended pykvm with
status 20, a dead timer thread or tens of megabytes of policy tables; now the guest runs to its end."""

from __future__ import annotations

import pytest

from pykvm.api import VM

from .helpers import pykvm

pytestmark = pytest.mark.kvm

DONE = (0x23 << 1) | 1
PLATFORM = ["edu", "intel-iommu", "pit", "rtc", "acpi-pm", "pc-testdev-irq"]


def run(mode, devices, *extra):
    args = [a for d in devices for a in ("--device", d)]
    r = pykvm("run", "pc-hostile", "--cmdline", mode, *args, *extra, "--timeout", "60", "--no-dump", timeout=120)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


@pytest.mark.parametrize("devices", [["edu"], ["edu", "intel-iommu"]], ids=["bus", "iommu"])
def test_an_msi_or_dma_to_nothing_is_a_master_abort(devices):
    status, out, err = run("msi-nonram", devices)
    assert (status, out) == (DONE, "pc-hostile: msi-nonram ok, master abort 1 1\n"), err
    assert "internal error" not in err and "Traceback" not in err


@pytest.mark.parametrize("devices", [PLATFORM, ["pit", "rtc", "acpi-pm"]], ids=["platform", "timers"])
def test_interrupts_no_lapic_takes_are_dropped_and_the_timers_keep_ticking(devices):
    # "timers": only the PIT and RTC threads meet the refusal, which used to kill them silently
    status, out, err = run("msi-nobody", devices)
    assert (status, out) == (DONE, "pc-hostile: msi-nobody ok, pit ticks, rtc ticks\n"), err
    assert "internal error" not in err and "Traceback" not in err


def test_walking_a_bar_over_every_base_leaves_no_table_per_base():
    with VM("pc-hostile", cmdline="bar-walk", devices=["edu"], timeout=120, start=False) as vm:
        outcome = vm.run()
        policy = vm.machine.policy
        assert (outcome.status, vm.transcript) == (DONE, b"pc-hostile: bar-walk 4095 moves, edu ok\n")
        assert [k for k in policy._ranges if k[0] == "edu"] == [("edu", "mmio", 0)]
        assert [k for k in policy.decisions if k[0] == "edu"] == [("edu", "mmio", 0xFE800000)]
        # the identification read before the walk and the one after it: the counts moved with the BAR
        assert policy.stats()["edu"]["id"]["allow"] == 2
