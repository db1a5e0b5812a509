"""The device state machine: one place that turns plug-and-play and power events into callbacks.

Rules every path here keeps (tests/test_lifecycle.py checks them on random event sequences):
  - prepare_hardware runs before the first d0_entry;
  - d0_exit only follows a successful d0_entry (never after a failed one);
  - release_hardware runs exactly once for an instance whose prepare_hardware was called;
  - io_start follows each successful d0_entry, io_suspend precedes each d0_exit;
  - I/O reaches the model only in D0 (dispatch links a device's ranges on entering D0, unlinks on leaving).
"""

from __future__ import annotations

import threading

from .device import Device, State

ALLOWED = {
    State.ADDED: {State.PREPARED, State.FAILED, State.REMOVED, State.SURPRISE_REMOVED},
    State.PREPARED: {State.D0, State.FAILED, State.REMOVED, State.SURPRISE_REMOVED},
    State.D0: {State.LOW_POWER, State.STOPPED, State.REMOVED, State.SURPRISE_REMOVED, State.FAILED},
    State.LOW_POWER: {State.D0, State.STOPPED, State.REMOVED, State.SURPRISE_REMOVED, State.FAILED},
    State.STOPPED: {State.D0, State.REMOVED, State.SURPRISE_REMOVED, State.FAILED},
    State.FAILED: {State.RESTARTING, State.REMOVED, State.SURPRISE_REMOVED},
    State.RESTARTING: {State.REMOVED},
    State.REMOVED: set(),
    State.SURPRISE_REMOVED: set(),
}
TERMINAL = (State.REMOVED, State.SURPRISE_REMOVED)


class LifecycleError(Exception):
    """An event that is not valid in the device's current state."""


class CallbackFailed(Exception):
    """A model callback raised; the device is now FAILED."""

    def __init__(self, device: Device, callback: str, error: BaseException):
        super().__init__(f"{device.name}: {callback} failed: {type(error).__name__}: {error}")
        self.device, self.callback, self.error = device, callback, error


class Lifecycle:
    """Drives one device instance; `link(device, live)` puts its ranges in or out of dispatch.

    Ranges are linked right after entering D0 and unlinked right before leaving it, so
    no guest access can reach a model during or after its d0_exit.
    """

    def __init__(self, device: Device, link=None):
        self.device = device
        self.link = link or (lambda dev, live: None)
        self.lock = threading.RLock()
        self.prepared = False       # prepare_hardware was called (so release is owed)
        self.released = False
        self.history: list[State] = [device.state]

    # -- helpers --
    def _move(self, to: State) -> None:
        dev = self.device
        if to not in ALLOWED[dev.state]:
            raise LifecycleError(f"{dev.name}: cannot go from {dev.state.value} to {to.value}")
        dev.state = to
        self.history.append(to)

    def _call(self, name: str, *args) -> None:
        try:
            getattr(self.device, name)(*args)
        except Exception as e:
            self._move(State.FAILED)
            raise CallbackFailed(self.device, name, e) from e

    def _leave_d0(self, target: State) -> None:
        """Unlink, then io_suspend and d0_exit; the state moves even if the model raises."""
        dev = self.device
        self.link(dev, False)
        try:
            dev.io_suspend()
            dev.d0_exit(target)
        finally:
            self._move(target)

    def _release(self) -> None:
        if self.prepared and not self.released:
            self.released = True
            self.device.release_hardware()

    # -- events --
    def start(self) -> None:
        """ADDED/STOPPED → D0: prepare (first time) then d0_entry and io_start."""
        with self.lock:
            dev = self.device
            if dev.state is State.ADDED:
                self.prepared = True
                self._call("prepare_hardware")
                self._move(State.PREPARED)
            if dev.state not in (State.PREPARED, State.STOPPED, State.LOW_POWER):
                raise LifecycleError(f"{dev.name}: cannot start from {dev.state.value}")
            previous = dev.state
            self._call("d0_entry", previous)
            self._move(State.D0)
            try:
                dev.io_start()
            except Exception as e:
                self.fail()
                raise CallbackFailed(dev, "io_start", e) from e
            self.link(dev, True)

    def power_down(self) -> None:
        """D0 → low power (the guest asked, or the host suspends the device)."""
        with self.lock:
            if self.device.state is not State.D0:
                raise LifecycleError(f"{self.device.name}: power down from {self.device.state.value}")
            self._leave_d0(State.LOW_POWER)

    def power_up(self) -> None:
        """Low power → D0."""
        with self.lock:
            if self.device.state is not State.LOW_POWER:
                raise LifecycleError(f"{self.device.name}: power up from {self.device.state.value}")
            self.start()

    def stop(self) -> None:
        """Orderly stop, keeping host resources (D0 or low power → stopped)."""
        with self.lock:
            dev = self.device
            if dev.state is State.D0:
                self._leave_d0(State.STOPPED)
            elif dev.state is State.LOW_POWER:
                self._move(State.STOPPED)
            elif dev.state is not State.STOPPED:
                raise LifecycleError(f"{dev.name}: stop from {dev.state.value}")

    def remove(self, surprise: bool = False) -> None:
        """Orderly (or surprise) removal: leave D0 if needed, release exactly once; idempotent."""
        with self.lock:
            dev = self.device
            if dev.state in TERMINAL:
                return
            target = State.SURPRISE_REMOVED if surprise else State.REMOVED
            try:
                if dev.state is State.D0:
                    self._leave_d0(State.STOPPED)
            finally:
                try:
                    self._release()
                finally:
                    self._move(target if target in ALLOWED[dev.state] else State.REMOVED)

    def fail(self) -> None:
        """The model misbehaved: take it out of D0 (best effort) and mark it FAILED."""
        with self.lock:
            dev = self.device
            if dev.state in TERMINAL or dev.state in (State.FAILED, State.RESTARTING):
                return
            if dev.state is State.D0:
                self.link(dev, False)  # before asking a broken model to stop
                try:
                    dev.io_suspend()
                    dev.d0_exit(State.FAILED)
                except Exception:
                    pass  # it is already failing; what matters is that it leaves D0
            self._move(State.FAILED)

    def mark_restarting(self) -> None:
        """FAILED → RESTARTING while the supervisor builds a replacement."""
        with self.lock:
            self._move(State.RESTARTING)
