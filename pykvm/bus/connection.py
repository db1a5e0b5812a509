"""The guest's connection to the bus: its management rings, version negotiation, and its record.

As Linux's drivers/hv/connection.c does for a VMBus client, this holds what exists once per
guest rather than per channel: the connect/disconnect the guest makes through trapped
registers, the two management rings on which every later message travels (in-band packets
on relid 0, served on the doorbell thread), the version both sides agreed, and the record of
refused messages that ends in a disconnect when the guest keeps breaking the protocol.
Messages about offers, GPADLs and channels go to the channel manager (channel_mgmt.py).
"""

from __future__ import annotations

from .. import abi
from . import messages as M
from .gpadl import GpadlError, GpadlView
from .ring import INBAND, RingError, RingFull, RingReader, RingWriter

PAGE = 4096
MGMT_RING_PAGES = 1 + abi.PYKVM_BUS_MGMT_DATA_PAGES
SUPPORTED_VERSIONS = (abi.PYKVM_BUS_VERSION_1_0,)   # newest first


class Connection:
    """One guest's management connection: idle -> connected -> contact (version agreed) -> idle, by way
    of unloading when an UNLOAD waits for another partition to unmap the guest's pages."""

    def __init__(self, memory, doorbells, interrupts, limits, log, lock):
        self.memory = memory
        self.doorbells = doorbells          # bus.doorbell.Doorbells (ioeventfd + thread)
        self.interrupts = interrupts        # bus.doorbell.Interrupts (MSI routes + irqfd)
        self.limits = limits
        self.log = log
        self.lock = lock                    # the bus's one lock (see BusHost)
        self.handle_channel_message = None  # ChannelManager.handle: every message after contact but Unload
        self.on_disconnect = None           # ChannelManager.teardown(reason): channels and GPADLs go first
        self.peer_held = lambda: 0          # ChannelManager: GPADLs another partition's guest may still map
        self.state = "idle"
        self.version = None
        self.target_vcpu = 0
        self._mgmt_view = None
        self._mgmt_in: RingReader | None = None
        self._mgmt_out: RingWriter | None = None
        self._mgmt_irq = None
        self._irqs: dict[int, object] = {}  # target vCPU -> Interrupt
        self.violations = 0                 # over the VM's life
        self._conn_violations = 0           # since the guest last connected: what the disconnect limit counts
        self.refusals: list[str] = []       # the last reasons, newest last
        self.refusal_count = 0
        self.messages_in = self.messages_out = 0
        self.connects = 0
        self.disconnects = 0                # the host ended the connection (a broken ring, too many violations)

    # ---------------------------------------------------------------- connect (vCPU thread, trapped)
    def connect(self, gpa: int, target_vcpu: int) -> int:
        """Map the management rings at gpa; a PYKVM_BUS_STATE_* for the guest to read back."""
        with self.lock:
            if self.state != "idle":
                self.refuse(f"connect while {self.state}: disconnect first")
                return abi.PYKVM_BUS_STATE_REFUSED
            held = self.peer_held()
            if held:
                # the last connection ended (the host cut it) before a service partition unmapped its pages:
                # a new connection would let the guest reuse them as free while they are still shared
                self.refuse(f"connect while {held} GPADLs of the last connection are still mapped by another "
                            "partition's guest; try again once its VMM has unmapped them")
                return abi.PYKVM_BUS_STATE_REFUSED
            if gpa % PAGE:
                self.refuse(f"management area {gpa:#x} is not page aligned")
                return abi.PYKVM_BUS_STATE_REFUSED
            try:
                self._attach([gpa // PAGE + i for i in range(2 * MGMT_RING_PAGES)], target_vcpu)
            except GpadlError as e:
                self.refuse(f"management area {gpa:#x}: {e.reason}")
                return abi.PYKVM_BUS_STATE_REFUSED
            except (RingError, ValueError, OSError) as e:
                self.refuse(f"management rings at {gpa:#x}: {e}")
                return abi.PYKVM_BUS_STATE_REFUSED
            self.state = "connected"
            self.connects += 1
            self._conn_violations = 0    # a reconnected guest starts with a clean record
            return abi.PYKVM_BUS_STATE_CONNECTED

    def irq_for(self, vcpu: int):
        """The bus interrupt aimed at `vcpu` (made on first use); ValueError for a vCPU the VM lacks."""
        irq = self._irqs.get(vcpu)
        if irq is None:
            if not 0 <= vcpu < self.limits.vcpus:
                raise ValueError(f"there is no vCPU {vcpu} (the VM has {self.limits.vcpus})")
            irq = self.interrupts.allocate(abi.PYKVM_BUS_VECTOR, vcpu)
            self._irqs[vcpu] = irq
        return irq

    def _attach(self, pfns: list, target_vcpu: int) -> None:
        """Map the management rings on those pages as the guest's RAM holds them, their interrupt and
        doorbell; GpadlError, RingError, ValueError or OSError with nothing left mapped."""
        view = GpadlView.create(self.memory, pfns, max_pages=len(pfns))
        try:
            self._mgmt_in = RingReader.from_view(view, 0, MGMT_RING_PAGES)
            self._mgmt_out = RingWriter.from_view(view, MGMT_RING_PAGES, MGMT_RING_PAGES)
            self._mgmt_irq = self.irq_for(target_vcpu)
            self.doorbells.add(abi.PYKVM_BUS_MGMT_RELID, self.on_doorbell)
        except BaseException:
            self._drop_mgmt(view)
            raise
        self._mgmt_view = view
        self.target_vcpu = target_vcpu

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
                # the guest can break its rings and reconnect in a loop: logged like refusals, rate-limited
                self.disconnects += 1
                n = self.disconnects
                if n <= 20 or n % 1000 == 0:
                    self.log(f"disconnecting the guest: {reason}" + (f" ({n} so far)" if n > 20 else ""))
            if self.on_disconnect is not None:
                self.on_disconnect(reason)
            if self.state != "idle":
                if abi.PYKVM_BUS_MGMT_RELID in self.doorbells:
                    self.doorbells.remove(abi.PYKVM_BUS_MGMT_RELID)
                self._drop_mgmt(self._mgmt_view)
                self._mgmt_view = None
            self.state = "idle"
            self.version = None

    # ---------------------------------------------------------------- snapshot and reset (snapshot/reset.py)
    def rewind_point(self) -> tuple:
        """What a reset needs to put the connection back: its state, version, vCPU and management pages."""
        if self.state == "unloading":
            raise ValueError("the guest's bus is unloading at the snapshot")
        pfns = self._mgmt_view.pfns if self._mgmt_view is not None else None
        return (self.state, self.version, self.target_vcpu, pfns)

    def rewind(self, point: tuple) -> None:
        """Put the connection back to `point` with guest RAM already reset: the management rings are
        attached again to what the guest's RAM now holds. Host side only: the guest is told nothing."""
        state, version, target, pfns = point
        if self.state != "idle":
            if abi.PYKVM_BUS_MGMT_RELID in self.doorbells:
                self.doorbells.remove(abi.PYKVM_BUS_MGMT_RELID)
            self._drop_mgmt(self._mgmt_view)
            self._mgmt_view = None
        self.state, self.version = "idle", None
        if state == "idle":
            return
        try:
            self._attach(pfns, target)
        except (GpadlError, RingError, ValueError, OSError) as e:
            # the guest had broken its rings by the snapshot: the host ends the connection, as it would have
            self.disconnects += 1
            self.log(f"disconnecting the guest: its management rings at the snapshot are broken: {e}")
            return
        self.state, self.version = state, version

    # ---------------------------------------------------------------- management ring (bus thread)
    def on_doorbell(self, _relid: int, _count: int) -> None:
        """The guest rang relid 0: serve the management ring until it runs dry."""
        with self.lock:
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
                self.violation(f"management packet of type {pkt.type}, expected in-band")
            else:
                try:
                    msg = M.parse(pkt.payload)
                except M.MessageError as e:
                    self.violation(str(e))
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

    def send(self, data: bytes) -> None:
        """Queue one management message for the guest (lost, with a violation, when it does not read them)."""
        if self._mgmt_out is None:
            return
        try:
            signal = self._mgmt_out.write(INBAND, data)
        except RingFull:
            # the guest does not read its management ring: it loses this message, and is told why
            self.violation("management ring from the host is full (the guest does not read it)")
            return
        except RingError as e:
            self.disconnect(f"management ring broken: {e.reason}")
            return
        self.messages_out += 1
        if signal:
            self._mgmt_irq.signal()

    # ---------------------------------------------------------------- refusals
    def refuse(self, reason: str) -> None:
        """Count and (rate-limited) log a refused request."""
        self.refusal_count += 1
        self.refusals = (self.refusals + [reason])[-16:]
        if self.refusal_count <= 20 or self.refusal_count % 1000 == 0:   # rate-limited log
            self.log(f"refused: {reason}" + (f" ({self.refusal_count} so far)" if self.refusal_count > 20 else ""))

    def violation(self, reason: str) -> None:
        """A refusal that breaks the protocol; past limits.max_violations the guest is disconnected."""
        self.refuse(reason)
        self.violations += 1
        self._conn_violations += 1
        if self._conn_violations > self.limits.max_violations and self.state != "idle":
            self.disconnect(f"{self._conn_violations} protocol violations since it connected")

    # ---------------------------------------------------------------- messages of the connection itself
    def _handle(self, msg) -> None:
        if isinstance(msg, M.InitiateContact):
            return self._initiate(msg)
        if self.state == "unloading":
            return self.violation(f"{type(msg).__name__} after UNLOAD")
        if self.state != "contact":
            return self.violation(f"{type(msg).__name__} before version negotiation")
        if isinstance(msg, M.Unload):
            if self.peer_held():
                # UNLOAD_RESPONSE tells the guest every GPADL is gone: a direct channel's pages are not until
                # the service partition's VMM unmapped them, so the answer waits (finish_unload)
                self.on_disconnect(None)
                if self.peer_held():          # closing may have released them already (the link is gone)
                    self.state = "unloading"
                    return None
            self.send(M.simple("unload_response"))
            return self.disconnect()
        self.handle_channel_message(msg)

    def finish_unload(self) -> None:
        """The last page another partition mapped was released: answer the UNLOAD that waited (bus lock held)."""
        if self.state == "unloading":
            self.send(M.simple("unload_response"))
            self.disconnect()

    def _initiate(self, msg: M.InitiateContact) -> None:
        if self.state == "contact":
            return self.violation("initiate contact twice")
        chosen = next((v for v in msg.versions if v in SUPPORTED_VERSIONS), None)
        if chosen is None:
            self.refuse(f"bus versions {M.versions_text(msg.versions)} proposed; this host speaks "
                        f"{M.versions_text(SUPPORTED_VERSIONS)}")
            return self.send(M.version_response(False, 0, SUPPORTED_VERSIONS))
        try:
            self._mgmt_irq = self.irq_for(msg.target_vcpu)
        except (ValueError, OSError) as e:
            self.violation(f"target vCPU {msg.target_vcpu}: {e}")
            return self.send(M.version_response(False, 0, SUPPORTED_VERSIONS))
        self.version = chosen
        self.target_vcpu = msg.target_vcpu
        self.state = "contact"
        self.send(M.version_response(True, chosen, SUPPORTED_VERSIONS))

    def snapshot(self) -> dict:
        """The connection's part of the bus state (call under the lock)."""
        mgmt = None
        if self._mgmt_in is not None:
            try:
                mgmt = {"guest_to_host": self._mgmt_in.indices(), "host_to_guest": self._mgmt_out.indices()}
            except (RingError, ValueError):
                mgmt = None
        return {
            "state": self.state, "version": None if self.version is None else M.version_text(self.version),
            "connects": self.connects, "disconnects": self.disconnects, "target_vcpu": self.target_vcpu,
            "messages_in": self.messages_in, "messages_out": self.messages_out, "management": mgmt,
            "violations": self.violations, "refusals": self.refusal_count, "last_refusals": list(self.refusals),
        }
