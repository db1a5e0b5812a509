"""Guest-physical address space: the RAM regions of one VM and bounds-checked access to them."""

from __future__ import annotations

import bisect
import struct

from .region import PAGE_SIZE, GuestMemoryError, MemoryRegion

MIB = 1 << 20
GIB = 1 << 30


# KVM refuses a memory slot of 2^31 pages or more (KVM_MEM_MAX_NR_PAGES): RAM above the hole
# is split into slots of at most this size, each its own region.
MAX_REGION_BYTES = 4 << 40
HOST_WRITES_MAX = 65536


def plan_ram(size: int, hole_start: int, hole_end: int = 4 * GIB) -> list[tuple[int, int]]:
    """Split `size` bytes of RAM around the MMIO hole, and into KVM-sized slots: [(gpa, length), ...]."""
    if size <= 0 or size % PAGE_SIZE:
        raise GuestMemoryError(f"memory size {size} is not a positive multiple of the {PAGE_SIZE}-byte page size")
    low = min(size, hole_start)
    spans = [(0, low)]
    gpa, rest = hole_end, size - low
    while rest > 0:
        n = min(rest, MAX_REGION_BYTES)
        spans.append((gpa, n))
        gpa, rest = gpa + n, rest - n
    return spans


class GuestMemory:
    """All RAM regions of a VM, sorted by address, with checked read/write by guest-physical address."""

    def __init__(self, regions: list[MemoryRegion]):
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise GuestMemoryError(f"RAM regions {a.name} and {b.name} overlap")
        self._index = (self.regions, [r.gpa for r in self.regions])
        # While a reset tracker (snapshot/reset.py) listens: (gpa, length) of every view() handed out,
        # since host writes to RAM are not in KVM's dirty log; past HOST_WRITES_MAX entries, overflow.
        self.host_writes: list | None = None
        self.host_writes_overflow = False
        # Mappings the host keeps across runs and writes at any time (the partition bus's GPADL views):
        # token -> [(gpa, length)]; a tracker counts them written at every collection, and a released
        # one once more (hold_map / release_map)
        self.held_maps: dict[int, list] = {}
        self._next_map = 0

    @classmethod
    def create(cls, size: int, hole_start: int) -> "GuestMemory":
        """Allocate `size` bytes of RAM laid out around the MMIO hole."""
        regions = []
        try:
            for i, (gpa, length) in enumerate(plan_ram(size, hole_start)):
                regions.append(MemoryRegion(gpa, length, name=f"ram{i}"))
        except BaseException:
            for r in regions:
                r.close()
            raise
        return cls(regions)

    @classmethod
    def create_nodes(cls, layouts) -> "GuestMemory":
        """One memfd region per vNUMA node range (numa.NodeLayout list), each tagged with its node."""
        regions = []
        try:
            for n, lay in enumerate(layouts):
                for i, (gpa, length) in enumerate(lay.ranges):
                    regions.append(MemoryRegion(gpa, length, name=f"node{n}-ram{i}", node=n))
        except BaseException:
            for r in regions:
                r.close()
            raise
        return cls(regions)

    def add_region(self, region: MemoryRegion) -> None:
        """Plug a region in (hot-add); readers on other threads see the old or the new list, never half."""
        regions = sorted(self.regions + [region], key=lambda r: r.gpa)
        for a, b in zip(regions, regions[1:]):
            if a.end > b.gpa:
                raise GuestMemoryError(f"RAM regions {a.name} and {b.name} overlap")
        self._index = (regions, [r.gpa for r in regions])
        self.regions = regions

    @property
    def size(self) -> int:
        """Total bytes of RAM."""
        return sum(r.size for r in self.regions)

    @property
    def top(self) -> int:
        """Guest-physical address just past the highest RAM byte."""
        return self.regions[-1].end

    def region_of(self, gpa: int, length: int = 1) -> MemoryRegion | None:
        """The region holding all of [gpa, gpa+length), or None."""
        regions, starts = self._index      # one read: a hot-add may swap both
        i = bisect.bisect_right(starts, gpa) - 1
        if i < 0:
            return None
        r = regions[i]
        return r if length >= 0 and r.contains(gpa, length) else None

    def is_ram(self, gpa: int, length: int = 1) -> bool:
        """True when the whole range is RAM."""
        return self.region_of(gpa, length) is not None

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; raises GuestMemoryError when the range is not all RAM."""
        r = self.region_of(gpa, length)
        if r is None:
            raise GuestMemoryError(f"guest-physical range {gpa:#x}+{length:#x} is not RAM")
        off = gpa - r.gpa
        hw = self.host_writes
        if hw is not None:
            if len(hw) < HOST_WRITES_MAX:
                hw.append((gpa, length))
            else:
                self.host_writes_overflow = True
        return r.view[off:off + length]

    def hold_map(self, ranges: list) -> int:
        """The host maps [(gpa, length)] writable outside view() until release_map(token); the token."""
        self._next_map += 1
        self.held_maps[self._next_map] = list(ranges)
        return self._next_map

    def release_map(self, token: int) -> None:
        """That mapping is gone: what it wrote since the last collection is logged as one last host write."""
        ranges = self.held_maps.pop(token, None)
        hw = self.host_writes
        if ranges and hw is not None:
            if len(hw) + len(ranges) <= HOST_WRITES_MAX:
                hw.extend(ranges)
            else:
                self.host_writes_overflow = True

    def read(self, gpa: int, length: int) -> bytes:
        """Copy `length` bytes of guest RAM at `gpa`."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        """Copy `data` into guest RAM at `gpa`."""
        self.view(gpa, len(data))[:] = data

    def read_u64(self, gpa: int) -> int:
        """Little-endian 64-bit read."""
        return struct.unpack("<Q", self.view(gpa, 8))[0]

    def read_cstring(self, gpa: int, limit: int) -> bytes:
        """Bytes at `gpa` up to (not including) a NUL, at most `limit`, clipped to RAM."""
        r = self.region_of(gpa)
        if r is None:
            raise GuestMemoryError(f"guest-physical address {gpa:#x} is not RAM")
        n = min(limit, r.end - gpa)
        raw = self.read(gpa, n)
        nul = raw.find(b"\0")
        return raw if nul < 0 else raw[:nul]

    def close(self) -> None:
        """Release every region."""
        for r in self.regions:
            r.close()
