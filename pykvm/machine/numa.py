"""A machine's vNUMA: per-node memory, the dynamic memory service's backend, the memory log, `ctl numa`."""

from __future__ import annotations

import os
import sys
import threading
import time

from .. import abi, errors
from ..memory import GuestMemory, GuestMemoryError
from ..memory.dynamic import DynamicMemory

MAX_LOG_REASONS = 20          # refusal reasons printed to stderr per run (all go to the memory log)


class MachineNuma:
    """The vNUMA side of one machine: config, layouts, DynamicMemory, the memory log."""

    def __init__(self, machine, cfg):
        from ..memory import numa as numa_cfg   # only a VM with vNUMA pays for its import

        self.machine = machine
        self.cfg = cfg
        self.layouts = numa_cfg.plan(cfg, abi.PYKVM_MMIO_HOLE)
        self.dm: DynamicMemory | None = None
        self.service = None
        self.t0 = time.monotonic()
        self._log_fd = None
        self._dumps = None        # json.dumps, with a memory log
        self._log_lock = threading.Lock()
        self._printed = 0

    @classmethod
    def from_config(cls, machine) -> "MachineNuma | None":
        """The vNUMA of machine.config (None without --numa*); NumaSpecError when it is inconsistent."""
        cfg = machine.config
        if cfg.numa is None:
            return None
        from ..memory import numa as numa_cfg

        ncfg = numa_cfg.NumaConfig.from_json(cfg.numa)
        if ncfg.mem != cfg.mem:
            raise errors.NumaSpecError(f"the nodes hold {ncfg.mem >> 20} MiB but the VM has {cfg.mem >> 20} MiB")
        if ncfg.cpus != cfg.cpus:
            raise errors.NumaSpecError(f"the nodes hold {ncfg.cpus} vCPUs but the VM has {cfg.cpus}")
        return cls(machine, ncfg)

    def create_memory(self) -> GuestMemory:
        """Guest RAM as one memfd region per node range."""
        try:
            memory = GuestMemory.create_nodes(self.layouts)
        except GuestMemoryError as e:
            raise errors.MemorySizeError(str(e)) from None
        except OSError as e:
            raise errors.MemorySizeError(f"cannot allocate guest memory for the nodes: {e.strerror}") from None
        vm = self.machine.vm
        self.dm = DynamicMemory(memory, self.cfg, self.layouts,
                                map_slot=lambda slot, gpa, size, addr: vm.set_user_memory_region(slot, gpa, size, addr))
        path = self.machine.config.memory_log
        if path is not None:
            import json   # only with a --memory-log (and before the sandbox, which stops imports from disk)

            self._dumps = json.dumps
            try:
                self._log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            except OSError as e:
                memory.close()
                raise errors.UsageError(f"--memory-log {path}: {e.strerror}") from None
        return memory

    def boot_arg(self):
        """What the loader takes as `numa=`."""
        return self.cfg, self.layouts

    def make_service(self):
        """The dynamic memory bus service for this machine."""
        from ..bus.services.dynmem import DynMemService

        self.service = DynMemService(self.dm, on_event=self.on_event)
        return self.service

    # ---------------------------------------------------------------- the timeline
    def on_event(self, kind: str, node, fields: dict) -> None:
        """Write one event (with the node's state after it) to the memory log; print refusals (bounded)."""
        if kind in ("reject", "clamp", "timeout", "hotadd-failed") and self._printed < MAX_LOG_REASONS:
            self._printed += 1
            print(f"pykvm: dynmem: {kind} (node {node}): {fields.get('reason')}", file=sys.stderr)
        if self._log_fd is None:
            return
        rec = {"t": round(time.monotonic() - self.t0, 6), "event": kind, "node": node, **fields}
        if node is not None and 0 <= node < len(self.dm.nodes):
            n = self.dm.nodes[node]
            rec.update(size=n.online * 4096, ballooned=n.ballooned * 4096, hot_added=n.hot_pages * 4096,
                       host_bytes=n.host_bytes())
        line = (self._dumps(rec) + "\n").encode()
        with self._log_lock:
            try:
                os.write(self._log_fd, line)
            except OSError:
                pass

    def snapshot(self) -> dict:
        """Per node: size, committed, free, pressure, ballooned, hot-added, last decision."""
        nodes = [n.snapshot() for n in self.dm.nodes] if self.dm is not None else []
        session = self.service.session.stats() if self.service is not None and self.service.session else None
        return {"nodes": nodes, "vm_max": self.cfg.vm_max, "distances": [list(r) for r in self.cfg.distances],
                "balancer": session}

    def close(self) -> None:
        """Close the memory log."""
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None


def render(snapshot: dict) -> str:
    """The `ctl numa` reply as a table a person reads."""
    def mib(v):
        return "-" if v is None else f"{v / (1 << 20):.1f}M"
    lines = [f"{'node':>4} {'size':>9} {'committed':>10} {'free':>9} {'pressure':>8} {'ballooned':>10} "
             f"{'hot-added':>10} {'host':>9}  last decision"]
    for n in snapshot["nodes"]:
        p = "-" if n["pressure"] is None else f"{n['pressure'] / 10:.1f}%"
        lines.append(f"{n['node']:>4} {mib(n['size']):>9} {mib(n['committed']):>10} {mib(n['free']):>9} {p:>8} "
                     f"{mib(n['ballooned']):>10} {mib(n['hot_added']):>10} {mib(n['host_bytes']):>9}  "
                     f"{n['last_decision']}")
    return "\n".join(lines) + "\n"
