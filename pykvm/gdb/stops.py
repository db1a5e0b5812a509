"""Stop coordination between the vCPU threads and the gdb server thread (all-stop).

A vCPU thread that takes a KVM_EXIT_DEBUG records a Stop and wakes the server through a pipe;
the server pauses every vCPU (Pauser) and reports the first recorded stop. The VM's end is
recorded here too, with what gdb is told about it: a W (exit status) or X (signal) packet.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

from ..machine.outcome import Outcome

SIGINT, SIGTRAP, SIGKILL, SIGSEGV, SIGALRM = 2, 5, 9, 11, 14


class Stop(NamedTuple):
    """Why the guest stopped: on which vCPU, the signal gdb sees, and the stop reason's extra field."""

    vcpu: int
    signal: int
    reason: str = ""            # "", "hwbreak", "swbreak" or "watch"
    addr: int = 0               # the watched address for "watch"


def stop_reply(stop: Stop, features: set[str]) -> bytes:
    """gdb's T stop reply for `stop` (swbreak/hwbreak only when gdb said it understands them)."""
    text = f"T{stop.signal:02x}thread:{stop.vcpu + 1:x};"
    if stop.reason == "watch":
        text += f"watch:{stop.addr:x};"
    elif stop.reason in features:
        text += f"{stop.reason}:;"
    return text.encode()


def exit_packet(out: Outcome) -> bytes:
    """W with the exit status for an ordinary end, X with a signal for anything else."""
    if out.kind in ("exit", "poweroff", "reset"):
        return b"W%02x" % (out.status & 0xFF)
    signal = {"crash": SIGSEGV, "timeout": SIGALRM}.get(out.kind, SIGKILL)
    return b"X%02x" % signal


class Stops:
    """The stop recorded by a vCPU, the one gdb is looking at, the VM's end, and the server's wake pipe."""

    def __init__(self, machine):
        self.m = machine
        self.lock = threading.Lock()
        self.pending: Stop | None = None   # recorded by a vCPU thread, not yet reported
        self.last: Stop | None = None      # the stop gdb is looking at
        self.ended: Outcome | None = None
        self.running = False
        self.step_vcpu: int | None = None
        self.rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)

    def wake(self) -> None:
        """Make the server thread look at what changed (safe from any thread)."""
        try:
            os.write(self._wfd, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the server is already due to wake

    def drain(self) -> None:
        """Consume the wake-ups (server thread)."""
        os.read(self.rfd, 4096)

    def record(self, stop: Stop) -> None:
        """A vCPU stopped for gdb (vCPU thread): keep the first reason, pause the rest, wake the server."""
        with self.lock:
            if self.pending is None:
                self.pending = stop
        self.m.pauser.hold()
        self.wake()

    def has_pending(self) -> bool:
        """True when a vCPU recorded a stop that gdb has not been told about."""
        with self.lock:
            return self.pending is not None

    def halt(self, stop: Stop | None) -> None:
        """Pause every vCPU; stop is what to report when no vCPU recorded a reason of its own."""
        m = self.m
        while not m.pause():
            if m.stopping:
                break
        with self.lock:
            if self.pending is None and stop is not None:
                self.pending = stop
        self.running = False

    def take(self) -> Stop | None:
        """The recorded stop, now gdb's to look at (None when nothing was recorded)."""
        with self.lock:
            stop, self.pending = self.pending, None
        return stop

    def end(self, outcome: Outcome) -> None:
        """Record the VM's end (main thread)."""
        with self.lock:
            self.ended = outcome
        self.wake()

    def forget(self) -> None:
        """gdb is gone: no stop is pending or looked at."""
        with self.lock:
            self.pending = None
        self.last = None
        self.step_vcpu = None
        self.running = False

    def close(self) -> None:
        """Close the wake pipe."""
        for fd in (self.rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
