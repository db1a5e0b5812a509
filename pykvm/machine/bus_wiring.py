"""Gives a machine its partition bus when the config asks for one: services, doorbells, interrupts, connect device."""

from __future__ import annotations

import sys

from .. import errors


def wants_bus(cfg) -> bool:
    """True when the VM gets a bus: --bus, a --disk, or --device bus."""
    return bool(cfg.bus or cfg.disks or any(name == "bus" for name, _o in cfg.devices))


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
    log = lambda msg: print(f"pykvm: bus: {msg}", file=sys.stderr)  # noqa: E731
    doorbells = Doorbells(machine.vm, on_error=lambda relid, e: log(f"channel {relid}: {type(e).__name__}: {e}"))
    try:
        interrupts = Interrupts(machine.vm)
    except BaseException:
        doorbells.close()
        for d in disks:
            d.close()
        raise
    return BusHost(machine.memory, doorbells, interrupts, services, limits=Limits(vcpus=cfg.cpus), log=log)
