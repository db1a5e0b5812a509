"""The bundled `pc-irq` guest takes the PC platform's interrupts: the PIT through the IOAPIC and
through the 8259, and a level-triggered line the IOAPIC must deliver again after an EOI that
leaves it high (the kvm-unit-tests ioapic retrigger case, which this host's KVM can only pass
with the machine's EOI watch: see pykvm/machine/eoi_watch.py)."""

from __future__ import annotations

import pytest

from .helpers import pykvm

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("mode, devices, out", [
    ("pit-ioapic", ["pit"], "pit-ioapic: 5 ticks\n"),
    ("pit-pic", ["pic", "pit"], "pit-pic: 5 ticks\n"),
    ("retrigger", ["pc-testdev-irq"], "retrigger: 2 interrupts\n"),
])
def test_interrupts_arrive_as_programmed(mode, devices, out):
    args = [a for d in devices for a in ("--device", d)]
    r = pykvm("run", "pc-irq", "--cmdline", mode, *args, "--timeout", "30", "--no-dump", timeout=90)
    assert r.stdout.decode() == out, r.stderr.decode()
    assert r.returncode == 0


def test_an_unknown_mode_is_reported():
    r = pykvm("run", "pc-irq", "--cmdline", "nmi", "--timeout", "30", "--no-dump", timeout=90)
    assert (r.stdout.decode(), r.returncode) == ("pc-irq: unknown mode\n", 2 << 1 | 1)
