"""Find the parts of a memory region that hold non-zero data, quickly, without touching holes."""

from __future__ import annotations

from collections.abc import Iterator

from .region import PAGE_SIZE, MemoryRegion

# Scan in 1 MiB chunks and split only chunks that are not all zero: comparing
# an mmap slice (a bytes copy) against a zero bytes object runs at memcpy
# speed, while per-page Python work is paid only where the guest wrote data.
CHUNK = 1 << 20
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)


def nonzero_runs(region: MemoryRegion, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of page-aligned runs that contain non-zero bytes, ascending, coalesced."""
    if chunk % PAGE_SIZE or chunk <= 0:
        raise ValueError(f"chunk {chunk} must be a positive multiple of {PAGE_SIZE}")
    zero_chunk = _ZERO_CHUNK if chunk == CHUNK else bytes(chunk)
    mm = region.mm
    run_start = run_end = -1
    for ext_off, ext_len in region.data_extents():
        # SEEK_DATA/SEEK_HOLE work in pages; widen to page boundaries anyway.
        off = ext_off - ext_off % PAGE_SIZE
        end = min(region.size, -(-(ext_off + ext_len) // PAGE_SIZE) * PAGE_SIZE)
        while off < end:
            n = min(chunk, end - off)
            # Slicing a bytes object of the same length returns it without a copy.
            if mm[off:off + n] == zero_chunk[:n]:
                off += n
                continue
            if n == PAGE_SIZE:  # common for scattered touches: already known non-zero
                pages = (off,)
            else:
                pages = [p for p in range(off, off + n, PAGE_SIZE) if mm[p:p + PAGE_SIZE] != _ZERO_PAGE]
            for page in pages:
                if page == run_end:
                    run_end += PAGE_SIZE
                else:
                    if run_start >= 0:
                        yield run_start, run_end - run_start
                    run_start, run_end = page, page + PAGE_SIZE
            off += n
    if run_start >= 0:
        yield run_start, run_end - run_start
