"""Automatic recovery: a failed device instance is replaced by a fresh one built from its last good state.

Failure detection costs the vCPU hot path nothing:
  - a model that raises is caught where the vCPU loop already catches exceptions
    (Machine._vcpu_loop) and reported here;
  - a hang is seen by the monitor thread sampling the vCPU threads' Python stacks
    (sys._current_frames): the same device-callback frame on top for longer than the deadline;
  - an inconsistent model is found by calling its check() from the monitor thread.
Recovery: the failed instance is taken out of dispatch (the guest sees an absent device),
a worker builds and starts a replacement in parallel from the model's configuration and
last good state, dispatch switches to it (generation + 1), then the old one is released.
Restarts are bounded (intensity per period); past that the failure escalates.
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time

from .device import Device, State
from .lifecycle import Lifecycle

CALLBACKS = frozenset(("io_read", "io_write", "mmio_read", "mmio_write"))


class DeviceHung(Exception):
    """Raised asynchronously in a vCPU thread stuck in a device callback past its deadline."""


class Supervisor:
    """Watches supervised devices of one DeviceManager and restarts them on failure."""

    def __init__(self, manager, intensity: int = 5, period: float = 60.0, escalate: str = "remove",
                 on_escalate=None, deadline: float = 0.5, interval: float = 0.05):
        if escalate not in ("remove", "crash"):
            raise ValueError("escalate must be 'remove' or 'crash'")
        self.manager = manager
        self.intensity = intensity
        self.period = period
        self.escalate = escalate
        self.on_escalate = on_escalate      # callable(device, reason) for escalate == "crash"
        self.deadline = deadline
        self.interval = interval
        self.vcpu_threads: dict[int, int] = {}   # thread ident -> vCPU index
        self.restarts: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.last_good: dict[str, dict] = {}
        self.recoveries: list[dict] = []
        self.failed_for_good: list[str] = []
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._started = False
        self._seen: dict[int, tuple] = {}        # thread ident -> (frame id, first seen)
        self._monitor = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._worker = threading.Thread(target=self._work, name="device-restart", daemon=True)

    def start(self) -> None:
        """Start watching: the monitor and restart threads run only once a supervised device exists."""
        self._started = True
        self.ensure_running()

    def ensure_running(self) -> None:
        """Start the threads if a supervised device is present (a VM without one pays for none)."""
        with self._start_lock:
            if not self._started or self._monitor.is_alive() or self._stop.is_set():
                return
            if not any(d.supervised for d in self.manager.devices):
                return
            self._snapshot_all()
            self._monitor.start()
            self._worker.start()

    def stop(self) -> None:
        """Stop both threads (pending restarts are dropped)."""
        self._stop.set()
        self._jobs.put(None)
        for t in (self._monitor, self._worker):
            if t.is_alive():
                t.join(2)

    # ------------------------------------------------------------ reports
    def report_failure(self, dev: Device, reason: str) -> bool:
        """A supervised device failed (called from any thread); returns False when it is not supervised."""
        if not dev.supervised:
            return False
        with self._lock:
            if dev.state in (State.FAILED, State.RESTARTING, State.REMOVED, State.SURPRISE_REMOVED):
                return True  # already being handled
            lc = self.manager.lifecycles.get(dev)
            if lc is None:
                return True
            failed_at = time.monotonic()
            lc.fail()
            window = self.restarts[dev.name]
            while window and failed_at - window[0] > self.period:
                window.popleft()
            if len(window) >= self.intensity:
                self._escalate(dev, reason)
                return True
            window.append(failed_at)
            lc.mark_restarting()
        self._jobs.put((dev, reason, failed_at))
        return True

    def _escalate(self, dev: Device, reason: str) -> None:
        msg = (f"device {dev.name} failed {self.intensity + 1} times within {self.period:g}s "
               f"(last: {reason}); escalating: {self.escalate}")
        self.failed_for_good.append(dev.name)
        self.manager._log(msg)
        if self.escalate == "crash" and self.on_escalate is not None:
            self.on_escalate(dev, msg)
        else:
            # the guest sees a surprise removal: the ranges stay claimed and read as all ones
            self.manager.lifecycles[dev].remove(surprise=True)

    # ------------------------------------------------------------ restart worker
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stop.is_set():
                return
            dev, reason, failed_at = job
            try:
                self._restart(dev, reason, failed_at)
            except Exception as e:  # the replacement itself failed: count it as another failure
                self.manager._log(f"restarting {dev.name} failed: {type(e).__name__}: {e}")

    def _restart(self, old: Device, reason: str, failed_at: float) -> None:
        mgr = self.manager
        new = type(old)(**old.config)
        state = self.last_good.get(old.name)
        if state is not None:
            new.set_state(state)
        lc = Lifecycle(new, link=mgr._link)
        with mgr.lock:
            mgr.lifecycles[new] = lc
        lc.start()                       # prepare + D0 aside: it owns no ranges yet
        with mgr.lock:
            if old not in mgr.devices:   # removed meanwhile (hot-unplug, VM stopping)
                lc.remove()
                del mgr.lifecycles[new]
                return
            mgr.replace(old, new)
            serving_at = time.monotonic()
            old_lc = mgr.lifecycles.pop(old)
        old_lc.remove()                  # release the old instance's resources, exactly once
        self.recoveries.append({"device": new.name, "generation": new.generation, "reason": reason,
                                "fault_to_serving_s": serving_at - failed_at})
        mgr._log(f"recovered device {new.name}: generation {new.generation} serving "
                 f"{(serving_at - failed_at) * 1e3:.1f} ms after the fault ({reason})")

    # ------------------------------------------------------------ monitor
    def _snapshot_all(self) -> None:
        for dev in list(self.manager.devices):
            if dev.supervised and dev.state is State.D0:
                try:
                    dev.check()
                    self.last_good[dev.name] = dev.get_state()
                except Exception as e:
                    self.report_failure(dev, f"consistency check failed: {type(e).__name__}: {e}")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._snapshot_all()
            self._find_hangs()

    def _find_hangs(self) -> None:
        now = time.monotonic()
        frames = sys._current_frames()
        try:
            self._check_stacks(frames, now)
        finally:
            # the dict holds this thread's own frame: a cycle that would keep every vCPU
            # frame (and the guest-memory views in their locals) alive until the next GC
            frames.clear()

    def _check_stacks(self, frames: dict, now: float) -> None:
        for ident in list(self.vcpu_threads):
            dev, frame = _device_frame(frames.get(ident))
            if dev is None:
                self._seen.pop(ident, None)
                continue
            key = id(frame)
            seen = self._seen.get(ident)
            if seen is None or seen[0] != key:
                self._seen[ident] = (key, now)
                continue
            if now - seen[1] > self.deadline and self.report_failure(
                    dev, f"{frame.f_code.co_name} hung for more than {self.deadline:g}s"):
                self._seen.pop(ident, None)
                import ctypes   # only when a device has hung

                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(DeviceHung))


def _device_frame(frame):
    """The outermost device-callback frame of a supervised device on this stack, or (None, None)."""
    found = (None, None)
    while frame is not None:
        if frame.f_code.co_name in CALLBACKS:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Device) and obj.supervised:
                found = (obj, frame)
        frame = frame.f_back
    return found
