"""Doorbells and interrupts of the bus: signals between guest and host that cost no VMM exit.

Guest -> host: a guest ``outl(PYKVM_PORT_BUS_DOORBELL, channel_id)`` is registered with
KVM_IOEVENTFD (port I/O, 4 bytes, datamatch = channel id), so KVM signals that channel's
eventfd and re-enters the guest without returning from KVM_RUN. One host thread waits on
every channel's eventfd with epoll and calls the channel's callback: no Python runs on a
vCPU thread for a doorbell.

Host -> guest: an Interrupt is a GSI routed as an MSI (vector, target APIC id) with an
irqfd attached; ``signal()`` writes the eventfd and KVM injects the interrupt (works with
the split irqchip, where the local APICs are in the kernel).

The mechanism only: what a doorbell means, and what to do when a callback fails, belong
to the bus above.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable

from .. import abi
from ..kvm.routing import MAX_IRQ_ROUTES, msi_address

DOORBELL_WIDTH = 4          # bytes of the guest's outl; the channel id is its value
FIRST_MSI_GSI = 24          # GSIs below this are IOAPIC pins (the userspace or in-kernel IOAPIC's)
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


class _Channel:
    __slots__ = ("channel_id", "fd", "callback", "wakes")

    def __init__(self, channel_id, fd, callback):
        self.channel_id = channel_id
        self.fd = fd
        self.callback = callback
        self.wakes = 0


class Doorbells:
    """The doorbell eventfds of one VM and the thread that dispatches them.

    ``callback(channel_id, count)`` runs on that thread; ``count`` is how many doorbell
    writes arrived since its last call (eventfd counts add up, so several rings of the
    same doorbell may come as one call). A callback that raises is reported to
    ``on_error(channel_id, exc)`` (default: one line on stderr) and its channel is
    removed, so its later writes exit like writes to an unclaimed port.
    """

    def __init__(self, vm, port: int = abi.PYKVM_PORT_BUS_DOORBELL,
                 on_error: Callable[[int, BaseException], None] | None = None,
                 name: str = "bus-doorbells"):
        self.vm = vm
        self.port = port
        self.on_error = on_error or _report_error
        self.failures: list[tuple[int, str]] = []     # (channel id, "Type: message")
        self._channels: dict[int, _Channel] = {}      # by channel id
        self._by_fd: dict[int, _Channel] = {}
        self._lock = threading.RLock()                # held while a callback runs
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, _EFD_FLAGS)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._stopping = False
        self._closed = False
        self.thread_cpu = None            # CPU seconds the dispatch thread used, once it has ended
        self.thread_wakeups = 0           # times the dispatch thread woke (a direct channel's doorbell is none)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- channels
    def add(self, channel_id: int, callback: Callable[[int, int], None]) -> None:
        """Register ``channel_id``'s doorbell: its guest writes now signal ``callback``."""
        if not isinstance(channel_id, int) or not 0 <= channel_id < 1 << (8 * DOORBELL_WIDTH):
            raise ValueError(f"doorbell channel id {channel_id!r} is not a 32-bit unsigned integer")
        with self._lock:
            if self._closed:
                raise ValueError("doorbells are closed")
            if channel_id in self._channels:
                raise ValueError(f"doorbell channel {channel_id} is already registered")
            fd = os.eventfd(0, _EFD_FLAGS)
            try:
                self.vm.ioeventfd(fd, self.port, DOORBELL_WIDTH, datamatch=channel_id, pio=True)
            except BaseException:
                os.close(fd)
                raise
            ch = _Channel(channel_id, fd, callback)
            self._channels[channel_id] = ch
            self._by_fd[fd] = ch
            self._epoll.register(fd, select.EPOLLIN)

    def remove(self, channel_id: int) -> None:
        """Unregister a doorbell; once this returns its callback is not running and never runs again."""
        with self._lock:
            ch = self._channels.pop(channel_id, None)
            if ch is None:
                raise KeyError(f"doorbell channel {channel_id} is not registered")
            self._drop(ch)

    @property
    def lock(self) -> threading.RLock:
        """The lock every callback runs under: the bus's owner takes this one, so there is one lock order."""
        return self._lock

    def __contains__(self, channel_id):
        return channel_id in self._channels

    def wakes(self, channel_id: int) -> int:
        """How many doorbell writes of ``channel_id`` the thread has dispatched so far."""
        ch = self._channels.get(channel_id)
        return ch.wakes if ch is not None else 0

    def stats(self) -> dict:
        """Per-channel dispatched doorbell counts and the failures, for stats output."""
        with self._lock:
            return {"port": self.port,
                    "wakes": {c.channel_id: c.wakes for c in self._channels.values()},
                    "failures": list(self.failures), "thread_cpu_seconds": self.thread_cpu,
                    "thread_wakeups": self.thread_wakeups}

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        """Stop the thread, deassign every doorbell and close every fd (idempotent)."""
        if self._closed:
            return
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        with self._lock:
            self._closed = True
            for ch in list(self._channels.values()):
                self._drop(ch)
            self._channels.clear()
            self._epoll.close()
            os.close(self._wake)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _drop(self, ch: _Channel) -> None:
        self._by_fd.pop(ch.fd, None)
        try:
            self._epoll.unregister(ch.fd)
        except (OSError, ValueError):
            pass  # the epoll is already closed
        try:
            if self.vm.fd >= 0:  # a closed VM took its ioeventfds with it
                self.vm.ioeventfd(ch.fd, self.port, DOORBELL_WIDTH, datamatch=ch.channel_id,
                                  pio=True, deassign=True)
        finally:
            os.close(ch.fd)

    # ---------------------------------------------------------------- the thread
    def _loop(self) -> None:
        try:
            self._dispatch()
        finally:
            self.thread_cpu = time.thread_time()   # the bus's own work, for stats and the benchmark

    def _dispatch(self) -> None:
        poll = self._epoll.poll
        read = os.eventfd_read
        wake = self._wake
        while not self._stopping:
            try:
                events = poll()
            except InterruptedError:
                continue
            self.thread_wakeups += 1
            for fd, _mask in events:
                if fd == wake or self._stopping:
                    continue
                with self._lock:
                    ch = self._by_fd.get(fd)
                    if ch is None:          # removed after the poll returned
                        continue
                    try:
                        count = read(fd)
                    except BlockingIOError:
                        continue
                    ch.wakes += count
                    try:
                        ch.callback(ch.channel_id, count)
                    except Exception as e:
                        self._failed(ch, e)

    def _failed(self, ch: _Channel, exc: Exception) -> None:
        self.failures.append((ch.channel_id, f"{type(exc).__name__}: {exc}"))
        if self._channels.pop(ch.channel_id, None) is not None:
            self._drop(ch)
        try:
            self.on_error(ch.channel_id, exc)
        except Exception as e:  # the thread must outlive a bad error handler too
            print(f"pykvm: bus doorbell error handler failed: {type(e).__name__}: {e}", file=sys.stderr)


def _report_error(channel_id: int, exc: BaseException) -> None:
    print(f"pykvm: bus: doorbell of channel {channel_id} failed ({type(exc).__name__}: {exc}); "
          "channel removed", file=sys.stderr)


class Interrupt:
    """One host -> guest interrupt: a GSI routed as an MSI, with an irqfd; ``signal()`` raises it."""

    __slots__ = ("gsi", "vector", "apic_id", "fd")

    def __init__(self, gsi, vector, apic_id, fd):
        self.gsi = gsi
        self.vector = vector
        self.apic_id = apic_id
        self.fd = fd

    def signal(self) -> None:
        """Inject the interrupt once (KVM does it from the eventfd write; no vCPU is stopped)."""
        os.eventfd_write(self.fd, 1)

    def __repr__(self):
        return f"<Interrupt gsi={self.gsi} vector={self.vector:#x} apic={self.apic_id}>"


class Interrupts:
    """Allocates GSIs of one VM, routes them as MSIs and attaches irqfds; ``close()`` undoes all."""

    def __init__(self, vm, first_gsi: int = FIRST_MSI_GSI):
        if vm.irqchip is None:
            raise ValueError("MSI interrupts need an in-kernel irqchip (split or full)")
        self.vm = vm
        self.routing = vm.gsi_routing
        self.first_gsi = first_gsi
        self._irqs: dict[int, Interrupt] = {}
        self._lock = threading.Lock()

    def allocate(self, vector: int, apic_id: int = 0) -> Interrupt:
        """A new interrupt delivering ``vector`` to the local APIC ``apic_id``."""
        _check_vector(vector)
        address = msi_address(apic_id)
        with self._lock:
            gsi = self.routing.allocate_msi(address, vector, first=self.first_gsi)
            if gsi is None:
                raise RuntimeError(f"no free GSI in {self.first_gsi}..{MAX_IRQ_ROUTES - 1}")
            fd = -1
            try:
                fd = os.eventfd(0, _EFD_FLAGS)
                self.vm.irqfd(fd, gsi)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                self.routing.remove(gsi)
                raise
            irq = self._irqs[gsi] = Interrupt(gsi, vector, apic_id, fd)
        return irq

    def attach(self, fd: int, vector: int, apic_id: int = 0) -> Interrupt:
        """An interrupt raised by an eventfd made elsewhere (another VM's ioeventfd); it owns fd from here."""
        _check_vector(vector)
        with self._lock:
            gsi = self.routing.allocate_msi(msi_address(apic_id), vector, first=self.first_gsi)
            if gsi is None:
                raise RuntimeError(f"no free GSI in {self.first_gsi}..{MAX_IRQ_ROUTES - 1}")
            try:
                self.vm.irqfd(fd, gsi)
            except BaseException:
                self.routing.remove(gsi)
                raise
            irq = self._irqs[gsi] = Interrupt(gsi, vector, apic_id, fd)
        return irq

    def retarget(self, irq: Interrupt, vector: int, apic_id: int) -> None:
        """Deliver ``irq`` as ``vector`` to ``apic_id`` from now on (its GSI and eventfd stay)."""
        _check_vector(vector)
        address = msi_address(apic_id)
        with self._lock:
            self._own(irq)
            self.routing.add_msi(irq.gsi, address, vector)
            irq.vector, irq.apic_id = vector, apic_id

    def free(self, irq: Interrupt) -> None:
        """Detach the irqfd, drop the route and close the eventfd."""
        with self._lock:
            self._own(irq)
            del self._irqs[irq.gsi]
            self._release(irq)

    def __len__(self):
        return len(self._irqs)

    def close(self) -> None:
        """Free every interrupt still allocated (idempotent)."""
        with self._lock:
            irqs, self._irqs = list(self._irqs.values()), {}
            for irq in irqs:
                self._release(irq)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _own(self, irq):
        if self._irqs.get(irq.gsi) is not irq:
            raise ValueError(f"{irq!r} is not allocated here")

    def _release(self, irq):
        try:
            if self.vm.fd >= 0:
                self.vm.irqfd(irq.fd, irq.gsi, deassign=True)
                self.routing.remove(irq.gsi)
        finally:
            os.close(irq.fd)
            irq.fd = -1


def _check_vector(vector):
    # 0-31 are exceptions; an MSI with a vector below 16 is illegal to the LAPIC.
    if not isinstance(vector, int) or not 32 <= vector <= 255:
        raise ValueError(f"interrupt vector {vector!r} is not 32..255")
