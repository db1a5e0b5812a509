"""Getting vCPU threads out of KVM_RUN: parking them for a pause, or stopping them for good."""

from __future__ import annotations

import signal
import threading
import time

KICK_SIGNAL = signal.SIGUSR2   # interrupts a vCPU thread blocked in KVM_RUN


def install_kick_handler() -> None:
    """Make KICK_SIGNAL interrupt KVM_RUN (EINTR) instead of killing the process."""
    # A no-op Python handler is enough: its C-level handler is installed without SA_RESTART,
    # so a kicked thread's KVM_RUN returns EINTR.
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda *_: None)


def kick(threads) -> None:
    """Signal every live thread so a blocking KVM_RUN returns."""
    for t in threads:
        try:
            signal.pthread_kill(t.ident, KICK_SIGNAL)
        except (ProcessLookupError, OSError):
            pass


class Pauser:
    """All-vCPU pause (host dumps, saves) and the final stop; vCPU threads call park() when kicked."""

    def __init__(self, machine):
        self.machine = machine
        self.pausing = False
        self.held: frozenset[int] = frozenset()   # vCPU indices kept parked after resume (a debugger's single step)
        self._parked = 0
        self._cond = threading.Condition()

    def park(self, vcpu) -> None:
        """Called by a kicked vCPU thread: wait outside KVM_RUN until the pause ends."""
        m = self.machine
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while (self.pausing or vcpu.index in self.held) and not m.stopping:
                self._cond.wait(0.1)
            self._parked -= 1
        if not m.stopping:  # a VM that stops while paused (save with stop) never re-enters the guest
            vcpu.immediate_exit = 0

    def pause(self, timeout: float = 10.0) -> bool:
        """Get every running vCPU out of KVM_RUN and parked; True when all parked in time."""
        m = self.machine
        self.pausing = True
        for vcpu in m.vcpus:
            vcpu.immediate_exit = 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [t for t in m.threads if t.is_alive()]
            with self._cond:
                parked = self._parked >= len(alive)
            if parked:
                m.windows.drain()  # queued writes belong to the state being looked at
                return True
            kick(alive)
            with self._cond:
                self._cond.wait(0.005)
        return False

    def hold(self) -> None:
        """Called on a vCPU thread before park(): start a pause from inside (a debugger's stop)."""
        with self._cond:
            self.pausing = True

    def resume(self, held=frozenset()) -> None:
        """Let parked vCPUs re-enter the guest, except those whose indices are in `held`."""
        m = self.machine
        with self._cond:
            self.pausing = False
            self.held = frozenset(held)
            if not m.stopping:
                # a thread that had not reached park() yet (just started, or about to) must not
                # find immediate_exit still set: it would spin on EINTR instead of running
                for vcpu in m.vcpus:
                    if vcpu.index not in self.held:
                        vcpu.immediate_exit = 0
            self._cond.notify_all()

    def stop_all(self) -> None:
        """End every vCPU thread (the VM is over)."""
        m = self.machine
        m.stopping = True
        for vcpu in m.vcpus:
            vcpu.immediate_exit = 1
        for _ in range(200):
            alive = [t for t in m.threads if t.is_alive()]
            if not alive:
                break
            kick(alive)
            for t in alive:
                t.join(0.01)
