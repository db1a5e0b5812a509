"""Events a device model raises from an I/O callback to tell the machine the VM must change course."""


class VmEvent(Exception):
    """Base: raised by a device during dispatch; the vCPU loop handles it with the vCPU's context."""


class GuestExit(VmEvent):
    """The guest asked to exit with a status (debug-exit port, power-off)."""

    def __init__(self, status: int, how: str):
        super().__init__(f"guest exit {status} ({how})")
        self.status = status
        self.how = how


class GuestCrash(VmEvent):
    """The guest reported its own death (pvpanic 'panicked')."""

    def __init__(self, trigger: str, reason: str):
        super().__init__(reason)
        self.trigger = trigger
        self.reason = reason


class FirmwareTrap(VmEvent):
    """The firmware exception stubs pushed a trap frame and signalled the VMM."""


class StrictIoViolation(VmEvent):
    """An access to an address no device claims while --strict-io is on."""

    def __init__(self, kind: str, addr: int, size: int, is_write: bool, value: int):
        what = "write" if is_write else "read"
        super().__init__(f"{kind} {what} of {size} byte(s) at {addr:#x} claimed by no device (--strict-io)")
        self.kind, self.addr, self.size, self.is_write, self.value = kind, addr, size, is_write, value


class SleepRequest(VmEvent):
    """The guest entered an ACPI sleep state that resumes (S3): the machine waits for `wake`, then
    restarts the vCPU at the FACS waking vector."""

    def __init__(self, state: int, wake):
        super().__init__(f"guest entered S{state}")
        self.state = state
        self.wake = wake
