"""Calls that a device model's own thread (a timer, an input reader) makes into the rest of the VMM, kept from killing it.

Such a thread raises interrupts and wake-ups from outside any vCPU, so nothing above it would
catch an exception: the thread would die with a traceback and leave the VM running with a
silently dead clock. An exception there is a pykvm bug, never something the guest may cause,
so it is reported -- the first few with their traceback, later ones counted -- and the thread
goes on with its next tick.
"""

from __future__ import annotations

import sys
import threading

REPORTED = 3           # failures reported with a traceback; later ones only counted


class ThreadGuard:
    """Runs one device thread's call-outs; `failures` counts the exceptions they raised."""

    def __init__(self, device: str, limit: int = REPORTED, log=None):
        self.device = device
        self.limit = limit
        self.failures = 0
        self._log = log
        self._lock = threading.Lock()

    def call(self, fn, *args) -> bool:
        """fn(*args); False when it raised (reported, not propagated)."""
        try:
            fn(*args)
            return True
        except Exception as e:          # noqa: BLE001 - the thread must outlive any bug below it
            self._report(e)
            return False

    def _report(self, e: Exception) -> None:
        with self._lock:
            self.failures += 1
            n = self.failures
        if n > self.limit:
            return
        import traceback   # only a failure needs it (held for after the sandbox, as for the vCPU loop)

        more = "; later ones are counted, not shown" if n == self.limit else ""
        text = (f"pykvm: {self.device}: internal error in the device's thread (a pykvm bug; the device keeps "
                f"running){more}: {type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e)))
        if self._log is not None:
            self._log(text.rstrip("\n"))
        else:
            print(text, end="", file=sys.stderr)
