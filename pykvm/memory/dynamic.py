"""Per-node dynamic memory mechanics: which pages the host took back, releasing them, hot-adding RAM.

The policy (how much, when) is memory/balancer.py; the guest protocol is bus/services/dynmem.py.
This module keeps the facts per node: its regions (boot RAM and hot-added), a ballooned
bitmap per region, and the host memory each region really holds (memfd blocks), and it
performs the three operations: release pages (MADV_REMOVE on the shared mapping punches the
memfd, so the host's RSS falls), hand them back, and plug a new region from the node's
reserved hot-add range as a new memslot.
"""

from __future__ import annotations

import mmap
import os
import threading

from .region import PAGE_SIZE, GuestMemoryError, MemoryRegion

HOTADD_SLOT_BASE = 16           # memslots of hot-added regions: 16..63 (boot RAM uses 0..15, windows 64..)
HOTADD_SLOT_END = 64


class RangeError(ValueError):
    """A page range a guest named that the host refuses (outside the node, already ballooned, ...)."""


class NodeState:
    """What the host knows about one node's memory."""

    def __init__(self, index: int, spec, layout):
        self.index = index
        self.spec = spec                      # numa.NodeSpec
        self.layout = layout                  # numa.NodeLayout
        self.regions: list[MemoryRegion] = []
        self.maps: dict[int, bytearray] = {}  # id(region) -> one byte per page, 1 = ballooned (the host holds it)
        self.boot_pages = spec.mem // PAGE_SIZE
        self.hot_pages = 0
        self.ballooned = 0
        self.hot_next = layout.hotadd[0]
        self.released_host_bytes = 0          # memfd bytes freed by releases (what RSS fell by)
        self.ballooned_total = 0              # pages ever released (for the RSS check)
        self.report = None                    # the last accepted (total, committed, free, pressure)
        self.last_decision = "none"

    @property
    def assigned(self) -> int:
        """Pages the node has: boot RAM plus hot-added."""
        return self.boot_pages + self.hot_pages

    @property
    def online(self) -> int:
        """Pages the guest may use now."""
        return self.assigned - self.ballooned

    @property
    def hot_room(self) -> int:
        """Pages left in the reserved hot-add range."""
        base, length = self.layout.hotadd
        return (base + length - self.hot_next) // PAGE_SIZE

    def host_bytes(self) -> int:
        """Bytes of host memory the node's memfds hold now."""
        total = 0
        for r in self.regions:
            if r.fd >= 0:
                total += os.fstat(r.fd).st_blocks * 512
        return total

    def locate(self, pfn: int, count: int):
        """(region, first page index) holding pages [pfn, pfn+count) of this node, or RangeError."""
        if type(pfn) is not int or type(count) is not int or count <= 0 or pfn < 0:
            raise RangeError(f"range {pfn!r}+{count!r} is not a positive page count")
        gpa = pfn * PAGE_SIZE
        for r in self.regions:
            if r.contains(gpa, count * PAGE_SIZE):
                return r, (gpa - r.gpa) // PAGE_SIZE
        raise RangeError(f"pages {pfn:#x}+{count} are not inside node {self.index}'s RAM")

    def ballooned_ranges(self, limit_pages: int, max_ranges: int) -> list[tuple[int, int]]:
        """Up to limit_pages ballooned pages as (pfn, count) runs, at most max_ranges of them."""
        out = []
        left = limit_pages
        for r in self.regions:
            bm = self.maps[id(r)]
            i = bm.find(1)
            while i >= 0 and left and len(out) < max_ranges:
                j = bm.find(0, i)
                j = len(bm) if j < 0 else j
                n = min(j - i, left)
                out.append((r.gpa // PAGE_SIZE + i, n))
                left -= n
                i = bm.find(1, i + n)
            if not left or len(out) >= max_ranges:
                break
        return out

    def snapshot(self) -> dict:
        """Plain data for `ctl numa`, the memory log and stats."""
        rep = self.report
        return {"node": self.index, "size": self.online * PAGE_SIZE, "assigned": self.assigned * PAGE_SIZE,
                "startup": self.spec.mem, "min": self.spec.min, "max": self.spec.max,
                "committed": None if rep is None else rep[1] * PAGE_SIZE,
                "free": None if rep is None else rep[2] * PAGE_SIZE,
                "pressure": None if rep is None else rep[3],
                "ballooned": self.ballooned * PAGE_SIZE, "hot_added": self.hot_pages * PAGE_SIZE,
                "host_bytes": self.host_bytes(), "last_decision": self.last_decision}


class DynamicMemory:
    """The nodes of one VM and the operations on their memory (serialized by `lock`)."""

    def __init__(self, memory, cfg, layouts, map_slot=None):
        self.memory = memory                  # GuestMemory
        self.cfg = cfg                        # numa.NumaConfig
        self.map_slot = map_slot              # fn(slot, gpa, size, host_addr) -> None (KVM memslot), or None
        self.lock = threading.RLock()
        self.nodes = [NodeState(i, s, lay) for i, (s, lay) in enumerate(zip(cfg.nodes, layouts))]
        for r in memory.regions:
            self._track(self.nodes[r.node], r)
        self._next_slot = HOTADD_SLOT_BASE

    def _track(self, node: NodeState, region: MemoryRegion) -> None:
        node.regions.append(region)
        node.regions.sort(key=lambda r: r.gpa)
        node.maps[id(region)] = bytearray(region.size // PAGE_SIZE)

    @property
    def online_pages(self) -> int:
        """Pages the whole VM may use now."""
        return sum(n.online for n in self.nodes)

    # ---------------------------------------------------------------- balloon
    def check_ranges(self, node: NodeState, ranges) -> int:
        """Raise RangeError unless every (pfn, count) lies in the node, is not ballooned, and none overlap; pages."""
        seen: dict[int, list[tuple[int, int]]] = {}
        pages = 0
        for pfn, count in ranges:
            region, first = node.locate(pfn, count)
            bm = node.maps[id(region)]
            if bm.find(1, first, first + count) >= 0:
                raise RangeError(f"pages {pfn:#x}+{count} of node {node.index} were already given back")
            for a, b in seen.get(id(region), ()):
                if first < b and a < first + count:
                    raise RangeError(f"pages {pfn:#x}+{count} are named twice in one response")
            seen.setdefault(id(region), []).append((first, first + count))
            pages += count
        return pages

    def release(self, node: NodeState, ranges) -> int:
        """Take checked ranges from the guest: mark them and punch them out of the memfd; host bytes freed."""
        with self.lock:
            before = node.host_bytes()
            for pfn, count in ranges:
                region, first = node.locate(pfn, count)
                node.maps[id(region)][first:first + count] = b"\x01" * count
                # MADV_REMOVE on a shared memfd mapping frees the backing pages (a hole punch):
                # the guest's next touch would read zeros, the host's RSS falls now.
                region.mm.madvise(mmap.MADV_REMOVE, first * PAGE_SIZE, count * PAGE_SIZE)
                node.ballooned += count
                node.ballooned_total += count
            freed = max(0, before - node.host_bytes())
            node.released_host_bytes += freed
            return freed

    def take_back(self, node: NodeState, pages: int, max_ranges: int) -> list[tuple[int, int]]:
        """Un-balloon up to `pages` of the node: clear them and return their (pfn, count) ranges."""
        with self.lock:
            ranges = node.ballooned_ranges(pages, max_ranges)
            for pfn, count in ranges:
                region, first = node.locate(pfn, count)
                node.maps[id(region)][first:first + count] = bytes(count)
                node.ballooned -= count
            return ranges

    # ---------------------------------------------------------------- hot-add
    def hot_add(self, node: NodeState, pages: int) -> tuple[int, int]:
        """Plug `pages` more RAM into the node from its reserved range; (gpa, bytes). GuestMemoryError when it cannot."""
        with self.lock:
            if pages <= 0 or pages > node.hot_room:
                raise GuestMemoryError(f"node {node.index}: {pages} pages do not fit its hot-add reserve "
                                       f"({node.hot_room} pages left)")
            if self._next_slot >= HOTADD_SLOT_END:
                raise GuestMemoryError("no memslot left for hot-added memory")
            gpa, size = node.hot_next, pages * PAGE_SIZE
            region = MemoryRegion(gpa, size, name=f"node{node.index}-hot{len(node.regions)}", node=node.index)
            try:
                if self.map_slot is not None:
                    self.map_slot(self._next_slot, gpa, size, region.host_addr)
                self.memory.add_region(region)
            except BaseException:
                region.close()
                raise
            region.slot = self._next_slot
            self._next_slot += 1
            self._track(node, region)
            node.hot_next += size
            node.hot_pages += pages
            return gpa, size

    # ---------------------------------------------------------------- saved state
    def get_state(self) -> dict:
        """Per node: hot-added regions and ballooned ranges (what a restore must rebuild)."""
        out = []
        for n in self.nodes:
            hot = [[r.gpa, r.size] for r in n.regions if r.gpa >= n.layout.hotadd[0] and n.layout.hotadd[1]]
            out.append({"hot": hot, "ballooned": [list(x) for x in n.ballooned_ranges(n.ballooned, 1 << 20)]})
        return {"nodes": out}

    def set_state(self, state) -> None:
        """Rebuild hot-added regions and the ballooned marks of a saved VM (before its RAM is loaded); ValueError on bad data."""
        if not isinstance(state, dict) or not isinstance(state.get("nodes"), list) or \
                len(state["nodes"]) != len(self.nodes):
            raise ValueError(f"vNUMA state must list {len(self.nodes)} nodes")
        for node, st in zip(self.nodes, state["nodes"]):
            if not isinstance(st, dict) or not isinstance(st.get("hot"), list) or \
                    not isinstance(st.get("ballooned"), list):
                raise ValueError(f"vNUMA state of node {node.index}: expected 'hot' and 'ballooned' lists")
            for item in st["hot"]:
                if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
                    raise ValueError(f"node {node.index}: hot-added region {item!r} is not [gpa, size]")
                gpa, size = item
                if gpa != node.hot_next or size <= 0 or size % PAGE_SIZE:
                    raise ValueError(f"node {node.index}: hot-added region {gpa:#x}+{size:#x} is not the next "
                                     f"piece of its reserve at {node.hot_next:#x}")
                try:
                    self.hot_add(node, size // PAGE_SIZE)
                except GuestMemoryError as e:
                    raise ValueError(str(e)) from None
            ranges = []
            for item in st["ballooned"]:
                if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)):
                    raise ValueError(f"node {node.index}: ballooned range {item!r} is not [pfn, count]")
                ranges.append(tuple(item))
            try:
                self.check_ranges(node, ranges)
            except RangeError as e:
                raise ValueError(f"ballooned ranges: {e}") from None
            with self.lock:
                for pfn, count in ranges:
                    region, first = node.locate(pfn, count)
                    node.maps[id(region)][first:first + count] = b"\x01" * count
                    node.ballooned += count
            if node.online < node.spec.min // PAGE_SIZE:
                raise ValueError(f"node {node.index}: ballooned below its minimum")
