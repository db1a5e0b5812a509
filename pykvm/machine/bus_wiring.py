"""Gives a machine its partition bus when the config asks for one: services, doorbells, interrupts, connect device."""

from __future__ import annotations

import sys

from .. import errors
from . import partition_wiring


def wants_bus(cfg) -> bool:
    """True when the VM gets a bus: --bus, a --disk, or --device bus."""
    return bool(cfg.bus or cfg.disks or cfg.numa or any(name == "bus" for name, _o in cfg.devices)
                or partition_wiring.requested())


def build_bus(machine):
    """The BusHost for `machine` (its doorbell thread started), or None when the config has no bus."""
    cfg = machine.config
    if not wants_bus(cfg):
        return None
    from ..bus.doorbell import Doorbells, Interrupts
    from ..bus.host import BusHost, Limits
    from ..bus.services.block import BlockService, Disk
    from ..bus.services.echo import EchoService
    from ..bus.services.heartbeat import HeartbeatService
    from ..bus.services.shutdown import ShutdownService

    services = [EchoService(), ShutdownService(), HeartbeatService()]
    disks = []
    try:
        for path, read_only in cfg.disks:
            disks.append(Disk(path, read_only=read_only))
    except ValueError as e:
        for d in disks:
            d.close()
        raise errors.UsageError(str(e)) from None
    services += [BlockService(d) for d in disks]
    if machine.numa is not None:
        services.append(machine.numa.make_service())
    link = ledger = None
    if partition_wiring.requested():         # started by `pykvm up`: proxied and provided services
        link = partition_wiring.connect()
        extra, ledger = partition_wiring.services(link)
        if any(s.interface == EchoService.interface for s in extra):
            services = [s for s in services if not isinstance(s, EchoService)]   # its guest's echo is the partition's
        services += extra
    log = lambda msg: print(f"pykvm: bus: {msg}", file=sys.stderr)  # noqa: E731
    holder: list = []        # the BusHost, once built (the error hook needs it)

    def on_error(relid: int, e: BaseException) -> None:
        # a handler bug must not leave the guest waiting on a channel nobody reads: say so and
        # disconnect it, so its driver sees the bus gone (COMMAND reads idle)
        log(f"channel {relid}: internal error {type(e).__name__}: {e}; disconnecting the guest")
        if holder:
            holder[0].disconnect(f"internal error on channel {relid}")

    doorbells = Doorbells(machine.vm, on_error=on_error)
    try:
        interrupts = Interrupts(machine.vm)
    except BaseException:
        doorbells.close()
        for d in disks:
            d.close()
        raise
    from .. import record

    limits = ledger.bus_limits() if ledger is not None else Limits()
    bus = BusHost(machine.memory, doorbells, interrupts, services, log=log, memslots=BusMemslots(machine.vm),
                  limits=record.replace(limits, vcpus=min(limits.vcpus, cfg.cpus)))
    holder.append(bus)
    if link is not None:
        bus.policy, bus.partition_link = ledger, link
        link.start(bus)
    return bus


class BusMemslots:
    """Memslots for the bus's transfer page sets (numbers from FIRST up; RAM and windows use lower ones)."""

    FIRST = 200

    def __init__(self, vm):
        self.vm = vm
        self._used: set[int] = set()

    def map(self, gpa: int, size: int, host_addr: int, readonly: bool = True) -> int:
        """Map host memory at gpa; the slot number."""
        from ..kvm import constants as C

        slot = next(n for n in range(self.FIRST, self.FIRST + len(self._used) + 1) if n not in self._used)
        self.vm.set_user_memory_region(slot, gpa, size, host_addr, C.KVM_MEM_READONLY if readonly else 0)
        self._used.add(slot)
        return slot

    def unmap(self, slot: int) -> None:
        """Remove a slot map() made (quietly when the VM is already gone)."""
        if slot in self._used:
            self._used.discard(slot)
            if self.vm.fd >= 0:
                self.vm.set_user_memory_region(slot, 0, 0, 0)
