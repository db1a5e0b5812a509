"""Transfer page sets: host-owned pages mapped into the guest (read-only) that carry host->guest bulk data.

The host places data in the set and sends a transfer-page packet naming (offset, length)
ranges; the guest copies it out and completes the packet's transaction, which frees the
ranges. The set is its own memfd mapped at its own guest-physical address through a
read-only memslot, so the guest reads it without exits and can never write it; closing
the set removes the memslot and the memfd.
"""

from __future__ import annotations

from ..memory.region import MemoryRegion

PAGE = 4096
ALIGN = 64


class TransferError(Exception):
    """No room in the transfer page set, or a release of a range that was not handed out."""


class TransferPageSet:
    """One channel's transfer pages: a first-fit allocator over a guest-visible, host-writable buffer."""

    def __init__(self, memslots, gpa: int, pages: int, set_id: int = 0):
        self.set_id = set_id
        self.gpa = gpa
        self.size = pages * PAGE
        self._region = MemoryRegion(gpa, self.size, name=f"xfer-{gpa:x}")
        self._memslots = memslots
        try:
            self.slot = memslots.map(gpa, self.size, self._region.host_addr, readonly=True)
        except BaseException:
            self._region.close()
            raise
        self._free: list[tuple[int, int]] = [(0, self.size)]    # (offset, length), sorted
        self.in_use: dict[int, tuple[int, int]] = {}             # trans_id -> (offset, length)

    def place(self, trans_id: int, data: bytes) -> int:
        """Copy data into a free range held for trans_id; its offset. TransferError when full or reused."""
        if trans_id in self.in_use:
            raise TransferError(f"transaction {trans_id} already holds transfer pages")
        need = max(ALIGN, (len(data) + ALIGN - 1) // ALIGN * ALIGN)
        for i, (off, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (off + need, length - need)
                self._region.mm[off:off + len(data)] = data
                self.in_use[trans_id] = (off, need)
                return off
        raise TransferError(f"no {need} free bytes in the {self.size}-byte transfer page set")

    def release(self, trans_id: int) -> None:
        """The guest completed trans_id: its range is free again."""
        got = self.in_use.pop(trans_id, None)
        if got is None:
            raise TransferError(f"transaction {trans_id} holds no transfer pages")
        self._free.append(got)
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((off, length))
        self._free = merged

    @property
    def free_bytes(self) -> int:
        """Bytes not handed out."""
        return sum(n for _o, n in self._free)

    def close(self) -> None:
        """Remove the guest's mapping, then the pages."""
        if self._region is not None:
            try:
                self._memslots.unmap(self.slot)
            finally:
                self._region.close()
                self._region = None
