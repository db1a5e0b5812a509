"""Work handed to the thread that runs the machine, where pausing and dumping are safe."""

from __future__ import annotations

import queue
import threading


class _Result:
    """One queued call's outcome (concurrent.futures.Future would cost ~10 ms of imports per run)."""

    __slots__ = ("_done", "_value", "_error")

    def __init__(self):
        self._done = threading.Event()
        self._value = self._error = None

    def set_result(self, value) -> None:
        self._value = value
        self._done.set()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def result(self, timeout: float):
        if not self._done.wait(timeout):
            raise TimeoutError("the machine's main thread did not run the request in time")
        if self._error is not None:
            raise self._error
        return self._value


class MainThreadQueue:
    """Callables queued by other threads (control socket, signal handlers) for the main thread."""

    def __init__(self):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()   # (fn, _Result | None)
        self.wake = threading.Event()
        self.main_ident: int | None = None
        self._closed = False            # after run(): calls execute directly, nothing serves a queue
        self._lock = threading.Lock()

    def call(self, fn, timeout: float = 60.0):
        """Run fn() on the main thread and return its result (directly when already there or closed)."""
        # Before run() reaches its loop, requests wait in the queue: devices are still starting.
        if threading.get_ident() == self.main_ident:
            return fn()
        with self._lock:
            queued = not self._closed
            if queued:
                fut = _Result()
                self._requests.put((fn, fut))
                self.wake.set()
        return fut.result(timeout) if queued else fn()

    def post(self, fn) -> None:
        """Queue fn() without waiting for it (safe from a signal handler)."""
        self._requests.put((fn, None))
        self.wake.set()

    def close(self) -> None:
        """From now on call() runs its function on the caller's thread."""
        with self._lock:
            self._closed = True

    def serve(self) -> None:
        """Run everything queued so far, handing results and exceptions back to the callers."""
        while True:
            try:
                fn, fut = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except BaseException as e:  # handed back to the caller, who reports it
                if fut is not None:
                    fut.set_exception(e)
                continue
            if fut is not None:
                fut.set_result(result)
