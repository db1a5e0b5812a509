"""Direct channels: a client guest's rings mapped into a service guest, doorbells wired kernel to kernel.

Python sets a direct channel up and tears it down; it carries no message. At open the
client VMM (ClientEnd) registers its guest's doorbell for the channel (port
PYKVM_PORT_BUS_DOORBELL, datamatch = relid) as an ioeventfd on an eventfd no thread of
its own waits on, and sends that eventfd and the memfds behind the channel's ring GPADL
to the broker, which passes them to the service VMM (never keeping a copy). The service
VMM (ServiceEnd) checks the memfds (sealed, long enough), maps exactly the ring pages
into its guest at PYKVM_DIRECT_GPA + id * PYKVM_DIRECT_STRIDE (one memslot) and, when the
client's guest gave a data buffer at open (a second GPADL, as netvsc's send and receive
buffers), exactly its pages PYKVM_DIRECT_DATA_OFFSET above (a second memslot), registers
the client's eventfd as an irqfd whose GSI is an MSI to its guest's bus vector, and makes
its own doorbell eventfd (ioeventfd, datamatch PYKVM_DIRECT_DOORBELL_BASE + id), which
goes back the same way; the client VMM registers it as an irqfd on the channel's own
interrupt. From then on a client doorbell interrupts the service guest and a service
doorbell interrupts the client guest inside KVM: no VMM thread, broker or Python wakes.

close() on either end removes what that end added (irqfd and ioeventfd deassigned,
memslots removed, then the host mappings); the service guest's later accesses to the
window are unclaimed MMIO. A process that dies takes its registrations with its VM.
The client VMM answers its guest's teardown of a direct channel's GPADLs only once the
service VMM said it removed them (or is known dead): see direct_proxy.py.
"""

from __future__ import annotations

import os
import struct

from .. import abi
from ..record import record
from .gpadl import GpadlView
from .remap import RemapError, check_fd

PAGE = 4096
MAX_RUNS = 8
MSG = struct.Struct("<IIQIIIIIIQII")     # struct pykvm_direct_msg
MAX_FDS = 3                               # memfds of one open (ring and data buffer together), + the eventfd:
#   wire.MAX_FDS descriptors in one frame
DOORBELL_WIDTH = 4
_EFD = os.EFD_CLOEXEC | os.EFD_NONBLOCK


class DirectError(Exception):
    """A direct open this side refuses (bad descriptor, no free slot, KVM refused); the channel stays brokered or closed."""


def window_gpa(slot: int) -> int:
    """Where direct channel `slot` is mapped in the service guest."""
    return abi.PYKVM_DIRECT_GPA + slot * abi.PYKVM_DIRECT_STRIDE


def describe(memory, pfns, fds=None, max_pages: int = abi.PYKVM_DIRECT_MAX_PAGES,
             what: str = "ring") -> tuple[list, list[int]]:
    """([[fd index, byte offset, pages]], [memfds]) of a GPADL's pages in the client's memory (DirectError).

    fds: the memfd list of this open so far (a data buffer's runs index the ring's list too).
    """
    from .gpadl import GpadlError, _runs
    try:
        runs = _runs(memory, list(pfns), max_pages)
    except GpadlError as e:
        raise DirectError(f"the {what} pages: {e.reason}") from None
    fds = [] if fds is None else fds
    out = []
    for region, off, n in runs:
        if region.fd not in fds:
            fds.append(region.fd)
        out.append([fds.index(region.fd), off, n])
    if len(out) > MAX_RUNS or len(fds) > MAX_FDS:
        raise DirectError(f"the {what} pages lie in {len(out)} runs of {len(fds)} memory files")
    return out, fds


def _parse_runs(runs, nmem: int, lo: int, hi: int, key: str, what: str) -> tuple[list, int]:
    """(runs as tuples, pages) of one GPADL's run list, each naming one of nmem memfds."""
    if not isinstance(runs, list) or not 1 <= len(runs) <= MAX_RUNS:
        raise DirectError(f"direct open: {key} is not a list of 1..{MAX_RUNS} [index, offset, pages]")
    pages = 0
    out = []
    for r in runs:
        if (not isinstance(r, list) or len(r) != 3 or not all(type(x) is int for x in r)
                or not 0 <= r[0] < nmem or r[1] < 0 or r[1] % PAGE or r[1] >= 1 << 46 or not 1 <= r[2] <= hi):
            raise DirectError(f"direct open: bad run {r!r} in {key}")
        pages += r[2]
        out.append(tuple(r))
    if not lo <= pages <= hi:
        raise DirectError(f"direct open of {pages} {what} pages ({lo}..{hi})")
    return out, pages


MAX_TRANSFER = abi.PYKVM_BLK_MAX_SECTORS * abi.PYKVM_BLK_SECTOR


@record(frozen=True)
class Open:
    """A checked direct open: the ring's and the data buffer's runs (fd index, offset, pages) and the rules."""

    runs: tuple
    pages: int
    inbound: int
    version: int
    flags: int
    max_message: int
    data_runs: tuple = ()          # () when the client gave no data buffer
    data_pages: int = 0
    max_transfer: int = 0


def parse_open(obj: dict, nfds: int) -> Open:
    """The checked fields of a direct open (a JSON object from the broker); DirectError when malformed.

    The memfds are fds[0..nfds-2]; the client's doorbell eventfd is the last one.
    """
    inbound, version = obj.get("inbound_offset"), obj.get("version")
    flags, max_message = obj.get("rules", 0), obj.get("max_message")
    data, max_transfer = obj.get("data_runs"), obj.get("max_transfer", 0)
    if not 2 <= nfds <= MAX_FDS + 1:
        raise DirectError(f"direct open with {nfds} descriptors (memfds then the doorbell eventfd)")
    runs, pages = _parse_runs(obj.get("runs"), nfds - 1, 4, abi.PYKVM_DIRECT_MAX_PAGES, "runs", "ring")
    data_runs, data_pages = (), 0
    if data is not None:
        data_runs, data_pages = _parse_runs(data, nfds - 1, 1, abi.PYKVM_DIRECT_DATA_MAX_PAGES, "data_runs",
                                           "data buffer")
    for name, v, lo, hi in (("inbound_offset", inbound, 2, pages - 2), ("version", version, 1, (1 << 32) - 1),
                            ("rules", flags, 0, abi.PYKVM_DIRECT_RULE_READ_ONLY),
                            ("max_message", max_message, 8, 1 << 20),
                            ("max_transfer", max_transfer, 0, MAX_TRANSFER)):
        if type(v) is not int or not lo <= v <= hi:
            raise DirectError(f"direct open: {name} {v!r} is not in [{lo}, {hi}]")
    if max_transfer % abi.PYKVM_BLK_SECTOR:
        raise DirectError(f"direct open: max_transfer {max_transfer} is not a multiple of {abi.PYKVM_BLK_SECTOR}")
    return Open(tuple(runs), pages, inbound, version, flags, max_message, tuple(data_runs), data_pages, max_transfer)


def _check_memory(mem_fds, runs) -> None:
    """Every memfd a run names is sealed and long enough for it (RemapError)."""
    ends: dict[int, int] = {}
    for index, off, n in runs:
        ends[index] = max(ends.get(index, 0), off + n * PAGE)
    for index, end in ends.items():
        check_fd(mem_fds[index], end)


class ServiceEnd:
    """The service VMM's half of one direct channel: the client's ring pages and doorbells wired into this VM."""

    def __init__(self, host, slot: int, mem_fds, runs, client_efd: int, data_runs=()):
        """Map runs of mem_fds at the slot's window (data_runs above it), take client_efd as an irqfd (owned from
        here), add a doorbell."""
        self.slot = slot
        self.gpa = window_gpa(slot)
        self.data_gpa = self.gpa + abi.PYKVM_DIRECT_DATA_OFFSET if data_runs else 0
        self.data_view = self.data_memslot = None
        self.doorbell = abi.PYKVM_DIRECT_DOORBELL_BASE + slot
        self._vm = host.doorbells.vm
        self._memslots = host.memslots
        self._interrupts = host.interrupts
        self.view = self.memslot = self.irq = None
        self.efd = -1
        try:
            _check_memory(mem_fds, list(runs) + list(data_runs))
            self.view = GpadlView.from_fd_runs([(mem_fds[i], off, n) for i, off, n in runs])
            self.memslot = self._memslots.map(self.gpa, self.view.size, self.view.host_addr, readonly=False)
            if data_runs:
                self.data_view = GpadlView.from_fd_runs([(mem_fds[i], off, n) for i, off, n in data_runs])
                self.data_memslot = self._memslots.map(self.data_gpa, self.data_view.size, self.data_view.host_addr,
                                                       readonly=False)
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
        return self.memslot is not None or self.data_memslot is not None

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
        for slot_attr, view_attr in (("data_memslot", "data_view"), ("memslot", "view")):
            slot = getattr(self, slot_attr)
            setattr(self, slot_attr, None)
            if slot is not None:
                self._memslots.unmap(slot)
            view = getattr(self, view_attr)
            setattr(self, view_attr, None)
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
