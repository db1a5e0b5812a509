"""A guest's "snapshot here" call (pykvm_abi.h PYKVM_PORT_FUZZ) outside fuzzing: stop the VM there once."""

from __future__ import annotations

import threading

from .. import abi


class GuestSnapshotPoint:
    """Listens on a machine's fuzz port (the "fuzz" device); the first "snapshot here" stops every vCPU
    right after the call, so a snapshot taken then starts from exactly that point. Later calls are ignored."""

    def __init__(self, machine):
        self.machine = machine
        self.event = threading.Event()
        machine.device_context.fuzz = self

    def command(self, cmd: int) -> None:
        """The fuzz port's call (vCPU thread): hold the vCPUs at the first snapshot call."""
        if cmd != abi.PYKVM_FUZZ_CMD_SNAPSHOT or self.event.is_set():
            return
        m = self.machine
        m.pauser.hold()
        for v in m.vcpus:
            v.immediate_exit = 1
        self.event.set()

    def wait(self, timeout: float) -> bool:
        """True once the guest made the call (its vCPUs are then held until the VM is resumed)."""
        return self.event.wait(timeout)
