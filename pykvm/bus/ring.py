"""Host-side endpoints of the partition bus rings (VMBus layout; see pykvm_abi.h and BUS.md).

A ring is a header page and data pages in guest memory, so every word the host reads
from it is untrusted. The host keeps its own copy of the index it owns (the reader's
read_index, the writer's write_index) and only ever publishes it; the other side's index
is read once per operation and validated. The reader reads each descriptor once into
host memory, validates it, copies the rest of the packet once and parses only that copy.
Any violation raises RingError: the channel's owner closes the channel.

Memory ordering on x86 (TSO): stores are not reordered with stores nor loads with loads,
so "payload, then write_index" and "write_index, then payload" need no fence in Python;
the store-load order the signalling rule depends on gets a real fence (_libc.full_fence).
"""

from __future__ import annotations

import struct

from .. import abi
from ._libc import full_fence

PAGE = abi.PYKVM_BUS_PAGE_SIZE
HEADER_SIZE = abi.PYKVM_RING_HEADER_SIZE
TRAILER_SIZE = abi.PYKVM_RING_TRAILER_SIZE
DESC_SIZE = abi.ffi.sizeof("struct pykvm_vmpacket")
INBAND = abi.PYKVM_VMPKT_DATA_INBAND
XFER_PAGES = abi.PYKVM_VMPKT_DATA_XFER_PAGES
GPA_DIRECT = abi.PYKVM_VMPKT_DATA_GPA_DIRECT
COMPLETION = abi.PYKVM_VMPKT_COMP
COMPLETION_REQ = abi.PYKVM_VMPKT_FLAG_COMPLETION_REQ
TYPES = frozenset((INBAND, XFER_PAGES, GPA_DIRECT, COMPLETION))
MAX_PFN = 1 << 40

_off = abi.ffi.offsetof
WRITE_INDEX = _off("struct pykvm_ring_header", "write_index")
READ_INDEX = _off("struct pykvm_ring_header", "read_index")
INTERRUPT_MASK = _off("struct pykvm_ring_header", "interrupt_mask")
PENDING_SEND_SZ = _off("struct pykvm_ring_header", "pending_send_sz")
FEATURE_BITS = _off("struct pykvm_ring_header", "feature_bits")

_U32 = struct.Struct("<I")
_DESC = struct.Struct("<HHHHQ")
_PAIR = struct.Struct("<II")        # gpa direct header; a range's (byte_count, byte_offset)
_XFER = struct.Struct("<HBBI")
_TRAILER = struct.Struct("<Q")
_ZEROS = bytes(8)


class RingError(Exception):
    """The other side broke the ring protocol; `reason` says how. The channel must be closed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RingFull(Exception):
    """No room for a packet now; pending_send_sz asks the reader to signal when `needed` bytes are free."""

    def __init__(self, needed: int):
        super().__init__(f"ring full: waiting for {needed} free bytes")
        self.needed = needed


class Packet:
    """One received packet, parsed from a host-memory copy.

    payload is the bytes from offset8 * 8 to len8 * 8 (padding included). ranges is () for
    in-band and completion packets; for GPA direct a tuple of (byte_count, byte_offset, pfns);
    for transfer pages a tuple of (byte_count, byte_offset) in transfer page set pageset_id.
    """

    __slots__ = ("type", "flags", "trans_id", "payload", "ranges", "pageset_id", "sender_owns")

    def __init__(self, type, flags, trans_id, payload, ranges=(), pageset_id=0, sender_owns=0):
        self.type = type
        self.flags = flags
        self.trans_id = trans_id
        self.payload = payload
        self.ranges = ranges
        self.pageset_id = pageset_id
        self.sender_owns = sender_owns

    def __repr__(self):
        return (f"Packet(type={self.type}, flags={self.flags}, trans_id={self.trans_id:#x}, "
                f"payload={len(self.payload)} bytes, ranges={self.ranges!r})")


def gpa_direct_header(ranges) -> bytes:
    """Encode a GPA direct range list: ranges of (byte_count, byte_offset, pfns)."""
    out = [_PAIR.pack(0, len(ranges))]
    for count, offset, pfns in ranges:
        if len(pfns) != (offset + count + PAGE - 1) // PAGE:
            raise ValueError(f"a range of {count} bytes at {offset} spans "
                             f"{(offset + count + PAGE - 1) // PAGE} pages, not {len(pfns)}")
        out.append(_PAIR.pack(count, offset))
        out.append(struct.pack(f"<{len(pfns)}Q", *pfns))
    return b"".join(out)


def xfer_pages_header(pageset_id: int, ranges, sender_owns: bool = False) -> bytes:
    """Encode a transfer-page range list: ranges of (byte_count, byte_offset)."""
    return _XFER.pack(pageset_id, int(sender_owns), 0, len(ranges)) + b"".join(_PAIR.pack(c, o) for c, o in ranges)


class _Ring:
    """What both endpoints share: the buffer (header + data area) and checked index reads."""

    def __init__(self, buf):
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.readonly:
            mv.release()
            raise ValueError("a ring needs a writable buffer")
        size = len(mv) - HEADER_SIZE
        if size < PAGE or size % PAGE or size >= 1 << 32:
            mv.release()
            raise RingError(f"a ring of {len(buf)} bytes is not a header page and 1 or more data pages")
        self._buf = mv
        self.data_size = size

    @classmethod
    def from_view(cls, view, first_page: int, page_count: int, **kw):
        """The ring in pages [first_page, first_page + page_count) of a GpadlView (header page first)."""
        if first_page < 0 or page_count < 2 or (first_page + page_count) * PAGE > view.size:
            raise RingError(f"ring pages {first_page}+{page_count} do not fit the {view.size // PAGE}-page GPADL")
        # Every buffer made here is released on the way out, even when cls() refuses the ring:
        # a traceback kept alive by the caller must not keep the view's pages exported.
        with view.buf as whole, whole[first_page * PAGE:(first_page + page_count) * PAGE] as part:
            return cls(part, **kw)

    def close(self) -> None:
        """Drop the ring's hold on its buffer (do this before closing the GPADL view)."""
        if self._buf is not None:
            self._buf.release()
            self._buf = None

    def _index(self, where: int, what: str) -> int:
        value = _U32.unpack_from(self._buf, where)[0]
        if value >= self.data_size or value & 7:
            raise RingError(f"{what} {value:#x} is not an 8-byte aligned offset below {self.data_size:#x}")
        return value

    def _own_index(self, where: int, what: str) -> int:
        """The index this end owns, read once at start; a bad one releases the buffer before raising."""
        try:
            return self._index(where, what)
        except RingError:
            self.close()
            raise

    def _get(self, where):
        return _U32.unpack_from(self._buf, where)[0]

    def _set(self, where, value):
        _U32.pack_into(self._buf, where, value)

    @property
    def interrupt_mask(self) -> int:
        """The reader's interrupt mask (non-zero: the reader polls, writers need not signal)."""
        return self._get(INTERRUPT_MASK)

    @interrupt_mask.setter
    def interrupt_mask(self, value: int) -> None:
        self._set(INTERRUPT_MASK, value)

    @property
    def pending_send_sz(self) -> int:
        """Free bytes a waiting writer needs (0: no writer waits)."""
        return self._get(PENDING_SEND_SZ)

    @property
    def feature_bits(self) -> int:
        """The ring's feature bits (PYKVM_RING_FEAT_*)."""
        return self._get(FEATURE_BITS)

    def indices(self) -> tuple[int, int]:
        """(write_index, read_index) as they are in shared memory now, unvalidated (for inspection)."""
        return self._get(WRITE_INDEX), self._get(READ_INDEX)

    def _copy_out(self, pos: int, n: int) -> bytes:
        """n bytes of the data area from pos, unwrapped, into host memory."""
        start = HEADER_SIZE + pos
        if pos + n <= self.data_size:
            return self._buf[start:start + n].tobytes()
        first = self.data_size - pos
        return self._buf[start:HEADER_SIZE + self.data_size].tobytes() + \
            self._buf[HEADER_SIZE:HEADER_SIZE + n - first].tobytes()

    def _copy_in(self, pos: int, data: bytes) -> None:
        n = len(data)
        start = HEADER_SIZE + pos
        if pos + n <= self.data_size:
            self._buf[start:start + n] = data
            return
        first = self.data_size - pos
        self._buf[start:HEADER_SIZE + self.data_size] = data[:first]
        self._buf[HEADER_SIZE:HEADER_SIZE + n - first] = data[first:]


class RingReader(_Ring):
    """The host's end of a guest->host ring: read packets, publish progress, signal a waiting writer."""

    def __init__(self, buf, *, max_ranges: int = 64, max_pfns: int = 1024, max_pfn: int = MAX_PFN):
        super().__init__(buf)
        self.max_ranges = max_ranges
        self.max_pfns = max_pfns
        self.max_pfn = max_pfn
        self._read = self._own_index(READ_INDEX, "read_index")
        self._published = self._read
        self._next_pos = None   # where the packet peek() returned ends

    def peek(self) -> Packet | None:
        """The next packet without consuming it, or None when the ring is empty."""
        ds = self.data_size
        r = self._read
        w = self._index(WRITE_INDEX, "write_index")
        avail = w - r if w >= r else w - r + ds
        if not avail:
            return None
        if avail < DESC_SIZE + TRAILER_SIZE:
            raise RingError(f"{avail} bytes available, less than a packet")
        if r + DESC_SIZE <= ds:
            ptype, off8, len8, flags, trans_id = _DESC.unpack_from(self._buf, HEADER_SIZE + r)
        else:
            ptype, off8, len8, flags, trans_id = _DESC.unpack(self._copy_out(r, DESC_SIZE))
        total = len8 << 3
        if total < DESC_SIZE or total + TRAILER_SIZE > avail:
            raise RingError(f"packet length {total} does not fit the {avail} bytes available")
        if off8 < 2 or off8 > len8:
            raise RingError(f"payload offset {off8 << 3} is outside the {total}-byte packet")
        if ptype not in TYPES:
            raise RingError(f"unknown packet type {ptype}")
        if flags & ~COMPLETION_REQ:
            raise RingError(f"unknown packet flags {flags:#x}")
        body = self._copy_out((r + DESC_SIZE) % ds, total - DESC_SIZE)
        start = (off8 << 3) - DESC_SIZE
        if ptype == GPA_DIRECT:
            pkt = Packet(ptype, flags, trans_id, body[start:], self._gpa_ranges(body, start))
        elif ptype == XFER_PAGES:
            pkt = self._xfer(ptype, flags, trans_id, body, start)
        else:
            pkt = Packet(ptype, flags, trans_id, body[start:])
        n = r + total + TRAILER_SIZE
        self._next_pos = n - ds if n >= ds else n
        return pkt

    def read(self) -> Packet | None:
        """The next packet, consumed (published by commit()), or None when the ring is empty."""
        pkt = self.peek()
        if pkt is not None:
            self._read = self._next_pos
            self._next_pos = None
        return pkt

    def _gpa_ranges(self, body: bytes, end: int):
        if end < 8:
            raise RingError("GPA direct packet has no range header")
        count = _PAIR.unpack_from(body, 0)[1]
        if not 0 < count <= self.max_ranges:
            raise RingError(f"GPA direct range count {count} is not within 1..{self.max_ranges}")
        pos, npfns, ranges = 8, 0, []
        for _ in range(count):
            if pos + 8 > end:
                raise RingError("GPA direct ranges run past the payload offset")
            nbytes, offset = _PAIR.unpack_from(body, pos)
            if not nbytes or offset >= PAGE:
                raise RingError(f"GPA range of {nbytes} bytes at page offset {offset}")
            n = (offset + nbytes + PAGE - 1) >> 12
            npfns += n
            if npfns > self.max_pfns:
                raise RingError(f"GPA direct packet names more than {self.max_pfns} pages")
            pos += 8
            if pos + 8 * n > end:
                raise RingError("GPA direct ranges run past the payload offset")
            pfns = struct.unpack_from(f"<{n}Q", body, pos)
            if max(pfns) >= self.max_pfn:
                raise RingError(f"pfn {max(pfns):#x} is out of range")
            pos += 8 * n
            ranges.append((nbytes, offset, pfns))
        if pos != end:
            raise RingError(f"GPA direct ranges end at {pos + DESC_SIZE}, not at the payload offset {end + DESC_SIZE}")
        return tuple(ranges)

    def _xfer(self, ptype, flags, trans_id, body, end):
        if end < 8:
            raise RingError("transfer-page packet has no range header")
        pageset, owns, _, count = _XFER.unpack_from(body, 0)
        if not 0 < count <= self.max_ranges:
            raise RingError(f"transfer-page range count {count} is not within 1..{self.max_ranges}")
        if 8 + 8 * count != end:
            raise RingError(f"{count} transfer-page ranges do not end at the payload offset {end + DESC_SIZE}")
        ranges = tuple(_PAIR.unpack_from(body, 8 + 8 * i) for i in range(count))
        return Packet(ptype, flags, trans_id, body[end:], ranges, pageset, owns)

    def commit(self) -> bool:
        """Publish how far the host has read; True when a waiting writer must now be signalled."""
        r, old = self._read, self._published
        if r == old:
            return False
        self._set(READ_INDEX, r)
        self._published = r
        full_fence()   # publish read_index before looking at pending_send_sz
        pending = self._get(PENDING_SEND_SZ)
        if not pending:
            return False
        ds = self.data_size
        w = self._get(WRITE_INDEX) % ds
        free_before = ds - (w - old) % ds
        free_now = ds - (w - r) % ds
        return free_before < pending <= free_now

    def mask(self) -> None:
        """Tell writers not to signal: the host polls this ring."""
        self._set(INTERRUPT_MASK, 1)

    def unmask(self) -> bool:
        """Ask writers to signal again; True when packets arrived meanwhile (keep reading, no signal comes)."""
        self._set(INTERRUPT_MASK, 0)
        full_fence()
        return self._index(WRITE_INDEX, "write_index") != self._read


class RingWriter(_Ring):
    """The host's end of a host->guest ring: write packets, say when to signal, wait on pending_send_sz."""

    def __init__(self, buf):
        super().__init__(buf)
        self._write = self._own_index(WRITE_INDEX, "write_index")
        self._waiting = False

    def free_space(self) -> int:
        """Bytes a packet (with trailer) may use now (the ring always keeps 8 bytes free)."""
        r = self._index(READ_INDEX, "read_index")
        w = self._write
        return self.data_size - (w - r if w >= r else w - r + self.data_size) - 8

    def write(self, ptype: int, payload=b"", trans_id: int = 0, flags: int = 0, header: bytes = b"") -> bool:
        """Write one packet; True when the reader must be signalled. Raises RingFull when there is no room.

        header is the range list of a GPA direct or transfer-page packet (gpa_direct_header,
        xfer_pages_header); the payload follows it, padded to 8 bytes.
        """
        if ptype not in TYPES or flags & ~COMPLETION_REQ or len(header) & 7 or \
                (bool(header) != (ptype in (GPA_DIRECT, XFER_PAGES))):
            raise ValueError(f"bad packet: type {ptype}, flags {flags:#x}, {len(header)}-byte range header")
        plen = len(payload)
        off = DESC_SIZE + len(header)
        total = off + plen + (-plen & 7)
        need = total + TRAILER_SIZE
        if total >> 3 > 0xFFFF or need + 8 > self.data_size:
            raise ValueError(f"a {total}-byte packet cannot fit a {self.data_size}-byte ring")
        ds = self.data_size
        w = self._write
        r = self._index(READ_INDEX, "read_index")
        if ds - (w - r if w >= r else w - r + ds) < need + 8:
            self._set(PENDING_SEND_SZ, need + 8)
            self._waiting = True
            full_fence()   # the reader frees space, then reads pending_send_sz: look again
            r = self._index(READ_INDEX, "read_index")
            if ds - (w - r if w >= r else w - r + ds) < need + 8:
                raise RingFull(need + 8)
        pad = -plen & 7
        packet = b"".join((_DESC.pack(ptype, off >> 3, total >> 3, flags, trans_id), header, payload,
                           _ZEROS[:pad], _TRAILER.pack(w << 32)))
        self._copy_in(w, packet)
        n = w + need
        self._write = n = n - ds if n >= ds else n
        self._set(WRITE_INDEX, n)   # after the packet (x86 keeps stores in order)
        if self._waiting:
            self._set(PENDING_SEND_SZ, 0)
            self._waiting = False
        full_fence()   # publish write_index before reading the reader's state
        if self._get(INTERRUPT_MASK):
            return False
        return self._get(READ_INDEX) == w
