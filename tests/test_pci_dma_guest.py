"""The bundled `pci-dma` guest drives QEMU's edu device over PCI: plain DMA, then DMA through the
Intel IOMMU's page tables, a queued-invalidation wait, a recorded fault, and the edu's MSI and
INTx (through the IOAPIC) remapped by their IRTEs. `--device edu` brings the PCI host by itself."""

from __future__ import annotations

import pytest

from pykvm import errors

from .helpers import pykvm

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("mode, devices, out", [
    ("plain", ["edu"], "pci-dma: plain ok\n"),
    ("iommu", ["edu", "intel-iommu,intremap=on,eim=off"],
     "pci-dma: iommu ok, qi 0x600d, fault 0x5, msi 0x41, intx 0x42\n"),
])
def test_edu_dma_and_interrupts(mode, devices, out):
    args = [a for d in devices for a in ("--device", d)]
    r = pykvm("run", "pci-dma", "--cmdline", mode, *args, "--timeout", "30", "--no-dump", timeout=90)
    assert (r.stdout.decode(), r.returncode) == (out, 0), r.stderr.decode()


@pytest.mark.parametrize("extra, message", [
    (["--device", "intel-iommu,eim=on"], "eim=on"),
    (["--device", "intel-iommu,intremap=maybe"], "not on or off"),
    (["--device", "intel-iommu", "--irqchip", "full"], "split irqchip"),
])
def test_iommu_options_the_model_cannot_honour_are_refused(extra, message):
    r = pykvm("run", "pci-dma", "--cmdline", "plain", "--device", "edu", *extra, "--no-dump", timeout=90)
    assert r.returncode == errors.EXIT_DEVICE_CONFIG and message in r.stderr.decode(), r.stderr.decode()
