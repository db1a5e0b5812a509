"""Transfer by memory map change: a client request's pages mapped into the service partition for one request.

Client side (plan()): the pages a GPA-direct request names are checked against the
client's RAM and turned into runs of (memfd index, byte offset, pages); the memfds go to
the broker with SCM_RIGHTS in a REMAP frame (pykvm/bus/wire.py). Only buffers whose
bytes are contiguous once their pages are laid side by side are remapped (the first range
may start inside a page, every range but the last ends on a page end, every one but the
first starts on one); anything else goes by copy.

Service side (parse() then RemapWindow): the descriptor and every received descriptor are
checked (memfds only, runs inside them, exactly the pages the request needs), the runs
are mapped one after another into a host view (bus/gpadl.py) and that view becomes ONE
memslot at PYKVM_PROVIDER_REMAP_GPA in the service guest, read-only when the guest only
reads it (a client write). close() removes the slot, then the view: afterwards the
service partition's accesses to the window are unclaimed MMIO (all ones, writes dropped).
The service VMM holds the client's memfds only while it maps them. The first and last
pages may hold client bytes outside the buffer: remapping is page-granular, as the
GPA-direct pages the client named are.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from .. import abi
from .gpadl import GpadlError, GpadlView, _runs

PAGE = 4096
WINDOW_GPA = abi.PYKVM_PROVIDER_REMAP_GPA
MAX_PAGES = abi.PYKVM_PROVIDER_REMAP_PAGES      # the window's size; a request's buffer fits with room
MAX_RUNS = 16
HEAD = struct.Struct("<IIII")                    # data offset in the first page, runs, pages, reserved
RUN = struct.Struct("<IIQ")                      # descriptor index, pages, byte offset in that memfd


class RemapError(Exception):
    """A remap descriptor, descriptor or mapping the service side refuses; the request is declined."""


def plan(memory, ranges, nbytes: int):
    """(data offset, [(region, byte offset, pages)]) for remapping this GPA-direct buffer, or None (use copy)."""
    pfns: list[int] = []
    first_off = None
    total = 0
    last = len(ranges) - 1
    for i, (byte_count, byte_offset, rpfns) in enumerate(ranges):
        if not 0 <= byte_offset < PAGE or byte_count <= 0:
            return None
        if i and byte_offset:
            return None                          # a hole before this range
        if i < last and (byte_offset + byte_count) % PAGE:
            return None                          # a hole after this range
        need = (byte_offset + byte_count + PAGE - 1) // PAGE
        if len(rpfns) < need:
            return None
        pfns += rpfns[:need]
        if first_off is None:
            first_off = byte_offset
        total += byte_count
    if first_off is None or total != nbytes or len(pfns) > MAX_PAGES:
        return None
    try:
        runs = _runs(memory, list(pfns), MAX_PAGES)
    except GpadlError:
        return None                              # not all guest RAM, or repeated: the copy path reports it
    if len(runs) > MAX_RUNS:
        return None
    return first_off, runs


def pack(data_offset: int, runs) -> bytes:
    """The remap descriptor for runs of (descriptor index, byte offset, pages)."""
    pages = sum(n for _i, _o, n in runs)
    return HEAD.pack(data_offset, len(runs), pages, 0) + b"".join(RUN.pack(i, n, off) for i, off, n in runs)


def parse(data: bytes, nfds: int, nbytes: int):
    """(data offset, [(descriptor index, byte offset, pages)]) of a remap descriptor for an nbytes transfer."""
    if len(data) < HEAD.size:
        raise RemapError(f"remap descriptor of {len(data)} bytes")
    data_offset, nruns, pages, _r = HEAD.unpack_from(data)
    if not 1 <= nruns <= MAX_RUNS or len(data) != HEAD.size + nruns * RUN.size:
        raise RemapError(f"remap descriptor with {nruns} runs in {len(data)} bytes")
    if data_offset >= PAGE:
        raise RemapError(f"data offset {data_offset} is not inside the first page")
    if not 1 <= nbytes <= MAX_PAGES * PAGE or pages != (data_offset + nbytes + PAGE - 1) // PAGE:
        raise RemapError(f"{pages} pages for {nbytes} bytes at offset {data_offset}")
    runs = []
    total = 0
    for k in range(nruns):
        index, n, off = RUN.unpack_from(data, HEAD.size + k * RUN.size)
        if index >= nfds or n < 1 or off % PAGE or off >= 1 << 46:
            raise RemapError(f"remap run {k}: descriptor {index} of {nfds}, {n} pages at {off:#x}")
        total += n
        runs.append((index, off, n))
    if total != pages:
        raise RemapError(f"remap runs hold {total} pages, the descriptor says {pages}")
    return data_offset, runs


def check_fd(fd: int, end: int) -> None:
    """RemapError unless fd is a memfd sealed against shrinking and at least `end` bytes long.

    Unsealed, the client could truncate it while this VMM maps it: this VMM (and KVM on the
    guest's behalf) would then fault on pages that no longer exist (SIGBUS).
    """
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)      # EINVAL for anything but memfd/shmem files
    except OSError as e:
        raise RemapError(f"received descriptor is not guest memory: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RemapError("received descriptor is not a memory file")
    if not seals & fcntl.F_SEAL_SHRINK:
        raise RemapError("received memory file is not sealed against shrinking (F_SEAL_SHRINK)")
    if st.st_size < end:
        raise RemapError(f"received memory file of {st.st_size} bytes; a run ends at {end}")


class RemapWindow:
    """One request's client pages, mapped at WINDOW_GPA in this partition's guest until close()."""

    def __init__(self, memslots, fds, runs, writable: bool):
        ends: dict[int, int] = {}
        for index, off, n in runs:
            ends[index] = max(ends.get(index, 0), off + n * PAGE)
        for index, end in ends.items():
            check_fd(fds[index], end)
        try:
            self.view = GpadlView.from_fd_runs([(fds[i], off, n) for i, off, n in runs])
        except OSError as e:
            raise RemapError(f"mapping the client's pages failed: {e}") from None
        self._memslots = memslots
        self.slot = None
        try:
            self.slot = memslots.map(WINDOW_GPA, self.view.size, self.view.host_addr, readonly=not writable)
        except BaseException:
            self.view.close()
            raise

    @property
    def mapped(self) -> bool:
        """True until close()."""
        return self.slot is not None

    def close(self) -> None:
        """Remove the memslot (the guest loses the pages), then the host view."""
        slot, self.slot = self.slot, None
        if slot is None:
            return
        try:
            self._memslots.unmap(slot)
        finally:
            self.view.close()
