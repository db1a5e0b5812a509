"""Transfer page sets: host->guest bulk data through read-only pages of the channel's own."""

from __future__ import annotations

import os

import pytest

from pykvm import abi
from pykvm.bus.transfer import TransferError, TransferPageSet

from .helpers import pykvm


def fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


class FakeMemslots:
    def __init__(self):
        self.maps = {}

    def map(self, gpa, size, host_addr, readonly=True):
        slot = 200 + len(self.maps)
        self.maps[slot] = (gpa, size, readonly)
        return slot

    def unmap(self, slot):
        del self.maps[slot]


def test_allocator_places_releases_and_refuses_reuse_and_overflow():
    slots = FakeMemslots()
    xs = TransferPageSet(slots, 0xE0100000, 2)
    assert slots.maps == {200: (0xE0100000, 8192, True)}
    a = xs.place(1, b"a" * 5000)
    b = xs.place(2, b"b" * 3000)
    assert (a, b) == (0, 5056)
    with pytest.raises(TransferError):
        xs.place(2, b"again")                 # a transaction holds one range
    with pytest.raises(TransferError):
        xs.place(3, b"c" * 200)               # 8192 - 5056 - 3008 = 128 bytes left
    xs.release(1)
    with pytest.raises(TransferError):
        xs.release(1)                          # not twice
    assert xs.place(3, b"c" * 4000) == 0       # freed space is reused
    xs.release(2)
    xs.release(3)
    assert xs.free_bytes == 8192
    xs.close()
    assert slots.maps == {}                    # the guest's mapping goes with the set


@pytest.mark.kvm
def test_block_reads_through_transfer_pages(tmp_path):
    disk = tmp_path / "disk.img"
    data = os.urandom(64 * 512)
    disk.write_bytes(data)
    r = pykvm("run", "bus-xfer", "--disk", str(disk), "--timeout", "60", "--cmdline", "rounds=20 count=8")
    gpa = abi.PYKVM_BUS_XFER_BASE + 4 * abi.PYKVM_BUS_XFER_STRIDE     # relid 4: echo, shutdown, heartbeat, block
    assert r.stdout.decode() == (f"xfer: pages at {gpa:#x}, {abi.PYKVM_BUS_XFER_PAGES} pages\n"
                                 f"xfer: 20 reads of 8 sectors, fnv1a {fnv1a(data[:4096]):08x}\n"
                                 "xfer: write to the transfer pages ignored: yes\n"), r.stderr.decode()
    assert r.returncode == 0
    assert disk.read_bytes() == data
