"""What `pykvm ctl` can ask of a running VM: the command table and every handler.

Each handler is `fn(machine, request) -> dict` and runs on the machine's main thread. They
live together here, above the VM core, so the core never imports its management interface
and a run without --control never loads this module.
"""

from __future__ import annotations

COMMANDS: dict = {}


def command(name: str):
    """Register `fn(machine, request) -> dict` as the handler of a control command."""
    def deco(fn):
        COMMANDS[name] = fn
        return fn
    return deco


@command("dump")
def _dump(machine, req) -> dict:
    path, err = machine.host_dump()
    if path is None:
        raise RuntimeError(err or "no core written (dumping disabled with --no-dump?)")
    return {"core": str(path)}


@command("devices")
def _devices(machine, req) -> dict:
    return {"devices": [{"name": d.name, "state": d.state.value, "generation": d.generation,
                         "describe": d.describe()} for d in machine.devices.devices]}


@command("stats")
def _stats(machine, req) -> dict:
    return machine.stats()


@command("hot-add")
def _hot_add(machine, req) -> dict:
    """Add a device of a hot-pluggable registry type: type=NAME plus its options."""
    from ..devices import registry

    kind = registry.lookup(str(req.get("type", "")))
    if not kind.hotplug:
        pluggable = ", ".join(sorted(t.name for t in registry.TYPES.values() if t.hotplug))
        raise ValueError(f"device type {kind.name} cannot be hot-added (hot-pluggable: {pluggable})")
    options = {k: v for k, v in req.items() if k not in ("cmd", "type")}
    dev = machine.devices.hot_add(kind.make(machine.device_context, options))
    machine.supervisor.ensure_running()
    return {"device": dev.describe()}


@command("hot-remove")
def _hot_remove(machine, req) -> dict:
    dev = machine.devices.hot_remove(str(req.get("name", "")), surprise=bool(req.get("surprise", False)))
    return {"device": dev.name, "state": dev.state.value}


@command("power")
def _power(machine, req) -> dict:
    dev = machine.devices.find(str(req.get("name", "")))
    state = str(req.get("state", "")).lower()
    if state not in ("d0", "d3"):
        raise ValueError("state must be d0 or d3")
    machine.devices.set_power(dev, state == "d0")
    return {"device": dev.name, "state": dev.state.value}


@command("inject")
def _inject(machine, req) -> dict:
    dev = machine.devices.find(str(req.get("name", "")))
    if not hasattr(dev, "inject"):
        raise ValueError(f"device {dev.name} takes no injected faults")
    dev.inject(str(req.get("kind", "raise")))
    return {"device": dev.name, "generation": dev.generation}


@command("save")
def _save(machine, req) -> dict:
    """Save the VM (pykvm restore FILE continues it) into the file whose descriptor came with the
    request (what `request` sends), or, unsandboxed, to path=FILE; stop=true ends this VM afterwards (a move)."""
    from .. import sandbox
    from ..snapshot.state import save_vm

    stop = req.get("stop", False)
    if stop in ("true", "false"):
        stop = stop == "true"
    if not isinstance(stop, bool):
        raise ValueError("stop must be true or false")
    fds = req.get("_fds") or []
    if len(fds) > 1:
        raise ValueError("save takes at most one file descriptor")
    if not fds and sandbox.active():
        raise ValueError("this VMM is sandboxed and opens no paths: send the file's descriptor with the "
                         "request (pykvm ctl and control.request do)")
    return save_vm(machine, str(req.get("path", "")), stop=stop, fd=fds[0] if fds else None)


@command("shutdown")
def _shutdown(machine, req) -> dict:
    """Ask the guest to power off cleanly over the partition bus's shutdown service."""
    if machine.bus is None:
        raise ValueError("this VM has no partition bus (run it with --bus)")
    machine.bus.with_session("shutdown", lambda s: s.request())
    return {"requested": True}


@command("rescind")
def _rescind(machine, req) -> dict:
    """Withdraw a bus channel from the guest: relid=N."""
    if machine.bus is None:
        raise ValueError("this VM has no partition bus (run it with --bus)")
    relid = req.get("relid")
    if isinstance(relid, str) and relid.isdigit():
        relid = int(relid)
    if not isinstance(relid, int) or isinstance(relid, bool):
        raise ValueError("rescind needs relid=N")
    machine.bus.rescind(relid)
    return {"rescinded": relid}


@command("numa")
def _numa(machine, req) -> dict:
    """`pykvm ctl SOCK numa`: the per-node table."""
    numa = getattr(machine, "numa", None)
    if numa is None:
        raise ValueError("this VM has no vNUMA nodes (run it with --numa-node or --numa)")
    return numa.snapshot()


@command("policy")
def _policy(machine, req) -> dict:
    """The policy agent's decisions for this partition (counts, recent refusals) and its link to the broker."""
    bus = machine.bus
    ledger = getattr(bus, "policy", None)
    if ledger is None:
        raise ValueError("this VM is not a partition of a topology (start it with `pykvm up`)")
    return {"policy": ledger.snapshot(), "link": bus.partition_link.snapshot()}
