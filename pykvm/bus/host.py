"""The root partition's side of one guest's bus: contact, offers, GPADLs, channels, and their limits.

The guest connects through trapped registers (devices/busctl.py calls connect()), naming
its management rings; every later management message is an in-band packet on channel 0,
handled here on the doorbell thread. Data channels are served on the same thread by their
services. Nothing here runs on a vCPU thread except connect/disconnect (once per boot).

What the guest may do is bounded (Limits); a message that breaks the protocol is refused
with a reason (logged, counted in stats), and a guest that keeps breaking it is
disconnected. A data channel that breaks its ring or service protocol is closed alone.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from .. import abi
from ..record import record
from . import messages as M
from .channel import Channel
from .gpadl import GpadlError, GpadlView
from .ring import INBAND, RingError, RingFull, RingReader, RingWriter
from .transfer import TransferPageSet

PAGE = 4096
MGMT_RING_PAGES = 1 + abi.PYKVM_BUS_MGMT_DATA_PAGES
SUPPORTED_VERSIONS = (abi.PYKVM_BUS_VERSION_1_0,)   # newest first
MAX_RELID = 255            # re-offers take fresh relids; past this one the service stays rescinded
MAX_RETIRED = 16           # superseded channels kept until their guest releases them (one that never does)


@record
class Limits:
    """What one guest may ask of the bus."""

    max_gpadls: int = 64
    max_gpadl_pages: int = 4096          # 16 MiB in one GPADL
    max_total_pages: int = 16384         # 64 MiB mapped for one guest
    max_violations: int = 64             # refused management messages before the guest is disconnected
    max_messages_per_wake: int = 256
    vcpus: int = 256                     # target vCPUs a guest may name (each gets an MSI route and an eventfd)


class _PendingGpadl:
    __slots__ = ("total", "pfns")

    def __init__(self, total):
        self.total = total
        self.pfns: list[int] = []


class BusHost:
    """The bus of one guest partition, seen from the root."""

    def __init__(self, memory, doorbells, interrupts, services, limits: Limits | None = None, log=None,
                 memslots=None):
        self.memory = memory
        self.memslots = memslots            # map(gpa, size, host_addr, readonly) -> slot / unmap(slot), for transfer pages
        self.doorbells = doorbells          # bus.doorbell.Doorbells (ioeventfd + thread)
        self.interrupts = interrupts        # bus.doorbell.Interrupts (MSI routes + irqfd)
        self.limits = limits or Limits()
        self.log = log or (lambda msg: print(f"pykvm: bus: {msg}", file=sys.stderr))
        # One lock with the doorbell thread, which holds its lock while a callback (this host)
        # runs: separate locks taken in opposite orders (a doorbell, then the bus; `stats` or a
        # rescind, then the doorbells) deadlocked the bus and the machine's main thread.
        self.lock = getattr(doorbells, "lock", None) or threading.RLock()
        self.state = "idle"                 # idle -> connected -> contact (version agreed) -> idle
        self.version = None
        self.target_vcpu = 0
        self._mgmt_view = None
        self._mgmt_in: RingReader | None = None
        self._mgmt_out: RingWriter | None = None
        self._mgmt_irq = None
        self._irqs: dict[int, object] = {}  # target vCPU -> Interrupt
        self.gpadls: dict[int, GpadlView] = {}
        self._pending: dict[int, _PendingGpadl] = {}
        self.channels: dict[int, Channel] = {}
        for relid, svc in enumerate(services, start=1):
            self.channels[relid] = Channel(self, relid, svc, (relid, int.from_bytes(os.urandom(8), "little")))
        self._next_relid = len(self.channels) + 1     # never reused: a late message names one channel only
        self._retired: list[int] = []       # rescinded relids a re-offer superseded, oldest first
        self.violations = 0                 # over the VM's life
        self._conn_violations = 0           # since the guest last connected: what the disconnect limit counts
        self.refusals: list[str] = []       # the last reasons, newest last
        self.refusal_count = 0
        self.messages_in = self.messages_out = 0
        self.connects = 0

    # ---------------------------------------------------------------- connect (vCPU thread, trapped)
    def connect(self, gpa: int, target_vcpu: int) -> int:
        """Map the management rings at gpa; a PYKVM_BUS_STATE_* for the guest to read back."""
        with self.lock:
            if self.state != "idle":
                self._refuse(f"connect while {self.state}: disconnect first")
                return abi.PYKVM_BUS_STATE_REFUSED
            if gpa % PAGE:
                self._refuse(f"management area {gpa:#x} is not page aligned")
                return abi.PYKVM_BUS_STATE_REFUSED
            pfns = [gpa // PAGE + i for i in range(2 * MGMT_RING_PAGES)]
            try:
                view = GpadlView.create(self.memory, pfns, max_pages=len(pfns))
            except GpadlError as e:
                self._refuse(f"management area {gpa:#x}: {e.reason}")
                return abi.PYKVM_BUS_STATE_REFUSED
            try:
                self._mgmt_in = RingReader.from_view(view, 0, MGMT_RING_PAGES)
                self._mgmt_out = RingWriter.from_view(view, MGMT_RING_PAGES, MGMT_RING_PAGES)
                self._mgmt_irq = self._irq_for(target_vcpu)
                self.doorbells.add(abi.PYKVM_BUS_MGMT_RELID, self._on_doorbell)
            except (RingError, ValueError, OSError) as e:
                self._drop_mgmt(view)
                self._refuse(f"management rings at {gpa:#x}: {e}")
                return abi.PYKVM_BUS_STATE_REFUSED
            self._mgmt_view = view
            self.target_vcpu = target_vcpu
            self.state = "connected"
            self.connects += 1
            self._conn_violations = 0    # a reconnected guest starts with a clean record
            return abi.PYKVM_BUS_STATE_CONNECTED

    def _irq_for(self, vcpu: int):
        irq = self._irqs.get(vcpu)
        if irq is None:
            if not 0 <= vcpu < self.limits.vcpus:
                raise ValueError(f"there is no vCPU {vcpu} (the VM has {self.limits.vcpus})")
            irq = self.interrupts.allocate(abi.PYKVM_BUS_VECTOR, vcpu)
            self._irqs[vcpu] = irq
        return irq

    def _drop_mgmt(self, view) -> None:
        for ring in (self._mgmt_in, self._mgmt_out):
            if ring is not None:
                ring.close()
        self._mgmt_in = self._mgmt_out = None
        if view is not None:
            view.close()

    def disconnect(self, reason: str | None = None) -> None:
        """Close every channel, unmap every GPADL and the management rings (guest request, unload or stop)."""
        with self.lock:
            if reason:
                self.log(f"disconnecting the guest: {reason}")
            for ch in self.channels.values():
                if ch.is_open:
                    self._unregister(ch)
                ch.close(reason)
            for gid in list(self.gpadls):
                self.gpadls.pop(gid).close()
            self._pending.clear()
            if self.state != "idle":
                if abi.PYKVM_BUS_MGMT_RELID in self.doorbells:
                    self.doorbells.remove(abi.PYKVM_BUS_MGMT_RELID)
                self._drop_mgmt(self._mgmt_view)
                self._mgmt_view = None
            self.state = "idle"
            self.version = None

    # ---------------------------------------------------------------- doorbells (bus thread)
    def _on_doorbell(self, relid: int, _count: int) -> None:
        with self.lock:
            if relid == abi.PYKVM_BUS_MGMT_RELID:
                self._process_mgmt()
                return
            ch = self.channels.get(relid)
            if ch is None or not ch.is_open:
                return
            while ch.process():
                pass    # a busy channel: serve it again (its budget bounds one pass)

    def _process_mgmt(self) -> None:
        while self._mgmt_pass():
            pass    # more came (see _mgmt_pass): serve them now

    def _mgmt_pass(self) -> bool:
        """Handle up to max_messages_per_wake messages; True when more are waiting."""
        if self._mgmt_in is None:
            return False
        more = True                         # unless the ring runs dry within the budget
        for _ in range(self.limits.max_messages_per_wake):
            try:
                pkt = self._mgmt_in.read()
            except RingError as e:
                self.disconnect(f"management ring broken: {e.reason}")
                return False
            if pkt is None:
                more = False
                break
            self.messages_in += 1
            if pkt.type != INBAND:
                self._violation(f"management packet of type {pkt.type}, expected in-band")
            else:
                try:
                    msg = M.parse(pkt.payload)
                except M.MessageError as e:
                    self._violation(str(e))
                else:
                    self._handle(msg)
            if self.state == "idle":        # unloaded or disconnected while handling
                return False
        try:
            if self._mgmt_in.commit():
                self._mgmt_irq.signal()
            # a message written before read_index was published saw a non-empty ring and did not signal
            return more or self._mgmt_in.unmask()
        except RingError as e:
            self.disconnect(f"management ring broken: {e.reason}")
            return False

    def _send(self, data: bytes) -> None:
        if self._mgmt_out is None:
            return
        try:
            signal = self._mgmt_out.write(INBAND, data)
        except RingFull:
            # the guest does not read its management ring: it loses this message, and is told why
            self._violation("management ring from the host is full (the guest does not read it)")
            return
        except RingError as e:
            self.disconnect(f"management ring broken: {e.reason}")
            return
        self.messages_out += 1
        if signal:
            self._mgmt_irq.signal()

    # ---------------------------------------------------------------- refusals
    def _refuse(self, reason: str) -> None:
        self.refusal_count += 1
        self.refusals = (self.refusals + [reason])[-16:]
        if self.refusal_count <= 20 or self.refusal_count % 1000 == 0:   # rate-limited log
            self.log(f"refused: {reason}" + (f" ({self.refusal_count} so far)" if self.refusal_count > 20 else ""))

    def _violation(self, reason: str) -> None:
        self._refuse(reason)
        self.violations += 1
        self._conn_violations += 1
        if self._conn_violations > self.limits.max_violations and self.state != "idle":
            self.disconnect(f"{self._conn_violations} protocol violations since it connected")

    def channel_violation(self, ch: Channel, reason: str) -> None:
        """A data channel broke its protocol: close it alone and tell the guest."""
        self._refuse(f"channel {ch.relid} ({ch.service.name}): {reason}; channel closed")
        self._unregister(ch)
        ch.close(reason)
        self._send(M.relid_msg("closed", ch.relid, abi.PYKVM_BUS_E_INVALID))

    def _unregister(self, ch: Channel) -> None:
        if ch.relid in self.doorbells:
            self.doorbells.remove(ch.relid)

    # ---------------------------------------------------------------- management messages
    def _handle(self, msg) -> None:
        if isinstance(msg, M.InitiateContact):
            return self._initiate(msg)
        if self.state != "contact":
            return self._violation(f"{type(msg).__name__} before version negotiation")
        handler = {M.RequestOffers: self._offers, M.GpadlHeader: self._gpadl_header,
                   M.GpadlBody: self._gpadl_body, M.GpadlTeardown: self._gpadl_teardown,
                   M.OpenChannel: self._open, M.CloseChannel: self._close,
                   M.RelidReleased: self._released, M.Unload: self._unload}[type(msg)]
        handler(msg)

    def _initiate(self, msg: M.InitiateContact) -> None:
        if self.state == "contact":
            return self._violation("initiate contact twice")
        chosen = next((v for v in msg.versions if v in SUPPORTED_VERSIONS), None)
        if chosen is None:
            self._refuse(f"bus versions {M.versions_text(msg.versions)} proposed; this host speaks "
                         f"{M.versions_text(SUPPORTED_VERSIONS)}")
            return self._send(M.version_response(False, 0, SUPPORTED_VERSIONS))
        try:
            self._mgmt_irq = self._irq_for(msg.target_vcpu)
        except (ValueError, OSError) as e:
            self._violation(f"target vCPU {msg.target_vcpu}: {e}")
            return self._send(M.version_response(False, 0, SUPPORTED_VERSIONS))
        self.version = chosen
        self.target_vcpu = msg.target_vcpu
        self.state = "contact"
        self._send(M.version_response(True, chosen, SUPPORTED_VERSIONS))

    def _offers(self, _msg) -> None:
        for ch in self.channels.values():
            if ch.state != "rescinded":
                self._send(M.offer(ch.relid, ch.service.interface, ch.instance, ch.service.versions))
        self._send(M.simple("all_offers_delivered"))

    def _gpadl_header(self, msg: M.GpadlHeader) -> None:
        lim = self.limits
        gid = msg.gpadl
        if gid == 0 or gid in self.gpadls or gid in self._pending:
            self._violation(f"GPADL id {gid} is zero or in use")
            return self._send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_INVALID))
        mapped = sum(v.size // PAGE for v in self.gpadls.values())
        pending = sum(p.total for p in self._pending.values())
        if (not 1 <= msg.total <= lim.max_gpadl_pages or len(self.gpadls) + len(self._pending) >= lim.max_gpadls
                or mapped + pending + msg.total > lim.max_total_pages):
            self._refuse(f"GPADL {gid} of {msg.total} pages is over the limits ({lim.max_gpadl_pages} pages "
                         f"each, {lim.max_gpadls} GPADLs, {lim.max_total_pages} pages in all)")
            return self._send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_LIMIT))
        p = _PendingGpadl(msg.total)
        self._pending[gid] = p
        self._gpadl_add(gid, p, msg.pfns)

    def _gpadl_body(self, msg: M.GpadlBody) -> None:
        p = self._pending.get(msg.gpadl)
        if p is None:
            return self._violation(f"GPADL body for {msg.gpadl}, which is not being built")
        self._gpadl_add(msg.gpadl, p, msg.pfns)

    def _gpadl_add(self, gid: int, p: _PendingGpadl, pfns) -> None:
        if len(p.pfns) + len(pfns) > p.total:
            del self._pending[gid]
            self._violation(f"GPADL {gid}: more pfns than its {p.total} pages")
            return self._send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_INVALID))
        p.pfns.extend(pfns)
        if len(p.pfns) < p.total:
            return
        del self._pending[gid]
        try:
            view = GpadlView.create(self.memory, p.pfns, max_pages=self.limits.max_gpadl_pages)
        except GpadlError as e:
            self._refuse(f"GPADL {gid}: {e.reason}")
            return self._send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_INVALID))
        except OSError as e:
            self._refuse(f"GPADL {gid}: cannot map: {e}")
            return self._send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_E_LIMIT))
        self.gpadls[gid] = view
        self._send(M.gpadl_result("gpadl_created", gid, abi.PYKVM_BUS_OK))

    def _gpadl_teardown(self, msg: M.GpadlTeardown) -> None:
        gid = msg.gpadl
        if gid in self._pending:
            del self._pending[gid]
            return self._send(M.gpadl_result("gpadl_torndown", gid, abi.PYKVM_BUS_OK))
        view = self.gpadls.get(gid)
        if view is None:
            self._violation(f"teardown of unknown GPADL {gid}")
            return self._send(M.gpadl_result("gpadl_torndown", gid, abi.PYKVM_BUS_E_NOT_FOUND))
        for ch in self.channels.values():
            if ch.is_open and ch.gpadl_id == gid:   # its rings go with it: close that channel first
                self._unregister(ch)
                ch.close(f"its ring GPADL {gid} was torn down while open")
        self.gpadls.pop(gid).close()
        self._send(M.gpadl_result("gpadl_torndown", gid, abi.PYKVM_BUS_OK))

    def _open(self, msg: M.OpenChannel) -> None:
        ch = self.channels.get(msg.relid)
        if ch is None or ch.state == "rescinded":
            self._violation(f"open of unknown channel {msg.relid}")
            return self._send(M.open_result(msg.relid, abi.PYKVM_BUS_E_NOT_FOUND))
        if ch.is_open:
            self._violation(f"open of channel {msg.relid}, which is open")
            return self._send(M.open_result(msg.relid, abi.PYKVM_BUS_E_STATE))
        svc = ch.service
        version, why = svc.choose_version(msg.versions)
        if version is None:
            self._refuse(f"channel {ch.relid} ({svc.name}): {why}")
            return self._send(M.open_result(msg.relid, abi.PYKVM_BUS_E_VERSION, 0, svc.versions))
        view = self.gpadls.get(msg.ring_gpadl)
        if view is None or any(c.is_open and c.gpadl_id == msg.ring_gpadl for c in self.channels.values()):
            self._violation(f"open of channel {msg.relid} with GPADL {msg.ring_gpadl}, unknown or in use")
            return self._send(M.open_result(msg.relid, abi.PYKVM_BUS_E_INVALID))
        xfer = None
        try:
            irq = self._irq_for(msg.target_vcpu)
            if svc.transfer_pages and self.memslots is not None:
                xfer = TransferPageSet(self.memslots, abi.PYKVM_BUS_XFER_BASE + ch.relid * abi.PYKVM_BUS_XFER_STRIDE,
                                       svc.transfer_pages)
            ch.open(view, msg.inbound_offset, irq, version, xfer)
            ch.gpadl_id = msg.ring_gpadl
            if not getattr(ch.session, "direct", False):    # a direct channel's doorbell is the service VM's irqfd
                self.doorbells.add(ch.relid, self._on_doorbell)
        except (RingError, ValueError, OSError) as e:
            ch.close()
            if xfer is not None and ch.xfer is None:
                xfer.close()
            self._violation(f"open of channel {msg.relid}: {e}")
            return self._send(M.open_result(msg.relid, abi.PYKVM_BUS_E_INVALID))
        self._send(M.open_result(msg.relid, abi.PYKVM_BUS_OK, version, xfer_gpa=xfer.gpa if xfer else 0,
                                 xfer_pages=xfer.size // PAGE if xfer else 0))
        # packets the guest queued before the open completed are served now (not a direct channel's: never here)
        while ch.is_open and not getattr(ch.session, "direct", False) and ch.process():
            pass

    def _close(self, msg: M.CloseChannel) -> None:
        ch = self.channels.get(msg.relid)
        if ch is None or not ch.is_open:
            return self._violation(f"close of channel {msg.relid}, which is not open")
        self._unregister(ch)
        ch.close()

    def _released(self, msg: M.RelidReleased) -> None:
        ch = self.channels.get(msg.relid)
        if ch is None or ch.state != "rescinded":
            return self._violation(f"release of channel {msg.relid}, which was not rescinded")
        ch.released = True
        if msg.relid in self._retired:      # its service lives on under a newer relid: forget this one
            self._retired.remove(msg.relid)
            del self.channels[msg.relid]

    def _unload(self, _msg) -> None:
        self._send(M.simple("unload_response"))
        self.disconnect()

    # ---------------------------------------------------------------- host-initiated
    def rescind(self, relid: int) -> None:
        """Withdraw a channel: the guest is told and must stop using it."""
        with self.lock:
            ch = self.channels.get(relid)
            if ch is None or ch.state == "rescinded":
                raise ValueError(f"no channel {relid} to rescind")
            if ch.is_open:
                self._unregister(ch)
            ch.close("rescinded by the host")
            ch.state = "rescinded"
            if self.state == "contact":
                self._send(M.relid_msg("rescind", relid))

    def reoffer(self, relid: int) -> int:
        """Offer a rescinded channel's service again, as a fresh offer with a new relid; that relid.

        The VMBus model: a rescind, then a new offer. The new relid is never one used before,
        so a guest's late CLOSE or RELID_RELEASED of the old channel cannot touch the new one.
        ValueError when relid is not rescinded or the relids are used up.
        """
        with self.lock:
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
            if self.state == "contact":
                self._send(M.offer(new, ch.service.interface, ch.instance, ch.service.versions))
            return new

    def session(self, service_name: str):
        """The open session of the first channel of a service, or None."""
        with self.lock:
            for ch in self.channels.values():
                if ch.service.name == service_name and ch.is_open:
                    return ch.session
        return None

    def with_session(self, service_name: str, fn):
        """Run fn(session) under the bus lock; ValueError when no such channel is open."""
        with self.lock:
            s = self.session(service_name)
            if s is None:
                raise ValueError(f"the guest has no open {service_name} channel")
            result = fn(s)
            # a host-initiated send may have filled the ring: nothing else to do, the guest drains it
            return result

    # ---------------------------------------------------------------- inspection and teardown
    def snapshot(self) -> dict:
        """Bus state as plain data (ctl stats, crash cores)."""
        with self.lock:
            mgmt = None
            if self._mgmt_in is not None:
                try:
                    mgmt = {"guest_to_host": self._mgmt_in.indices(), "host_to_guest": self._mgmt_out.indices()}
                except (RingError, ValueError):
                    mgmt = None
            return {
                "state": self.state, "version": None if self.version is None else M.version_text(self.version),
                "connects": self.connects, "target_vcpu": self.target_vcpu,
                "messages_in": self.messages_in, "messages_out": self.messages_out, "management": mgmt,
                "violations": self.violations, "refusals": self.refusal_count, "last_refusals": list(self.refusals),
                "gpadls": [{"id": gid, "pages": v.size // PAGE, "pfns": list(v.pfns[:8]),
                            "runs": v.runs} for gid, v in sorted(self.gpadls.items())],
                "channels": [ch.snapshot() for ch in self.channels.values()],
                "doorbells": self.doorbells.stats() if self.doorbells is not None else None,
                "link": self.partition_link.snapshot() if getattr(self, "partition_link", None) else None,
                "time": time.time(),
            }

    def stop(self) -> None:
        """Stop the doorbell thread; a request in hand (a block write) completes first. Idempotent."""
        self.doorbells.close()

    def close(self) -> None:
        """Stop the doorbell thread, unmap everything, close services."""
        self.stop()
        with self.lock:
            self.disconnect()
            for ch in self.channels.values():
                ch.service.close()
            self.interrupts.close()
