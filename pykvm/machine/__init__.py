"""One partition: a VM assembled from a MachineConfig, with one module per job.

config (what describes a run, how it ended), core (the Machine: build, run, finish, close),
vcpu_loop (KVM_RUN and exits), faults (crash messages), pausing (park/stop vCPUs), requests
(work for the main thread), windows (memory-backed windows, coalesced MMIO), dumps (cores),
device_set (devices from the registry), capture/state (save and restore), control (the host
control socket).
"""

from .config import MachineConfig, Outcome
from .core import Machine

__all__ = ["Machine", "MachineConfig", "Outcome"]
