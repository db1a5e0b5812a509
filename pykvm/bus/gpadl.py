"""GPADL views: a contiguous host mapping of exactly the guest pages a GPADL names, and nothing else.

The guest names pages by PFN; every PFN is checked against guest RAM before anything is
mapped. The view is built by mapping the backing memfd's pages (MAP_SHARED|MAP_FIXED) at
consecutive addresses over a reservation owned by a Python mmap object. That object counts
buffer exports, so close() knows whether anyone still holds a memoryview: normally it
munmaps the whole range (the host really loses access); if a buffer is still exported it
first replaces the guest pages with private scratch pages, so a stale memoryview can never
reach guest memory again, and reports the host bug.
"""

from __future__ import annotations

import functools
import mmap

from ..memory.region import PAGE_SIZE
from ._libc import MAP_FAILED, ffi, lib

DEFAULT_MAX_PAGES = 16384   # 64 MiB per view
MAX_PFN = 1 << 40           # 52-bit guest-physical addresses

_RW = mmap.PROT_READ | mmap.PROT_WRITE
# Linux x86 values; Python's mmap module lacks these before 3.13
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000


class GpadlError(Exception):
    """A GPADL the host refuses, or an access outside or after a view; `reason` says which."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _runs(memory, pfns, max_pages):
    """Validate the PFN list; return [(region, offset in region, page count)] for its runs."""
    if not isinstance(pfns, (list, tuple)):
        raise GpadlError("GPADL page list is not a list")
    if not pfns:
        raise GpadlError("GPADL has no pages")
    if len(pfns) > max_pages:
        raise GpadlError(f"GPADL has {len(pfns)} pages, more than the limit of {max_pages}")
    seen = set()
    runs = []
    for i, pfn in enumerate(pfns):
        if type(pfn) is not int or not 0 <= pfn < MAX_PFN:
            raise GpadlError(f"GPADL page {i}: {pfn!r} is not a page frame number")
        if pfn in seen:
            raise GpadlError(f"GPADL page {i}: pfn {pfn:#x} is repeated")
        seen.add(pfn)
        gpa = pfn * PAGE_SIZE
        region = memory.region_of(gpa, PAGE_SIZE)
        if region is None:
            raise GpadlError(f"GPADL page {i}: pfn {pfn:#x} (guest-physical {gpa:#x}) is not guest RAM")
        if region.fd < 0:
            raise GpadlError(f"GPADL page {i}: guest memory {region.name} is already released")
        off = gpa - region.gpa
        if runs and runs[-1][0] is region and runs[-1][1] + runs[-1][2] * PAGE_SIZE == off:
            r, o, n = runs[-1]
            runs[-1] = (r, o, n + 1)
        else:
            runs.append((region, off, 1))
    return runs


class GpadlView:
    """The host's mapping of one GPADL's pages, in GPADL order; use it through its methods."""

    def __init__(self, mm: mmap.mmap, base: int, pfns: tuple[int, ...], runs: int):
        self._mm = mm
        self._base = base
        self.pfns = pfns
        self.size = len(pfns) * PAGE_SIZE
        self.runs = runs   # how many mmaps built it (one per run of consecutive pages)
        self._release = None   # GuestMemory.release_map for this view's pages (create())

    @classmethod
    def create(cls, memory, pfns, max_pages: int = DEFAULT_MAX_PAGES) -> "GpadlView":
        """Validate `pfns` against `memory` (a GuestMemory) and map exactly those pages, in order."""
        runs = _runs(memory, pfns, max_pages)
        view = cls.from_fd_runs([(region.fd, off, n) for region, off, n in runs], tuple(pfns))
        # the host writes guest RAM through this view, unseen by KVM's dirty log: a reset must know
        token = memory.hold_map([(region.gpa + off, n * PAGE_SIZE) for region, off, n in runs])
        view._release = functools.partial(memory.release_map, token)
        return view

    @classmethod
    def from_fd_runs(cls, runs, pfns=()) -> "GpadlView":
        """Map [(fd, byte offset, pages)] runs (already validated by the caller) one after another."""
        size = sum(n for _fd, _o, n in runs) * PAGE_SIZE
        # The reservation: untouched anonymous memory (nothing committed), every page of
        # which is replaced below; the mmap object is what later munmaps the whole range.
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, prot=_RW)
        try:
            p = ffi.from_buffer(mm)
            base = int(ffi.cast("uintptr_t", p))
            ffi.release(p)
            at = base
            for fd, off, n in runs:
                got = lib.mmap(ffi.cast("void *", at), n * PAGE_SIZE, _RW, mmap.MAP_SHARED | _MAP_FIXED, fd, off)
                got = int(ffi.cast("uintptr_t", got))
                if got != at:
                    err = ffi.errno
                    raise OSError(err, f"mapping a GPADL run of {n} pages failed") if got == MAP_FAILED else \
                        OSError(f"MAP_FIXED mapped at {got:#x} instead of {at:#x}")
                at += n * PAGE_SIZE
        except BaseException:
            mm.close()
            raise
        view = cls(mm, base, tuple(pfns), len(runs))
        view.size = size
        return view

    @property
    def host_addr(self) -> int:
        """Where the view starts in this process (for a memslot over it)."""
        return self._base

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._mm is None

    @property
    def buf(self) -> memoryview:
        """A writable memoryview of the whole view, for use within one call (release it; never keep it)."""
        if self._mm is None:
            raise GpadlError("GPADL view is closed")
        return memoryview(self._mm)

    def _check(self, offset: int, length: int) -> None:
        if self._mm is None:
            raise GpadlError("GPADL view is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GpadlError(f"range {offset:#x}+{length:#x} is outside the {self.size:#x}-byte GPADL view")

    def read(self, offset: int, length: int) -> bytes:
        """Copy `length` bytes at `offset` of the view."""
        self._check(offset, length)
        return self._mm[offset:offset + length]

    def write(self, offset: int, data) -> None:
        """Copy `data` (bytes-like) into the view at `offset`."""
        n = len(data)
        self._check(offset, n)
        self._mm[offset:offset + n] = data

    def close(self) -> None:
        """Unmap the view: afterwards the host has no mapping of these guest pages."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        release, self._release = self._release, None
        if release is not None:
            release()
        try:
            mm.close()
        except BufferError:
            # Someone kept a memoryview. Swap the guest pages for scratch pages first so that
            # view can never reach guest memory; the range itself is unmapped when the last
            # export goes away (the mmap object's deallocation).
            got = lib.mmap(ffi.cast("void *", self._base), self.size, _RW,
                           mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
            if int(ffi.cast("uintptr_t", got)) != self._base:
                raise OSError(ffi.errno, "cannot revoke a GPADL view") from None
            raise BufferError("GPADL view closed while a memoryview of it was still held (host bug); "
                              "its guest pages were replaced by scratch pages") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._mm is None else f"{len(self.pfns)} pages in {self.runs} runs"
        return f"<GpadlView {state}>"
