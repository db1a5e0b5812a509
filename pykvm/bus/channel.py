"""One bus channel: an offer, then (once the guest opens it) two rings in a GPADL and a service session.

A channel connects two endpoints; here one is the guest and the other a host service.
Its rings live in the GPADL the guest named when it opened the channel: pages
[0, inbound_offset) hold the guest->host ring, the rest the host->guest ring. Everything
the host reads from them is untrusted: a RingError or ServiceError closes this channel
alone, with the reason kept for stats and cores.
"""

from __future__ import annotations

from collections import deque

from ..memory import GuestMemoryError
from .ring import RingError, RingFull, RingReader, RingWriter
from .services.base import ServiceError

PACKETS_PER_WAKE = 256      # then the bus thread lets other channels run and comes back


class ChannelClosed(Exception):
    """The channel was closed (by the guest, the host, or a violation) while a service used it."""


class Channel:
    """A channel offer and, when open, its rings and session."""

    def __init__(self, host, relid: int, service, instance: tuple[int, int]):
        self.host = host
        self.relid = relid
        self.service = service
        self.instance = instance
        self.state = "offered"          # offered -> open -> offered (closed) ...; rescinded at the end
        self.version = None
        self.gpadl_id = None
        self.data_gpadl_id = None       # the data buffer's GPADL (offer flag DATA_BUFFER), while open
        self.data_view = None
        self.inbound_offset = 0
        self.reader: RingReader | None = None     # guest -> host
        self.writer: RingWriter | None = None     # host -> guest
        self.session = None
        self.irq = None
        self.xfer = None                # TransferPageSet, for services that send bulk data that way
        self.view = None                # the ring GPADL's view while open
        self.backlog: deque = deque()   # replies waiting for room in the host->guest ring
        self.packets_in = self.packets_out = 0
        self.signals_out = 0
        self.wakes = 0
        self.opens = 0
        self.closed_reason: str | None = None
        self.released = False           # the guest released the relid after a rescind

    # ---------------------------------------------------------------- open / close
    def open(self, view, inbound_offset: int, irq, version: int, xfer=None, data_view=None) -> None:
        """Bind the rings in `view` and start a session at `version` (raises RingError on bad rings)."""
        pages = view.size // 4096
        if not 2 <= inbound_offset <= pages - 2:
            raise RingError(f"inbound ring offset {inbound_offset} leaves no room for two rings in "
                            f"{pages} pages")
        reader = RingReader.from_view(view, 0, inbound_offset)
        try:
            writer = RingWriter.from_view(view, inbound_offset, pages - inbound_offset)
        except BaseException:
            reader.close()
            raise
        self.reader, self.writer = reader, writer
        self.view = view                # a direct session maps the same pages elsewhere
        self.data_view = data_view
        self.inbound_offset = inbound_offset
        self.irq = irq
        self.xfer = xfer
        self.version = version
        self.session = self.service.open(self, version)
        self.state = "open"
        self.opens += 1
        self.closed_reason = None

    def close(self, reason: str | None = None) -> None:
        """Stop using the rings (the GPADL's owner unmaps them later); idempotent."""
        if reason:
            self.closed_reason = reason      # before the session closes: it may pass the reason on
        if self.session is not None:
            try:
                self.session.close()
            finally:
                self.session = None
        for ring in (self.reader, self.writer):
            if ring is not None:
                ring.close()
        self.reader = self.writer = None
        self.view = self.data_view = None
        self.data_gpadl_id = None
        self.backlog.clear()
        self.irq = None
        if self.xfer is not None:        # the guest loses the transfer pages with the channel
            self.xfer.close()
            self.xfer = None
        if self.state == "open":
            self.state = "offered"

    @property
    def is_open(self) -> bool:
        """True while the guest has it open."""
        return self.state == "open"

    # ---------------------------------------------------------------- data path (bus thread)
    def send(self, ptype: int, payload=b"", trans_id: int = 0, flags: int = 0, header: bytes = b"") -> None:
        """Queue one packet to the guest; signal it when the ring rules say so."""
        if self.writer is None:
            raise ChannelClosed(f"channel {self.relid} is closed")
        if self.backlog:
            self.backlog.append((ptype, payload, trans_id, flags, header))
            return
        try:
            signal = self.writer.write(ptype, payload, trans_id, flags, header)
        except RingFull:
            self.backlog.append((ptype, payload, trans_id, flags, header))
            return
        self.packets_out += 1
        if signal:
            self.signals_out += 1
            self.irq.signal()

    def _flush_backlog(self) -> bool:
        """Write queued replies; True when all went out."""
        while self.backlog:
            ptype, payload, trans_id, flags, header = self.backlog[0]
            try:
                signal = self.writer.write(ptype, payload, trans_id, flags, header)
            except RingFull:
                return False
            self.backlog.popleft()
            self.packets_out += 1
            if signal:
                self.signals_out += 1
                self.irq.signal()
        return True

    def process(self) -> bool:
        """Serve up to PACKETS_PER_WAKE guest packets; True when more are waiting (call again).

        A protocol violation closes the channel and is reported to the host.
        """
        if self.reader is None:
            return False
        self.wakes += 1
        try:
            if not self._flush_backlog():
                return False        # the guest will signal when it has made room (pending_send_sz)
            n = 0
            reader = self.reader
            while n < PACKETS_PER_WAKE:
                pkt = reader.read()
                if pkt is None:
                    break
                n += 1
                self.packets_in += 1
                self.session.on_packet(pkt)
                if self.backlog:     # host->guest ring is full: stop taking requests until it drains
                    break
            if reader.commit():
                self.signals_out += 1
                self.irq.signal()
            # A packet written before read_index was published saw a non-empty ring and did not
            # signal: look again now, or it waits for the guest's next doorbell.
            return not self.backlog and (n == PACKETS_PER_WAKE or reader.unmask())
        except (RingError, ServiceError, GuestMemoryError, ChannelClosed) as e:
            self.host.channel_violation(self, str(e))
            return False

    # ---------------------------------------------------------------- guest memory for services
    def guest_read(self, gpa: int, n: int) -> bytes:
        """n bytes of guest RAM at gpa (a service's buffer); GuestMemoryError outside RAM."""
        return self.host.memory.read(gpa, n)

    def guest_write(self, gpa: int, data) -> None:
        """Write into guest RAM at gpa; GuestMemoryError outside RAM."""
        self.host.memory.write(gpa, data)

    # ---------------------------------------------------------------- inspection
    def snapshot(self) -> dict:
        """The channel's state as plain data (stats, cores)."""
        out = {"relid": self.relid, "service": self.service.name, "state": self.state,
               "version": self.version, "gpadl": self.gpadl_id, "data_gpadl": self.data_gpadl_id, "opens": self.opens,
               "packets_in": self.packets_in, "packets_out": self.packets_out,
               "signals_out": self.signals_out, "wakes": self.wakes, "backlog": len(self.backlog),
               "closed_reason": self.closed_reason}
        for name, ring in (("guest_to_host", self.reader), ("host_to_guest", self.writer)):
            if ring is not None:
                try:
                    w, r = ring.indices()
                    out[name] = {"write_index": w, "read_index": r, "interrupt_mask": ring.interrupt_mask,
                                 "data_size": ring.data_size}
                except (RingError, ValueError) as e:
                    out[name] = {"error": str(e)}
        if self.session is not None:
            out["session"] = self.session.stats()
        if self.xfer is not None:
            out["transfer_pages"] = {"gpa": self.xfer.gpa, "size": self.xfer.size, "free": self.xfer.free_bytes,
                                     "in_use": len(self.xfer.in_use)}
        return out
