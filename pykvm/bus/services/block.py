"""block storage: a raw host file as a disk; sector reads and writes through the guest's GPA-direct buffers.

Requests are GPA-direct packets whose ranges name the data buffer, with a
pykvm_blk_request payload; INFO and FLUSH may be in-band. Every request gets a completion
carrying a pykvm_blk_response. A write is copied out of guest memory in full before one
pwrite, so a guest that changes its buffer meanwhile, or dies, never leaves a sector half
written by this service; FLUSH and closing the disk fsync the file.
"""

from __future__ import annotations

import os
import struct

from ... import abi
from ..ring import COMPLETION, COMPLETION_REQ, GPA_DIRECT, INBAND, XFER_PAGES, xfer_pages_header
from ..transfer import TransferError
from .base import Service, ServiceError, Session, unpack_exact

SECTOR = abi.PYKVM_BLK_SECTOR
PAGE = 4096
_REQ = struct.Struct("<IIQII")       # struct pykvm_blk_request
_RESP = struct.Struct("<IIQII")      # struct pykvm_blk_response


class Disk:
    """A raw disk image file, opened once at start (read-only or read-write)."""

    def __init__(self, path, read_only: bool = False):
        self.path = str(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise ValueError(f"--disk {self.path}: {e.strerror}") from None
        size = os.fstat(self.fd).st_size
        if size < SECTOR:
            os.close(self.fd)
            raise ValueError(f"--disk {self.path}: {size} bytes is smaller than one {SECTOR}-byte sector")
        self.sectors = size // SECTOR

    def close(self) -> None:
        """fsync (when writable) and close."""
        if self.fd is not None:
            if not self.read_only:
                try:
                    os.fsync(self.fd)
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = None


class BlockSession(Session):
    """One open block channel."""

    def __init__(self, channel, version, disk: Disk):
        super().__init__(channel, version)
        self.disk = disk
        self.counts = {"read": 0, "write": 0, "flush": 0, "info": 0, "errors": 0}
        self.bytes_read = self.bytes_written = 0

    def _reply(self, pkt, status: int) -> None:
        d = self.disk
        flags = abi.PYKVM_BLK_FLAG_READ_ONLY if d.read_only else 0
        self.channel.send(COMPLETION, _RESP.pack(status, flags, d.sectors, SECTOR, 0), pkt.trans_id)

    def on_packet(self, pkt) -> None:
        if pkt.type == COMPLETION:     # the guest copied a transfer-page read out: free its range
            xfer = self.channel.xfer
            try:
                if xfer is None:
                    raise TransferError("this channel has no transfer pages")
                xfer.release(pkt.trans_id)
            except TransferError as e:
                raise ServiceError(f"block: completion of transaction {pkt.trans_id}: {e}") from None
            return
        if pkt.type not in (GPA_DIRECT, INBAND):
            raise ServiceError(f"block takes GPA-direct or in-band requests, got packet type {pkt.type}")
        op, _r, sector, count, _r2 = unpack_exact(_REQ, pkt.payload, "block request")
        if op == abi.PYKVM_BLK_OP_INFO:
            self.counts["info"] += 1
            return self._reply(pkt, abi.PYKVM_BUS_OK)
        if op == abi.PYKVM_BLK_OP_FLUSH:
            self.counts["flush"] += 1
            if not self.disk.read_only:
                try:
                    os.fsync(self.disk.fd)
                except OSError:
                    return self._fail(pkt, abi.PYKVM_BUS_E_IO)
            return self._reply(pkt, abi.PYKVM_BUS_OK)
        if op not in (abi.PYKVM_BLK_OP_READ, abi.PYKVM_BLK_OP_WRITE):
            raise ServiceError(f"block: unknown operation {op}")
        if not 1 <= count <= abi.PYKVM_BLK_MAX_SECTORS or sector + count > self.disk.sectors:
            return self._fail(pkt, abi.PYKVM_BUS_E_INVALID)   # a guest mistake, not a protocol break
        nbytes = count * SECTOR
        if pkt.type != GPA_DIRECT:
            if op == abi.PYKVM_BLK_OP_READ and self.channel.xfer is not None:
                return self._read_to_transfer_pages(pkt, sector, nbytes)
            raise ServiceError("block: writes (and reads without transfer pages) need a GPA-direct buffer")
        spans = self._spans(pkt.ranges, nbytes)
        if op == abi.PYKVM_BLK_OP_WRITE:
            if self.disk.read_only:
                return self._fail(pkt, abi.PYKVM_BUS_E_READ_ONLY)
            data = b"".join(self.channel.guest_read(gpa, n) for gpa, n in spans)   # one host copy first
            try:
                done = os.pwrite(self.disk.fd, data, sector * SECTOR)
            except OSError:
                return self._fail(pkt, abi.PYKVM_BUS_E_IO)
            if done != nbytes:
                return self._fail(pkt, abi.PYKVM_BUS_E_IO)
            self.counts["write"] += 1
            self.bytes_written += nbytes
        else:
            data = self._read(sector, nbytes)
            if data is None:
                return self._fail(pkt, abi.PYKVM_BUS_E_IO)
            at = 0
            for gpa, n in spans:
                self.channel.guest_write(gpa, data[at:at + n])
                at += n
            self.counts["read"] += 1
            self.bytes_read += nbytes
        self._reply(pkt, abi.PYKVM_BUS_OK)

    def _read(self, sector: int, nbytes: int) -> bytes | None:
        """nbytes of the disk from sector, or None on an I/O error or a short read."""
        try:
            data = os.pread(self.disk.fd, nbytes, sector * SECTOR)
        except OSError:
            return None
        return data if len(data) == nbytes else None

    def _read_to_transfer_pages(self, pkt, sector: int, nbytes: int) -> None:
        """An in-band READ: the data goes into the transfer pages, the guest completes it to free them."""
        data = self._read(sector, nbytes)
        if data is None:
            return self._fail(pkt, abi.PYKVM_BUS_E_IO)
        try:
            off = self.channel.xfer.place(pkt.trans_id, data)
        except TransferError:
            return self._fail(pkt, abi.PYKVM_BUS_E_LIMIT)
        d = self.disk
        flags = abi.PYKVM_BLK_FLAG_READ_ONLY if d.read_only else 0
        self.channel.send(XFER_PAGES, _RESP.pack(abi.PYKVM_BUS_OK, flags, d.sectors, SECTOR, 0), pkt.trans_id,
                          COMPLETION_REQ, xfer_pages_header(self.channel.xfer.set_id, [(nbytes, off)]))
        self.counts["read"] += 1
        self.counts["transfer_page_reads"] = self.counts.get("transfer_page_reads", 0) + 1
        self.bytes_read += nbytes

    def _fail(self, pkt, status: int) -> None:
        self.counts["errors"] += 1
        self._reply(pkt, status)

    @staticmethod
    def _spans(ranges, nbytes: int) -> list[tuple[int, int]]:
        """(guest-physical address, length) pieces of the buffer, page by page, exactly nbytes long."""
        spans = []
        total = 0
        for byte_count, byte_offset, pfns in ranges:
            if byte_offset >= PAGE:
                raise ServiceError(f"block: range offset {byte_offset} is not within the first page")
            pos, left = byte_offset, byte_count
            for pfn in pfns:
                if not left:
                    break
                n = min(left, PAGE - pos)
                spans.append((pfn * PAGE + pos, n))
                left -= n
                pos = 0
            if left:
                raise ServiceError(f"block: range of {byte_count} bytes has too few pages")
            total += byte_count
        if total != nbytes:
            raise ServiceError(f"block: buffer of {total} bytes for a {nbytes}-byte transfer")
        return spans

    def stats(self) -> dict:
        return dict(self.counts, bytes_read=self.bytes_read, bytes_written=self.bytes_written)


class BlockService(Service):
    """The block storage service over one Disk."""

    name = "block"
    interface = (abi.PYKVM_BUS_IF_BLOCK_LO, abi.PYKVM_BUS_IF_BLOCK_HI)
    versions = (abi.PYKVM_BLOCK_V1_0,)
    transfer_pages = abi.PYKVM_BUS_XFER_PAGES

    def __init__(self, disk: Disk):
        self.disk = disk

    def open(self, channel, version: int) -> Session:
        return BlockSession(channel, version, self.disk)

    def stats(self) -> dict:
        return {"disk": self.disk.path, "sectors": self.disk.sectors, "read_only": self.disk.read_only}

    def close(self) -> None:
        self.disk.close()
