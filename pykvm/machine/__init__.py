"""One partition: a VM assembled from a MachineConfig, with one module per job.

config (what describes a run), outcome (how it ended), core (the Machine: build, run, finish, close),
vcpu_loop (KVM_RUN and exits), faults (crash messages), pausing (park/stop vCPUs), requests
(work for the main thread), windows (memory-backed windows, coalesced MMIO), dumps and capture
(cores), device_set (devices from the registry), numa, bus_wiring, partition_wiring, eoi_watch,
sleep, display. The debugger (pykvm.gdb), the management interface (pykvm.control) and the
saved-state format (pykvm.snapshot) sit above this package and use the Machine.
"""

from .config import MachineConfig
from .outcome import Outcome
from .core import Machine

__all__ = ["Machine", "MachineConfig", "Outcome"]
