"""The root partition's side of one guest's bus: the connection, its channels, and their limits.

The guest connects through trapped registers (devices/busctl.py calls connect()), naming
its management rings; every later management message is an in-band packet on channel 0,
handled on the doorbell thread. Data channels are served on the same thread by their
services. Nothing here runs on a vCPU thread except connect/disconnect (once per boot).

The work is split as Linux's drivers/hv splits it: connection.py (the management rings,
version negotiation, the guest's record), channel_mgmt.py (offers, rescinds, GPADLs, open
and close) and channel.py (one channel's rings and session). BusHost puts them together
behind one lock and is what the machine, the bus device and the partition link hold.

What the guest may do is bounded (Limits); a message that breaks the protocol is refused
with a reason (logged, counted in stats), and a guest that keeps breaking it is
disconnected. A data channel that breaks its ring or service protocol is closed alone.
"""

from __future__ import annotations

import sys
import threading
import time

from ..record import record
from .channel_mgmt import ChannelManager
from .connection import Connection


@record
class Limits:
    """What one guest may ask of the bus."""

    max_gpadls: int = 64
    max_gpadl_pages: int = 4096          # 16 MiB in one GPADL
    max_total_pages: int = 16384         # 64 MiB mapped for one guest
    max_violations: int = 64             # refused management messages before the guest is disconnected
    max_messages_per_wake: int = 256
    vcpus: int = 256                     # target vCPUs a guest may name (each gets an MSI route and an eventfd)


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
        self.connection = Connection(memory, doorbells, interrupts, self.limits, self.log, self.lock)
        self.channel_mgmt = ChannelManager(self.connection, services, memslots)

    # ---------------------------------------------------------------- what other layers and tests read
    state = property(lambda self: self.connection.state, doc="idle, connected, contact (version agreed) or unloading")
    version = property(lambda self: self.connection.version, doc="The agreed bus version, or None.")
    target_vcpu = property(lambda self: self.connection.target_vcpu, doc="The vCPU management interrupts go to.")
    violations = property(lambda self: self.connection.violations, doc="Protocol violations over the VM's life.")
    refusals = property(lambda self: self.connection.refusals, doc="The last refusal reasons, newest last.")
    refusal_count = property(lambda self: self.connection.refusal_count, doc="Refusals over the VM's life.")
    connects = property(lambda self: self.connection.connects, doc="How many times the guest connected.")
    disconnects = property(lambda self: self.connection.disconnects, doc="How many times the host ended the connection.")
    messages_in = property(lambda self: self.connection.messages_in, doc="Management messages from the guest.")
    messages_out = property(lambda self: self.connection.messages_out, doc="Management messages to the guest.")
    channels = property(lambda self: self.channel_mgmt.channels, doc="relid -> Channel.")
    gpadls = property(lambda self: self.channel_mgmt.gpadls, doc="GPADL id -> GpadlView.")

    def connect(self, gpa: int, target_vcpu: int) -> int:
        """Map the management rings at gpa; a PYKVM_BUS_STATE_* for the guest to read back."""
        return self.connection.connect(gpa, target_vcpu)

    def disconnect(self, reason: str | None = None) -> None:
        """Close every channel, unmap every GPADL and the management rings (guest request, unload or stop)."""
        self.connection.disconnect(reason)

    def channel_violation(self, ch, reason: str) -> None:
        """A data channel broke its protocol: close it alone and tell the guest."""
        self.channel_mgmt.channel_violation(ch, reason)

    # ---------------------------------------------------------------- snapshot and reset
    def rewind_point(self):
        """The bus's part of a snapshot (ValueError while a channel is open: close them first)."""
        with self.lock:
            return self.connection.rewind_point(), self.channel_mgmt.rewind_point()

    def check_rewind(self, point) -> None:
        """ValueError when a reset cannot put the bus back to `point`; call under the lock, before changing RAM."""
        self.channel_mgmt.check_rewind(point[1])

    def rewind(self, point) -> None:
        """Put the bus back to `point` after guest RAM was reset (under the lock, after check_rewind)."""
        self.channel_mgmt.rewind(point[1])
        self.connection.rewind(point[0])

    # ---------------------------------------------------------------- host-initiated
    def rescind(self, relid: int) -> None:
        """Withdraw a channel: the guest is told and must stop using it."""
        with self.lock:
            self.channel_mgmt.rescind(relid)

    def reoffer(self, relid: int) -> int:
        """Offer a rescinded channel's service again, as a fresh offer with a new relid; that relid.

        The VMBus model: a rescind, then a new offer. The new relid is never one used before,
        so a guest's late CLOSE or RELID_RELEASED of the old channel cannot touch the new one.
        ValueError when relid is not rescinded or the relids are used up.
        """
        with self.lock:
            return self.channel_mgmt.reoffer(relid)

    def session(self, service_name: str):
        """The open session of the first channel of a service, or None."""
        with self.lock:
            return self.channel_mgmt.session(service_name)

    def with_session(self, service_name: str, fn):
        """Run fn(session) under the bus lock; ValueError when no such channel is open."""
        with self.lock:
            s = self.channel_mgmt.session(service_name)
            if s is None:
                raise ValueError(f"the guest has no open {service_name} channel")
            # a host-initiated send may fill the ring: nothing else to do, the guest drains it
            return fn(s)

    # ---------------------------------------------------------------- inspection and teardown
    def snapshot(self) -> dict:
        """Bus state as plain data (ctl stats, crash cores)."""
        with self.lock:
            return {**self.connection.snapshot(), **self.channel_mgmt.snapshot(),
                    "doorbells": self.doorbells.stats() if self.doorbells is not None else None,
                    "link": self.partition_link.snapshot() if getattr(self, "partition_link", None) else None,
                    "time": time.time()}

    def stop(self) -> None:
        """Stop the doorbell thread; a request in hand (a block write) completes first. Idempotent."""
        self.doorbells.close()

    def close(self) -> None:
        """Stop the doorbell thread, unmap everything, close services."""
        self.stop()
        with self.lock:
            self.disconnect()
            self.channel_mgmt.close_services()
            self.interrupts.close()
