"""The bus's block storage service: the bus-block guest against a host file, and BlockSession against a model."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.bus.ring import COMPLETION, GPA_DIRECT, INBAND, XFER_PAGES, Packet
from pykvm.bus.services.base import ServiceError
from pykvm.bus.services.block import BlockSession, Disk
from pykvm.control.client import request
from pykvm.memory import GuestMemoryError

from .helpers import ROOT, pykvm

SECTOR = 512
PAGE = 4096
MASK64 = (1 << 64) - 1


def pattern(seed: int, s: int) -> bytes:
    """Sector s as bus-block writes it with this seed (formula in its header comment)."""
    return bytes((seed * 73 + s * 151 + i * 7 + (i >> 8)) & 0xFF for i in range(SECTOR))


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def old_disk(path, sectors: int) -> bytes:
    """Fill path with `sectors` sectors of content the guest's patterns never produce."""
    data = b"".join(pattern(250, s)[::-1] for s in range(sectors))
    path.write_bytes(data)
    return data


def run_block(disk: str, cmdline: str, *extra):
    return pykvm("run", "bus-block", "--disk", disk, "--cmdline", cmdline, "--timeout", "60", *extra)


# ---------------------------------------------------------------- the guest, end to end
@pytest.mark.kvm
def test_writes_land_in_the_file_byte_for_byte(tmp_path):
    img = tmp_path / "disk.img"
    before = old_disk(img, 96)
    r = run_block(str(img), "rsec=3 rcount=5 wsec=40 wcount=21 seed=7")
    assert r.stdout.decode() == (
        "bus: connected, version 1.0, 4 offers\n"
        "block: open, version 1.0\n"
        "block: 96 sectors of 512 bytes, read-only 0\n"
        f"block: read 5 sectors at 3: fnv1a 0x{fnv1a(before[3 * SECTOR:8 * SECTOR]):016x}\n"
        "block: wrote 21 sectors at 40\n"
        "block: flushed\n"
        "block: read back 21 sectors at 40: pattern ok\n"
        "block: read at sector 96: invalid request\n"
        "block: done\n"), r.stderr
    assert r.returncode == 0, r.stderr
    expected = bytearray(before)
    for s in range(40, 61):
        expected[s * SECTOR:(s + 1) * SECTOR] = pattern(7, s)
    assert img.read_bytes() == bytes(expected)


@pytest.mark.kvm
def test_read_only_disk_refuses_writes_and_stays_unchanged(tmp_path):
    img = tmp_path / "disk.img"
    before = old_disk(img, 64)
    r = run_block(f"{img},ro", "seed=3 wsec=0 wcount=16")
    assert r.stdout.decode() == (
        "bus: connected, version 1.0, 4 offers\n"
        "block: open, version 1.0\n"
        "block: 64 sectors of 512 bytes, read-only 1\n"
        f"block: read 8 sectors at 0: fnv1a 0x{fnv1a(before[:8 * SECTOR]):016x}\n"
        "block: write refused: read-only\n"
        "block: flushed\n"
        "block: read at sector 64: invalid request\n"
        "block: done\n"), r.stderr
    assert r.returncode == 0, r.stderr
    assert img.read_bytes() == before


@pytest.mark.kvm
def test_crash_mid_write_never_tears_a_sector(tmp_path):
    img = tmp_path / "disk.img"
    before = old_disk(img, 160)
    r = run_block(str(img), "crash=1 seed=9 wsec=20 wcount=128", "--crash-dir", str(tmp_path / "cores"))
    assert r.stdout.decode() == ("bus: connected, version 1.0, 4 offers\n"
                                 "block: open, version 1.0\n"
                                 "block: 32 writes in flight, crashing\n"), r.stderr
    assert r.returncode == 16, r.stderr
    assert b"#PF" in r.stderr
    after = img.read_bytes()
    assert len(after) == len(before)
    for s in range(160):
        sector = after[s * SECTOR:(s + 1) * SECTOR]
        old = before[s * SECTOR:(s + 1) * SECTOR]
        if 20 <= s < 148:
            assert sector in (old, pattern(9, s)), f"sector {s} is torn"
        else:
            assert sector == old, f"sector {s} outside the writes changed"


@pytest.mark.kvm
def test_stopping_the_vm_while_writes_stream_never_tears_a_sector(tmp_path):
    img, sock, serial = tmp_path / "disk.img", str(tmp_path / "vm.sock"), tmp_path / "serial.log"
    before = old_disk(img, 64)
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "bus-block", "--disk", str(img), "--cmdline",
                             "crash=2 seed=4 wsec=10 wcount=32", "--control", sock, "--serial", str(serial),
                             "--timeout", "60", "--no-dump"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        writes = 0
        while writes < 24:          # three rounds over the 8 requests: every sector written at least once
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the guest did not stream writes"
            if os.path.exists(sock) and serial.exists() and "writing until stopped" in serial.read_text():
                (blk,) = [c for c in request(sock, {"cmd": "stats"})["bus"]["channels"] if c["service"] == "block"]
                writes = blk["session"]["write"]
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)     # the host stops the VM with requests in the ring
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert serial.read_text() == ("bus: connected, version 1.0, 4 offers\n"
                                  "block: open, version 1.0\n"
                                  "block: writing until stopped\n")
    after = img.read_bytes()
    assert len(after) == len(before)
    for s in range(64):
        sector = after[s * SECTOR:(s + 1) * SECTOR]
        if 10 <= s < 42:
            assert sector in (pattern(4, s), pattern(5, s)), f"sector {s} is torn"
        else:
            assert sector == before[s * SECTOR:(s + 1) * SECTOR], f"sector {s} outside the writes changed"


@pytest.mark.kvm
def test_without_a_disk_there_is_no_block_offer():
    r = pykvm("run", "bus-block", "--bus", "--timeout", "60")
    assert r.stdout.decode() == ("bus: connected, version 1.0, 3 offers\n"
                                 "block: no block offer (run with --disk FILE)\n")
    assert r.returncode == (3 << 1) | 1


# ---------------------------------------------------------------- BlockSession against a model
RAM_PAGES = 16
DISK_SECTORS = 40
TAIL = 100          # bytes after the last whole sector: never part of the disk


class FakeChannel:
    """What BlockSession uses of a Channel: send() and guest memory, over a bytearray of RAM."""

    def __init__(self):
        self.ram = bytearray(os.urandom(RAM_PAGES * PAGE))
        self.sent = []
        self.xfer = None        # no transfer pages: in-band reads are refused

    def send(self, ptype, payload=b"", trans_id=0, flags=0, header=b""):
        self.sent.append((ptype, bytes(payload), trans_id))

    def _check(self, gpa, n):
        if gpa < 0 or gpa + n > len(self.ram):
            raise GuestMemoryError(f"{n} bytes at {gpa:#x} are outside RAM")

    def guest_read(self, gpa, n):
        self._check(gpa, n)
        return bytes(self.ram[gpa:gpa + n])

    def guest_write(self, gpa, data):
        self._check(gpa, len(data))
        self.ram[gpa:gpa + len(data)] = data


FAULTS = ["none"] * 10 + ["type", "op", "inband", "sector", "count", "total", "offset", "pages", "pfn", "short"]


@st.composite
def block_requests(draw):
    """A packet as a guest might send it: well formed, or wrong in one chosen way."""
    fault = draw(st.sampled_from(FAULTS))
    ptype = GPA_DIRECT
    if fault == "type":
        ptype = draw(st.sampled_from([COMPLETION, XFER_PAGES, 0, 0xFFFF]))
    elif fault == "inband":
        ptype = INBAND
    op = draw(st.sampled_from([abi.PYKVM_BLK_OP_READ] * 3 + [abi.PYKVM_BLK_OP_WRITE] * 3 +
                              [abi.PYKVM_BLK_OP_FLUSH, abi.PYKVM_BLK_OP_INFO]))
    if fault == "op":
        op = draw(st.sampled_from([0, 5, 0xFFFFFFFF]))
    count = draw(st.integers(1, 12))
    sector = draw(st.integers(0, DISK_SECTORS - count))
    if fault == "sector":
        sector = draw(st.integers(DISK_SECTORS - count + 1, MASK64))
    nbytes = count * SECTOR
    if fault == "count":
        count = draw(st.sampled_from([0, abi.PYKVM_BLK_MAX_SECTORS + 1, 2**32 - 1]))
    if fault == "total":
        nbytes += draw(st.sampled_from([-1, 1, -SECTOR, SECTOR]))
    k = draw(st.integers(1, 3))
    cuts = sorted(draw(st.lists(st.integers(0, nbytes), min_size=k - 1, max_size=k - 1)))
    ranges = []
    bad = draw(st.integers(0, k - 1))          # the range a range fault goes into
    for i, size in enumerate(b - a for a, b in zip([0, *cuts], [*cuts, nbytes])):
        offset = draw(st.integers(0, PAGE - 1))
        if fault == "offset" and i == bad:
            offset = draw(st.integers(PAGE, 2**32 - 1))
        npages = min((offset + size + PAGE - 1) // PAGE, 4)
        if fault == "pages" and i == bad:
            npages = max(0, npages - 1)
        pfns = draw(st.lists(st.integers(0, RAM_PAGES - 1), min_size=npages, max_size=npages))
        if fault == "pfn" and i == bad and pfns:
            pfns[draw(st.integers(0, len(pfns) - 1))] = draw(st.integers(RAM_PAGES, 1 << 40))
        ranges.append((size, offset, tuple(pfns)))
    payload = struct.pack("<IIQII", op, 0, sector, count, 0)
    if fault == "short":
        payload = payload[:draw(st.integers(0, len(payload) - 1))]
    return Packet(ptype, 0, draw(st.integers(0, MASK64)), payload, tuple(ranges) if ptype == GPA_DIRECT else ())


def buffer_addresses(ranges):
    """The guest-physical address of every byte of a GPA-direct buffer, in order; None when the ranges are bad."""
    out = []
    for size, offset, pfns in ranges:
        if offset >= PAGE or (size and len(pfns) * PAGE < offset + size):   # an empty range needs no page
            return None
        out.extend(pfns[(offset + j) // PAGE] * PAGE + (offset + j) % PAGE for j in range(size))
    return out


def expect(pkt, read_only):
    """What the service must do with pkt: ("error", exc type) or ("status", status, kind)."""
    if pkt.type not in (GPA_DIRECT, INBAND) or len(pkt.payload) < 24:
        return ("error", ServiceError)
    op, _r, sector, count, _r2 = struct.unpack("<IIQII", pkt.payload)
    if op in (abi.PYKVM_BLK_OP_INFO, abi.PYKVM_BLK_OP_FLUSH):
        return ("status", abi.PYKVM_BUS_OK, None)
    if op not in (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE) or pkt.type != GPA_DIRECT:
        return ("error", ServiceError)
    if not 1 <= count <= abi.PYKVM_BLK_MAX_SECTORS or sector + count > DISK_SECTORS:
        return ("status", abi.PYKVM_BUS_E_INVALID, None)
    addrs = buffer_addresses(pkt.ranges)
    if addrs is None or len(addrs) != count * SECTOR:
        return ("error", ServiceError)
    if op == abi.PYKVM_BLK_OP_WRITE and read_only:
        return ("status", abi.PYKVM_BUS_E_READ_ONLY, None)
    if any(a >= RAM_PAGES * PAGE for a in addrs):
        return ("error", GuestMemoryError)
    return ("status", abi.PYKVM_BUS_OK, (op, sector, addrs))


@pytest.mark.parametrize("read_only", [False, True])
@settings(max_examples=300, deadline=None)
@given(reqs=st.lists(block_requests(), min_size=1, max_size=6))
def test_block_session_touches_the_file_only_for_valid_requests(read_only, reqs):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        model = bytearray(os.urandom(DISK_SECTORS * SECTOR + TAIL))
        with open(path, "wb") as f:
            f.write(model)
        disk = Disk(path, read_only=read_only)
        try:
            assert disk.sectors == DISK_SECTORS
            ch = FakeChannel()
            session = BlockSession(ch, abi.PYKVM_BLOCK_V1_0, disk)
            for pkt in reqs:
                want = expect(pkt, read_only)
                ram_before = bytes(ch.ram)
                ch.sent.clear()
                if want[0] == "error":
                    with pytest.raises(want[1]):
                        session.on_packet(pkt)
                    assert ch.sent == []
                    if want[1] is ServiceError:
                        assert ch.ram == ram_before
                    # (a read whose buffer leaves RAM may have filled its first pieces: guest memory only)
                else:
                    session.on_packet(pkt)
                    status, done = want[1], want[2]
                    flags = abi.PYKVM_BLK_FLAG_READ_ONLY if read_only else 0
                    assert ch.sent == [(COMPLETION, struct.pack("<IIQII", status, flags, DISK_SECTORS, SECTOR, 0),
                                        pkt.trans_id)]
                    expected_ram = bytearray(ram_before)
                    if done is not None:
                        op, sector, addrs = done
                        at = sector * SECTOR
                        if op == abi.PYKVM_BLK_OP_WRITE:
                            model[at:at + len(addrs)] = bytes(ram_before[a] for a in addrs)
                        else:
                            for i, a in enumerate(addrs):
                                expected_ram[a] = model[at + i]
                    assert ch.ram == expected_ram     # only a successful read writes guest memory
                with open(path, "rb") as f:
                    assert f.read() == bytes(model)
        finally:
            disk.close()
