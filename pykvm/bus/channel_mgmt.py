"""Channel management: offers and rescinds, the GPADLs channels live in, and opening and closing them.

As Linux's drivers/hv/channel_mgmt.c keeps the relid map and the offer/rescind life of each
channel apart from the connection and from the channel itself, this holds the channels by
relid, offers them to a guest that asked, builds the GPADLs the guest describes (bounded by
Limits), binds a channel's rings when the guest opens it, and withdraws or re-offers a service
when the host says so. Every reply and refusal goes through the Connection.
"""

from __future__ import annotations

import os

from .. import abi
from . import messages as M
from .channel import Channel
from .gpadl import GpadlError, GpadlView
from .ring import RingError
from .transfer import TransferPageSet

PAGE = 4096
MAX_RELID = 255            # re-offers take fresh relids; past this one the service stays rescinded
MAX_RETIRED = 16           # superseded channels kept until their guest releases them (one that never does)


class _PendingGpadl:
    __slots__ = ("total", "pfns")

    def __init__(self, total):
        self.total = total
        self.pfns: list[int] = []


class ChannelManager:
    """The channels of one guest's bus by relid, and the GPADLs they are opened on."""

    def __init__(self, conn, services, memslots=None):
        self.conn = conn                    # connection.Connection: replies, refusals, interrupts
        self.memory = conn.memory           # channels read and write guest memory through these two
        self.memslots = memslots            # map(gpa, size, host_addr, readonly) -> slot / unmap(slot), for transfer pages
        self.limits = conn.limits
        self.doorbells = conn.doorbells
        self.interrupts = conn.interrupts   # a direct channel wires the peer's eventfd in as an irqfd
        self.gpadls: dict[int, GpadlView] = {}
        self._pending: dict[int, _PendingGpadl] = {}
        self.channels: dict[int, Channel] = {}
        for relid, svc in enumerate(services, start=1):
            self.channels[relid] = Channel(self, relid, svc, (relid, int.from_bytes(os.urandom(8), "little")))
        self._next_relid = len(self.channels) + 1     # never reused: a late message names one channel only
        self._retired: list[int] = []       # rescinded relids a re-offer superseded, oldest first
        self._held: dict[int, int] = {}     # GPADL id -> holds: pages another partition's guest may still map
        self._deferred: set[int] = set()    # held GPADLs the guest tore down: TORNDOWN waits for the release
        self._handlers = {M.RequestOffers: self._offers, M.GpadlHeader: self._gpadl_header,
                          M.GpadlBody: self._gpadl_body, M.GpadlTeardown: self._gpadl_teardown,
                          M.OpenChannel: self._open, M.CloseChannel: self._close,
                          M.RelidReleased: self._released}
        conn.handle_channel_message = self.handle
        conn.on_disconnect = self.teardown
        conn.peer_held = lambda: len(self._held)

    def handle(self, msg) -> None:
        """One management message about offers, GPADLs or channels (the guest has made contact)."""
        self._handlers[type(msg)](msg)

    def teardown(self, reason: str | None) -> None:
        """The guest is gone: close every channel, unmap every GPADL."""
        for ch in self.channels.values():
            if ch.is_open:
                self._unregister(ch)
            ch.close(reason)
        for gid in list(self.gpadls):
            self.gpadls.pop(gid).close()
        self._pending.clear()
        # no guest is left to answer a teardown; the holds stay until the service side unmapped: till then
        # the connection answers no UNLOAD and takes no new connect (Connection.peer_held)
        self._deferred.clear()

    # ---------------------------------------------------------------- GPADLs another partition maps
    def hold(self, gid: int) -> None:
        """Another partition's guest may map GPADL gid's pages: its teardown is answered only after release()."""
        self._held[gid] = self._held.get(gid, 0) + 1

    def release(self, gid: int) -> None:
        """That mapping is gone (under the bus lock): a teardown the guest asked for meanwhile completes now."""
        n = self._held.get(gid, 0) - 1
        if n > 0:
            self._held[gid] = n
            return
        self._held.pop(gid, None)
        if not self._held and self.conn.state == "unloading":
            self.conn.finish_unload()
            return
        if gid in self._deferred:
            self._deferred.discard(gid)
            view = self.gpadls.pop(gid, None)
            if view is not None:
                view.close()
            if self.conn.state == "contact":
                self.conn.send(M.gpadl_result("gpadl_torndown", gid, abi.PYKVM_BUS_OK))

    # ---------------------------------------------------------------- data channels (bus thread)
    def on_doorbell(self, relid: int, _count: int) -> None:
        """The guest rang an open channel: serve it until it has nothing more."""
        with self.conn.lock:
            ch = self.channels.get(relid)
            if ch is None or not ch.is_open:
                return
            while ch.process():
                pass    # a busy channel: serve it again (its budget bounds one pass)

    def channel_violation(self, ch: Channel, reason: str) -> None:
        """A data channel broke its protocol: close it alone and tell the guest."""
        self.conn.refuse(f"channel {ch.relid} ({ch.service.name}): {reason}; channel closed")
        self._unregister(ch)
        ch.close(reason)
        self.conn.send(M.relid_msg("closed", ch.relid, abi.PYKVM_BUS_E_INVALID))

    def _unregister(self, ch: Channel) -> None:
        if ch.relid in self.doorbells:
            self.doorbells.remove(ch.relid)

    # ---------------------------------------------------------------- offers
    def _offers(self, _msg) -> None:
        send = self.conn.send
        for ch in self.channels.values():
            if ch.state != "rescinded":
                send(M.offer(ch.relid, ch.service.interface, ch.instance, ch.service.versions,
                             getattr(ch.service, "offer_flags", 0)))
        send(M.simple("all_offers_delivered"))

    # ---------------------------------------------------------------- GPADLs
    def _gpadl_header(self, msg: M.GpadlHeader) -> None:
        lim, conn = self.limits, self.conn
        gid = msg.gpadl
        if gid == 0 or gid in self.gpadls or gid in self._pending:
            conn.violation(f"GPADL id {gid} is zero or in use")
            return conn.send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_INVALID))
        mapped = sum(v.size // PAGE for v in self.gpadls.values())
        pending = sum(p.total for p in self._pending.values())
        if (not 1 <= msg.total <= lim.max_gpadl_pages or len(self.gpadls) + len(self._pending) >= lim.max_gpadls
                or mapped + pending + msg.total > lim.max_total_pages):
            conn.refuse(f"GPADL {gid} of {msg.total} pages is over the limits ({lim.max_gpadl_pages} pages "
                        f"each, {lim.max_gpadls} GPADLs, {lim.max_total_pages} pages in all)")
            return conn.send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_LIMIT))
        p = _PendingGpadl(msg.total)
        self._pending[gid] = p
        self._gpadl_add(gid, p, msg.pfns)

    def _gpadl_body(self, msg: M.GpadlBody) -> None:
        p = self._pending.get(msg.gpadl)
        if p is None:
            return self.conn.violation(f"GPADL body for {msg.gpadl}, which is not being built")
        self._gpadl_add(msg.gpadl, p, msg.pfns)

    def _gpadl_add(self, gid: int, p: _PendingGpadl, pfns) -> None:
        conn = self.conn
        if len(p.pfns) + len(pfns) > p.total:
            del self._pending[gid]
            conn.violation(f"GPADL {gid}: more pfns than its {p.total} pages")
            return conn.send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_INVALID))
        p.pfns.extend(pfns)
        if len(p.pfns) < p.total:
            return
        del self._pending[gid]
        try:
            view = GpadlView.create(self.memory, p.pfns, max_pages=self.limits.max_gpadl_pages)
        except GpadlError as e:
            conn.refuse(f"GPADL {gid}: {e.reason}")
            return conn.send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_INVALID))
        except OSError as e:
            conn.refuse(f"GPADL {gid}: cannot map: {e}")
            return conn.send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_LIMIT))
        self.gpadls[gid] = view
        conn.send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_OK))

    def _gpadl_teardown(self, msg: M.GpadlTeardown) -> None:
        conn = self.conn
        gid = msg.gpadl
        if gid in self._pending:
            del self._pending[gid]
            return conn.send(M.gpadl_result("gpadl_torndown", gid, abi.PYKVM_BUS_OK))
        view = self.gpadls.get(gid)
        if view is None:
            conn.violation(f"teardown of unknown GPADL {gid}")
            return conn.send(M.gpadl_result("gpadl_torndown", gid, abi.PYKVM_BUS_E_NOT_FOUND))
        if gid in self._deferred:
            return conn.violation(f"teardown of GPADL {gid}, which is being torn down")
        for ch in self.channels.values():
            if ch.is_open and gid in (ch.gpadl_id, ch.data_gpadl_id):   # its rings go with it: close it first
                self._unregister(ch)
                ch.close(f"its GPADL {gid} was torn down while open")
        if gid in self._held:           # a direct channel's pages: answered once the service side unmapped them
            self._deferred.add(gid)
            return
        self.gpadls.pop(gid).close()
        conn.send(M.gpadl_result("gpadl_torndown", gid, abi.PYKVM_BUS_OK))

    # ---------------------------------------------------------------- open / close / release
    def _open(self, msg: M.OpenChannel) -> None:
        conn = self.conn
        ch = self.channels.get(msg.relid)
        if ch is None or ch.state == "rescinded":
            conn.violation(f"open of unknown channel {msg.relid}")
            return conn.send(M.open_result(msg.relid, abi.PYKVM_BUS_E_NOT_FOUND))
        if ch.is_open:
            conn.violation(f"open of channel {msg.relid}, which is open")
            return conn.send(M.open_result(msg.relid, abi.PYKVM_BUS_E_STATE))
        svc = ch.service
        version, why = svc.choose_version(msg.versions)
        if version is None:
            conn.refuse(f"channel {ch.relid} ({svc.name}): {why}")
            return conn.send(M.open_result(msg.relid, abi.PYKVM_BUS_E_VERSION, 0, svc.versions))
        view = self.gpadls.get(msg.ring_gpadl)
        in_use = {g for c in self.channels.values() if c.is_open for g in (c.gpadl_id, c.data_gpadl_id)} | self._deferred
        data_view = None
        if msg.data_gpadl:
            data_view = self.gpadls.get(msg.data_gpadl)
            if (data_view is None or msg.data_gpadl in in_use or msg.data_gpadl == msg.ring_gpadl
                    or not getattr(svc, "offer_flags", 0) & abi.PYKVM_BUS_OFFER_FLAG_DATA_BUFFER):
                conn.violation(f"open of channel {msg.relid} with data GPADL {msg.data_gpadl}: unknown, in use, "
                               "or the offer takes no data buffer")
                return conn.send(M.open_result(msg.relid, abi.PYKVM_BUS_E_INVALID))
        if view is None or msg.ring_gpadl in in_use:
            conn.violation(f"open of channel {msg.relid} with GPADL {msg.ring_gpadl}, unknown or in use")
            return conn.send(M.open_result(msg.relid, abi.PYKVM_BUS_E_INVALID))
        xfer = None
        try:
            irq = conn.irq_for(msg.target_vcpu)
            if svc.transfer_pages and self.memslots is not None:
                xfer = TransferPageSet(self.memslots, abi.PYKVM_BUS_XFER_BASE + ch.relid * abi.PYKVM_BUS_XFER_STRIDE,
                                       svc.transfer_pages)
            ch.gpadl_id = msg.ring_gpadl
            ch.data_gpadl_id = msg.data_gpadl or None
            ch.open(view, msg.inbound_offset, irq, version, xfer, data_view)
            if not getattr(ch.session, "direct", False):    # a direct channel's doorbell is the service VM's irqfd
                self.doorbells.add(ch.relid, self.on_doorbell)
        except (RingError, ValueError, OSError) as e:
            ch.close()
            if xfer is not None and ch.xfer is None:
                xfer.close()
            conn.violation(f"open of channel {msg.relid}: {e}")
            return conn.send(M.open_result(msg.relid, abi.PYKVM_BUS_E_INVALID))
        conn.send(M.open_result(msg.relid, abi.PYKVM_BUS_OK, version, xfer_gpa=xfer.gpa if xfer else 0,
                                xfer_pages=xfer.size // PAGE if xfer else 0))
        # packets the guest queued before the open completed are served now
        # (not a direct channel's: its packets never come here)
        while ch.is_open and not getattr(ch.session, "direct", False) and ch.process():
            pass

    def _close(self, msg: M.CloseChannel) -> None:
        ch = self.channels.get(msg.relid)
        if ch is None or not ch.is_open:
            return self.conn.violation(f"close of channel {msg.relid}, which is not open")
        self._unregister(ch)
        ch.close()

    def _released(self, msg: M.RelidReleased) -> None:
        ch = self.channels.get(msg.relid)
        if ch is None or ch.state != "rescinded":
            return self.conn.violation(f"release of channel {msg.relid}, which was not rescinded")
        ch.released = True
        if msg.relid in self._retired:      # its service lives on under a newer relid: forget this one
            self._retired.remove(msg.relid)
            del self.channels[msg.relid]

    # ---------------------------------------------------------------- host-initiated (under the bus lock)
    def rescind(self, relid: int) -> None:
        """Withdraw a channel: the guest is told and must stop using it."""
        ch = self.channels.get(relid)
        if ch is None or ch.state == "rescinded":
            raise ValueError(f"no channel {relid} to rescind")
        if ch.is_open:
            self._unregister(ch)
        ch.close("rescinded by the host")
        ch.state = "rescinded"
        if self.conn.state == "contact":
            self.conn.send(M.relid_msg("rescind", relid))

    def reoffer(self, relid: int) -> int:
        """Offer a rescinded channel's service again under a relid never used before; that relid."""
        old = self.channels.get(relid)
        if old is None or old.state != "rescinded":
            raise ValueError(f"channel {relid} is not rescinded")
        if self._next_relid > MAX_RELID:
            raise ValueError(f"no relid left to offer {old.service.name} again (at most {MAX_RELID})")
        new = self._next_relid
        self._next_relid += 1
        ch = Channel(self, new, old.service, old.instance)
        ch.opens = old.opens
        self.channels[new] = ch
        if getattr(old, "released", False):
            del self.channels[relid]
        else:                           # kept until released; a guest that never releases loses the oldest
            self._retired.append(relid)
            while len(self._retired) > MAX_RETIRED:
                self.channels.pop(self._retired.pop(0), None)
        if self.conn.state == "contact":
            self.conn.send(M.offer(new, ch.service.interface, ch.instance, ch.service.versions,
                                   getattr(ch.service, "offer_flags", 0)))
        return new

    def session(self, service_name: str):
        """The open session of the first channel of a service, or None."""
        for ch in self.channels.values():
            if ch.service.name == service_name and ch.is_open:
                return ch.session
        return None

    def snapshot(self) -> dict:
        """The channels' and GPADLs' part of the bus state (call under the lock)."""
        return {
            "gpadls": [{"id": gid, "pages": v.size // PAGE, "pfns": list(v.pfns[:8]),
                        "runs": v.runs} for gid, v in sorted(self.gpadls.items())],
            "channels": [ch.snapshot() for ch in self.channels.values()],
        }

    # ---------------------------------------------------------------- snapshot and reset (snapshot/reset.py)
    def rewind_point(self) -> tuple:
        """What a reset needs to put the channels back: each GPADL's pages and the offers. ValueError
        while a channel is open or a GPADL is being built or held: their host side cannot be rewound."""
        for ch in self.channels.values():
            if ch.is_open:
                raise ValueError(f"bus channel {ch.relid} ({ch.service.name}) is open at the snapshot: a reset "
                                 "cannot rewind its host side (close the guest's channels before the snapshot)")
        if self._pending or self._held or self._deferred:
            raise ValueError("a GPADL is being built or torn down at the snapshot")
        return ({gid: v.pfns for gid, v in self.gpadls.items()}, self._offers_now())

    def check_rewind(self, point: tuple) -> None:
        """ValueError when the channels cannot be put back to `point` (nothing is changed)."""
        if self._held:
            raise ValueError(f"GPADLs {sorted(self._held)} are still mapped by another partition's guest (a "
                             "direct channel opened since the snapshot); reset once its VMM has unmapped them")
        if self._offers_now() != point[1]:
            raise ValueError("the bus offers changed since the snapshot (a rescind or a re-offer)")

    def rewind(self, point: tuple) -> None:
        """Put channels and GPADLs back to `point`, host side only: the guest, reset with its RAM, believes
        it never opened what was opened since (check_rewind first)."""
        for ch in self.channels.values():
            if ch.is_open:
                self._unregister(ch)
                ch.close("the VM was reset to a snapshot")
        self._pending.clear()
        self._deferred.clear()
        gpadls = point[0]
        for gid in list(self.gpadls):
            if gpadls.get(gid) != self.gpadls[gid].pfns:
                self.gpadls.pop(gid).close()
        for gid, pfns in gpadls.items():
            if gid not in self.gpadls:        # torn down since: the snapshot's guest still has it
                try:
                    self.gpadls[gid] = GpadlView.create(self.memory, pfns, max_pages=len(pfns))
                except (GpadlError, OSError) as e:     # its opens will be refused as for an unknown GPADL
                    self.conn.refuse(f"GPADL {gid} cannot be mapped again after the reset: {e}")

    def _offers_now(self) -> tuple:
        return tuple((relid, ch.state == "rescinded") for relid, ch in self.channels.items())

    def close_services(self) -> None:
        """Close every channel's service (the bus is going away)."""
        for ch in self.channels.values():
            ch.service.close()
