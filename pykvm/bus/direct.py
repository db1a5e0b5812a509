"""Direct channels: a client guest's rings mapped into a service guest, doorbells wired kernel to kernel.

Python sets a direct channel up and tears it down; it carries no message. At open the
client VMM (ClientEnd) registers its guest's doorbell for the channel (port
PYKVM_PORT_BUS_DOORBELL, datamatch = relid) as an ioeventfd on an eventfd no thread of
its own waits on, and sends that eventfd and the memfds behind the channel's ring GPADL
to the broker, which passes them to the service VMM (never keeping a copy). The service
VMM (ServiceEnd) checks the memfds (sealed, long enough), maps exactly the ring pages
into its guest at PYKVM_DIRECT_GPA + id * PYKVM_DIRECT_STRIDE (one memslot), registers
the client's eventfd as an irqfd whose GSI is an MSI to its guest's bus vector, and makes
its own doorbell eventfd (ioeventfd, datamatch PYKVM_DIRECT_DOORBELL_BASE + id), which
goes back the same way; the client VMM registers it as an irqfd on the channel's own
interrupt. From then on a client doorbell interrupts the service guest and a service
doorbell interrupts the client guest inside KVM: no VMM thread, broker or Python wakes.

close() on either end removes what that end added (irqfd and ioeventfd deassigned,
memslot removed, then the host mapping); the service guest's later accesses to the
window are unclaimed MMIO. A process that dies takes its registrations with its VM.
"""

from __future__ import annotations

import os
import struct

from .. import abi
from .gpadl import GpadlView
from .remap import RemapError, check_fd

PAGE = 4096
MAX_RUNS = 8
MSG = struct.Struct("<IIQIIIIII")        # struct pykvm_direct_msg
DOORBELL_WIDTH = 4
_EFD = os.EFD_CLOEXEC | os.EFD_NONBLOCK


class DirectError(Exception):
    """A direct open this side refuses (bad descriptor, no free slot, KVM refused); the channel stays brokered or closed."""


def window_gpa(slot: int) -> int:
    """Where direct channel `slot` is mapped in the service guest."""
    return abi.PYKVM_DIRECT_GPA + slot * abi.PYKVM_DIRECT_STRIDE


def describe(memory, pfns) -> tuple[list, list[int]]:
    """([[fd index, byte offset, pages]], [memfds]) of a ring GPADL's pages in the client's memory (DirectError)."""
    from .gpadl import GpadlError, _runs
    try:
        runs = _runs(memory, list(pfns), abi.PYKVM_DIRECT_MAX_PAGES)
    except GpadlError as e:
        raise DirectError(e.reason) from None
    fds: list[int] = []
    out = []
    for region, off, n in runs:
        if region.fd not in fds:
            fds.append(region.fd)
        out.append([fds.index(region.fd), off, n])
    if len(out) > MAX_RUNS or len(fds) > 3:
        raise DirectError(f"the ring pages lie in {len(out)} runs of {len(fds)} memory files")
    return out, fds


def parse_open(obj: dict, nfds: int) -> tuple[list, int, int, int, int, int]:
    """(runs, pages, inbound offset, version, rules flags, max message) of a direct open; DirectError when malformed.

    The memfds are fds[0..nfds-2]; the client's doorbell eventfd is the last one.
    """
    runs, inbound, version = obj.get("runs"), obj.get("inbound_offset"), obj.get("version")
    flags, max_message = obj.get("rules", 0), obj.get("max_message")
    if not 2 <= nfds <= 4:
        raise DirectError(f"direct open with {nfds} descriptors (memfds then the doorbell eventfd)")
    if not isinstance(runs, list) or not 1 <= len(runs) <= MAX_RUNS:
        raise DirectError("direct open: runs is not a list of 1..8 [index, offset, pages]")
    pages = 0
    out = []
    for r in runs:
        if (not isinstance(r, list) or len(r) != 3 or not all(type(x) is int for x in r)
                or not 0 <= r[0] < nfds - 1 or r[1] < 0 or r[1] % PAGE or r[1] >= 1 << 46 or r[2] < 1):
            raise DirectError(f"direct open: bad run {r!r}")
        pages += r[2]
        out.append(tuple(r))
    if not 4 <= pages <= abi.PYKVM_DIRECT_MAX_PAGES:
        raise DirectError(f"direct open of {pages} ring pages (4..{abi.PYKVM_DIRECT_MAX_PAGES})")
    for name, v, lo, hi in (("inbound_offset", inbound, 2, pages - 2), ("version", version, 1, (1 << 32) - 1),
                            ("rules", flags, 0, abi.PYKVM_DIRECT_RULE_READ_ONLY),
                            ("max_message", max_message, 8, 1 << 20)):
        if type(v) is not int or not lo <= v <= hi:
            raise DirectError(f"direct open: {name} {v!r} is not in [{lo}, {hi}]")
    return out, pages, inbound, version, flags, max_message


class ServiceEnd:
    """The service VMM's half of one direct channel: the client's ring pages and doorbells wired into this VM."""

    def __init__(self, host, slot: int, mem_fds, runs, client_efd: int):
        """Map runs of mem_fds at the slot's window, take client_efd as an irqfd (owned from here), add a doorbell."""
        self.slot = slot
        self.gpa = window_gpa(slot)
        self.doorbell = abi.PYKVM_DIRECT_DOORBELL_BASE + slot
        self._vm = host.doorbells.vm
        self._memslots = host.memslots
        self._interrupts = host.interrupts
        self.view = self.memslot = self.irq = None
        self.efd = -1
        try:
            ends: dict[int, int] = {}
            for index, off, n in runs:
                ends[index] = max(ends.get(index, 0), off + n * PAGE)
            for index, end in ends.items():
                check_fd(mem_fds[index], end)
            self.view = GpadlView.from_fd_runs([(mem_fds[i], off, n) for i, off, n in runs])
            self.memslot = self._memslots.map(self.gpa, self.view.size, self.view.host_addr, readonly=False)
            self.irq = self._interrupts.attach(client_efd, abi.PYKVM_BUS_VECTOR, 0)   # KVM: eventfds only
            client_efd = -1                                   # the Interrupt owns it now
            self.efd = os.eventfd(0, _EFD)
            self._vm.ioeventfd(self.efd, abi.PYKVM_PORT_BUS_DOORBELL, DOORBELL_WIDTH, datamatch=self.doorbell,
                               pio=True)
        except (RemapError, OSError, ValueError, RuntimeError) as e:
            if self.efd >= 0:
                os.close(self.efd)
                self.efd = -1
            if client_efd >= 0:
                os.close(client_efd)
            self.close()
            raise DirectError(f"direct channel {slot}: {e}") from None

    @property
    def mapped(self) -> bool:
        """True until close()."""
        return self.memslot is not None

    def close(self) -> None:
        """Deassign the doorbell and the irqfd, remove the memslot, then the host view (idempotent)."""
        if self.efd >= 0:
            try:
                if self._vm.fd >= 0:
                    self._vm.ioeventfd(self.efd, abi.PYKVM_PORT_BUS_DOORBELL, DOORBELL_WIDTH,
                                       datamatch=self.doorbell, pio=True, deassign=True)
            finally:
                os.close(self.efd)
                self.efd = -1
        irq, self.irq = self.irq, None
        if irq is not None:
            self._interrupts.free(irq)
        slot, self.memslot = self.memslot, None
        if slot is not None:
            self._memslots.unmap(slot)
        view, self.view = self.view, None
        if view is not None:
            view.close()


class ClientEnd:
    """The client VMM's half: its guest's doorbell for the channel as an eventfd, the service's as an irqfd."""

    def __init__(self, vm, relid: int, irq):
        self._vm = vm
        self.relid = relid
        self.irq = irq                # the channel's Interrupt (its GSI routes to the guest's vCPU and vector)
        self.efd = os.eventfd(0, _EFD)
        self.service_efd = -1
        try:
            vm.ioeventfd(self.efd, abi.PYKVM_PORT_BUS_DOORBELL, DOORBELL_WIDTH, datamatch=relid, pio=True)
        except BaseException:
            os.close(self.efd)
            raise

    def attach(self, service_efd: int) -> None:
        """Register the service VM's doorbell eventfd as an irqfd on the channel's interrupt (owned from here)."""
        try:                          # KVM refuses anything but an eventfd (EINVAL)
            self._vm.irqfd(service_efd, self.irq.gsi)
        except OSError as e:
            os.close(service_efd)
            raise DirectError(f"channel {self.relid}: the service's doorbell: {e}") from None
        self.service_efd = service_efd

    @property
    def wired(self) -> bool:
        """Both doorbells are wired kernel to kernel."""
        return self.service_efd >= 0

    def close(self) -> None:
        """Deassign both registrations and close the eventfds (idempotent)."""
        if self.service_efd >= 0:
            try:
                if self._vm.fd >= 0:
                    self._vm.irqfd(self.service_efd, self.irq.gsi, deassign=True)
            finally:
                os.close(self.service_efd)
                self.service_efd = -1
        if self.efd >= 0:
            try:
                if self._vm.fd >= 0:
                    self._vm.ioeventfd(self.efd, abi.PYKVM_PORT_BUS_DOORBELL, DOORBELL_WIDTH, datamatch=self.relid,
                                       pio=True, deassign=True)
            finally:
                os.close(self.efd)
                self.efd = -1
