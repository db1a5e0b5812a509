"""One memfd-backed span of guest RAM, mapped into the VMM."""

from __future__ import annotations

import fcntl
import mmap
import os

PAGE_SIZE = 4096
RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL   # what a receiver of a guest RAM memfd may rely on


class GuestMemoryError(Exception):
    """A guest-physical access or layout request that does not fit guest RAM."""


class MemoryRegion:
    """A contiguous guest-physical RAM range backed by its own memfd.

    A memfd rather than anonymous memory so the crash dumper can find the pages
    the guest touched with SEEK_DATA/SEEK_HOLE, and so a region can later be
    shared with another process (a partition, a restored VM). Sealed against
    shrinking (RAM never shrinks; memory given back is punched, not truncated):
    a process it is shared with can map it without risking SIGBUS, whatever this
    one does later. Growing stays possible; no further seal is ever added.
    """

    def __init__(self, gpa: int, size: int, name: str = "ram", node: int = 0):
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
            raise GuestMemoryError(f"region {name}: address {gpa:#x} and size {size:#x} must be page multiples")
        self.gpa = gpa
        self.size = size
        self.name = name
        self.node = node
        self.slot: int | None = None      # its KVM memslot once the machine registered it
        self.fd = os.memfd_create(f"pykvm-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, RAM_SEALS)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self.mm)
        self.host_addr = buffer_address(self.mm)

    @property
    def end(self) -> int:
        """Guest-physical address just past the region."""
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        """True when [gpa, gpa+length) lies inside this region."""
        return self.gpa <= gpa and gpa + length <= self.end

    def data_extents(self):
        """Yield (offset, length) of the parts of the memfd that hold data (never-touched pages are holes)."""
        off = 0
        while off < self.size:
            try:
                start = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past off
                return
            if start >= self.size:
                return
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            end = min(end, self.size)
            yield start, end - start
            off = end

    def close(self) -> None:
        """Unmap and close the backing memfd."""
        if self.fd < 0:
            return
        self.view.release()
        self.mm.close()
        os.close(self.fd)
        self.fd = -1


def buffer_address(buf) -> int:
    """Host virtual address of a writable buffer (for KVM_SET_USER_MEMORY_REGION)."""
    from ..kvm.abi import ffi   # cffi is loaded for KVM anyway; ctypes would cost every run ~1.5 ms

    cdata = ffi.from_buffer(buf, require_writable=True)
    try:
        return int(ffi.cast("uintptr_t", cdata))
    finally:
        ffi.release(cdata)      # an mmap with an exported buffer cannot be closed
