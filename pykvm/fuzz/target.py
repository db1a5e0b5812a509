"""One guest kernel as a fuzz target: boot to its "snapshot here" call, then run input after input,
each from the same snapshot (snapshot/reset.py), telling how each run ended.

The guest's side is in pykvm_abi.h (PYKVM_PORT_FUZZ). A run ends when the guest calls "done"
(or powers off or exits), crashes (any way the machine reports a crash, or the guest's
"crash" call), or the caller gives up on it (a hang). The VM never ends between runs: the
machine's intercept hook takes each crash instead of stopping the VM, and the driver writes
its core (one per distinct crash site) with the input beside it, named in the core's note.

With one vCPU, a run that says "done" is reset by the vCPU thread itself, inside the port write:
it reports the run, waits for the next input, resets the VM (snapshot/reset.restore) and returns
into the guest, so no other thread takes the VM over between inputs and every ioctl of the reset
runs on the thread that runs KVM_RUN. Crashes, hangs, several vCPUs, and anything else that wants
the VM paused (a core, a pause request, the end) take the parked path: the vCPUs park and the
machine's thread resets.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time

from .. import abi
from ..errors import EXIT_GUEST_CRASH, EXIT_OK, EXIT_TIMEOUT, PykvmError, EXIT_USAGE

INPUT_SUFFIX = ".input"                      # the input beside its core (crash/inspect.py shows it)
INPUT_HEADER = struct.Struct("<II")          # struct pykvm_fuzz_input: len, reserved
MAX_CORES = 64                              # distinct crash sites given a core per session

# wait statuses reported to AFL: a crash as the signal that would have killed a native target
SIGABRT, SIGKILL, SIGSEGV = 6, 9, 11


class FuzzSetupError(PykvmError):
    """The guest never reached its snapshot point, or named an input buffer pykvm cannot use."""

    exit_status = EXIT_USAGE


class RunResult:
    """How one input's run ended: kind "ok", "crash" or "hang"; the machine Outcome of a crash."""

    __slots__ = ("kind", "outcome", "core", "core_error", "input_file")

    def __init__(self, kind: str, outcome=None):
        self.kind = kind
        self.outcome = outcome
        self.core = self.core_error = self.input_file = None

    @property
    def wait_status(self) -> int:
        """The status word a forkserver reports: 0, or the signal a native crash would be."""
        if self.kind == "ok":
            return 0
        if self.kind == "hang":
            return SIGKILL
        trigger = getattr(self.outcome, "trigger", None)
        return SIGABRT if trigger in ("pvpanic", "fuzz-crash") else SIGSEGV

    @property
    def exit_status(self) -> int:
        """What `pykvm fuzz --input` exits with."""
        return {"ok": EXIT_OK, "crash": EXIT_GUEST_CRASH, "hang": EXIT_TIMEOUT}[self.kind]


class FuzzTarget:
    """A booted guest paused at its snapshot point; run(data) runs one input from there."""

    def __init__(self, kernel, coverage, *, mem="128M", cpus: int = 1, cmdline: str = "", crash_dir=None,
                 boot_timeout: float = 60.0, console=None, cores: bool = True):
        from ..api import VM

        self.coverage = coverage
        self.crash_dir = crash_dir
        self.cores = cores
        self._event = threading.Event()
        self._why = None                   # a PYKVM_FUZZ_CMD_* value or a machine Outcome
        self._armed = False
        self._pending: RunResult | None = None
        self._input = b""
        # the inline path (one vCPU, a run that ended with "done"): the vCPU thread waits in the fuzz
        # port's handler for the next input and resets the VM itself, so no thread hands the VM to
        # another between runs and every vCPU ioctl of a reset runs where KVM_RUN does
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._waiting = False             # the vCPU thread waits inline (under _lock)
        self._next: bytes | None = None   # its next input; None: leave the inline wait (parked path)
        self.last_reset_us = 0.0          # the last inline reset: its time (port write completed, restore(),
                                          # the input written) and the pages restore() copied
        self.last_reset_pages = 0
        self.inline_resets = 0
        self.snap = None
        self.sites: set = set()
        self.runs = self.crashes = self.hangs = 0
        self.vm = VM(kernel, mem=mem, cpus=cpus, cmdline=cmdline, devices=["fuzz"], crash_dir=crash_dir,
                     start=False, serial_input=None, console=console, capture=console is None,
                     max_transcript=65536)
        try:
            self._boot(boot_timeout)
        except BaseException:
            self.vm.close()
            raise

    # ---------------------------------------------------------------- set-up
    def _boot(self, boot_timeout: float) -> None:
        from ..snapshot.reset import take

        m = self.machine = self.vm.machine
        self.coverage.map_into(m.vm)
        m.devices.reserve(abi.PYKVM_FUZZ_MAP_ADDR, self.coverage.size, "the fuzz coverage map")
        m.device_context.fuzz = self
        m.intercept = self._intercept
        self.vm.start()
        deadline = time.monotonic() + boot_timeout
        while not self._event.wait(0.05):
            if m.done.is_set():
                out = m.outcome
                raise FuzzSetupError(f"the guest ended before its snapshot point: {out.reason if out else '?'}"
                                     f"{self._tail()}")
            if time.monotonic() >= deadline:
                break
        if not self._event.is_set():
            raise FuzzSetupError(f"the guest did not call \"snapshot here\" (PYKVM_FUZZ_CMD_SNAPSHOT) within "
                                 f"{boot_timeout:g} s of boot{self._tail()}")
        if self._why != abi.PYKVM_FUZZ_CMD_SNAPSHOT:
            what = getattr(self._why, "reason", None) or "it called \"done\" before \"snapshot here\""
            raise FuzzSetupError(f"the guest did not reach its snapshot point: {what}{self._tail()}")
        port = m.built["fuzz"]
        self.buffer_gpa, self.buffer_size = port.input_gpa, min(port.input_size, abi.PYKVM_FUZZ_INPUT_MAX)
        if not m.memory.is_ram(self.buffer_gpa, INPUT_HEADER.size + self.buffer_size):
            raise FuzzSetupError(f"the guest's input buffer {self.buffer_gpa:#x}+{self.buffer_size:#x} is not "
                                 "all RAM")
        self.snap = self._on_machine(lambda: take(m))
        if len(m.vcpus) == 1:
            m.vcpus[0].report_sregs()       # a reset reads them from kvm_run: no ioctl per input
        self._armed = True

    def _tail(self) -> str:
        text = self.vm.transcript[-400:].decode("utf-8", "replace").strip()
        return f"; its serial output ended: {text!r}" if text else ""

    def _on_machine(self, fn):
        """fn() on the machine's thread with every vCPU paused (they stay paused)."""
        m = self.machine

        def paused():
            if not m.pause():
                raise FuzzSetupError("a vCPU did not stop in time")
            return fn()
        return m.call(paused)

    # ---------------------------------------------------------------- the guest's calls (vCPU threads)
    def command(self, cmd: int) -> None:
        """FuzzPort: the guest called snapshot/done/crash; stop the vCPUs and tell the driver."""
        if cmd == abi.PYKVM_FUZZ_CMD_SNAPSHOT and self._armed:
            return                      # a second "snapshot here" within a run changes nothing
        if cmd == abi.PYKVM_FUZZ_CMD_DONE and self._armed and len(self.machine.vcpus) == 1:
            self._done_inline()
            return
        if cmd == abi.PYKVM_FUZZ_CMD_CRASH:
            from ..machine.outcome import Outcome

            cmd = Outcome(EXIT_GUEST_CRASH, "crash", "the guest reported a bug (PYKVM_FUZZ_CMD_CRASH)",
                          trigger="fuzz-crash")
        self._stop(cmd)

    def _done_inline(self) -> None:
        """On the vCPU thread, in the port write that said "done": report the run, wait for the next
        input, reset the VM to the snapshot here and return into the guest. Anything else the driver
        or the machine wants (a core, a pause, the end) makes the thread leave for the parked path."""
        m = self.machine
        vcpu = m.vcpus[0]
        with self._lock:
            self._waiting = True
            self._go.clear()
            self._why = abi.PYKVM_FUZZ_CMD_DONE
            self._event.set()
        while not self._go.wait(0.05):
            if m.stopping or m.pauser.pausing:
                with self._lock:
                    if self._waiting:              # not taken by start() meanwhile
                        self._waiting = False
                        self._next = None
                        break
        data, self._next = self._next, None
        if data is None or m.stopping:
            m.pauser.hold()                        # as _stop: park, and let the driver go the slow way
            vcpu.immediate_exit = 1
            return
        from ..snapshot.reset import restore

        t0 = time.perf_counter()
        try:
            # KVM completes the port write at the next KVM_RUN: done here, before the reset, as parking does
            vcpu.immediate_exit = 1
            vcpu.run()
            vcpu.immediate_exit = 0
            if m.windows.zone_list:
                m.windows.drain(on_vcpu=True)      # device writes queued by this run land before the reset
            self.last_reset_pages = restore(m, self.snap, ran=True)
            m.memory.write(self.buffer_gpa, INPUT_HEADER.pack(len(data), 0) + data)
        except Exception as e:                     # the driver's wait() raises it; the VM parks
            m.pauser.hold()
            vcpu.immediate_exit = 1
            self._why = e
            self._event.set()
            return
        self.last_reset_us = (time.perf_counter() - t0) * 1e6
        self.inline_resets += 1

    def _release_inline(self) -> bool:
        """Make a vCPU waiting inline leave for the parked path; True when one was waiting."""
        with self._lock:
            if not self._waiting:
                return False
            self._waiting = False
            self._next = None
            self._go.set()
        return True

    def _intercept(self, outcome) -> bool:
        """Machine.intercept: keep the VM for the next input instead of ending it."""
        if not self._armed or outcome.kind not in ("crash", "exit", "poweroff", "reset"):
            return False
        self._stop(outcome)
        return True

    def _stop(self, why) -> None:
        m = self.machine
        m.pauser.hold()
        for v in m.vcpus:
            v.immediate_exit = 1
        self._why = why
        self._event.set()

    # ---------------------------------------------------------------- runs
    def start(self, data: bytes) -> None:
        """Begin a run of `data`: settle the previous run (core, reset), write the input, let the guest go."""
        data = bytes(data[:self.buffer_size])
        pending, self._pending = self._pending, None
        self.coverage_before = None
        with self._lock:
            # inline when the vCPU waits there after a run that said "done"; one that said it only
            # after the driver called the run a hang is sent to the parked path (its core is due)
            inline = self._waiting and (pending is None or pending.kind == "ok")
            self._next = data if inline else None
            self._event.clear()
            self._why = None
            if self._waiting:
                self._waiting = False
                self._go.set()
        if inline:
            self._input = data
            self.runs += 1
            return

        def go():
            from ..snapshot.reset import restore

            m = self.machine
            if not m.pause():
                raise FuzzSetupError("a vCPU did not stop in time")
            self._event.clear()       # a "done" said after the driver gave up on the run is not this run's
            self._why = None
            if pending is not None:
                self._settle(pending)
            restore(m, self.snap)
            m.memory.write(self.buffer_gpa, INPUT_HEADER.pack(len(data), 0) + data)
            m.resume()
        self._input = data
        self.machine.call(go)
        self.runs += 1

    def wait(self, timeout: float | None = None, cancelled=None, poll: float = 0.02) -> RunResult:
        """Wait for the run to end: "ok", "crash", or "hang" after `timeout` s or once cancelled() says so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._event.wait(poll):
            if (cancelled is not None and cancelled()) or (deadline is not None and time.monotonic() >= deadline):
                self.hangs += 1
                result = RunResult("hang")
                self._pending = result
                self._pending_input = self._input
                return result
        why = self._why
        if isinstance(why, Exception):
            self._why = None
            raise why
        if isinstance(why, int) or why.kind in ("exit", "poweroff", "reset"):
            result = RunResult("ok")
        else:
            self.crashes += 1
            result = RunResult("crash", why)
        self._pending = result
        self._pending_input = self._input
        return result

    def run(self, data: bytes, timeout: float | None = None) -> RunResult:
        """One input, start to end."""
        self.start(data)
        return self.wait(timeout)

    def settle(self) -> RunResult | None:
        """Finish the last run now (pause; its core when it crashed or hung); returns it."""
        pending, self._pending = self._pending, None
        self._release_inline()
        if pending is not None:
            self._on_machine(lambda: self._settle(pending))
        return pending

    def _settle(self, result: RunResult) -> None:
        """On the machine thread, vCPUs paused: write the core of a crash (new site) or hang, with its input."""
        if result.kind == "ok" or not self.cores or self.crash_dir is None:
            return
        from ..machine.outcome import Outcome

        outcome = result.outcome
        if outcome is None:
            outcome = Outcome(EXIT_TIMEOUT, "timeout", "the input ran past the fuzz timeout", trigger="timeout")
            result.outcome = outcome
        site = _site(outcome)
        if result.kind == "crash" and (site in self.sites or len(self.sites) >= MAX_CORES):
            return
        self.sites.add(site)
        data = self._pending_input
        outcome.details["fuzz_input"] = {"suffix": INPUT_SUFFIX, "sha256": hashlib.sha256(data).hexdigest(),
                                         "bytes": len(data)}
        result.core, result.core_error = self.machine.dumper.write(outcome)
        if result.core is not None:
            from ..crash.core import CoreWriteError, write_companion

            try:
                result.input_file = write_companion(result.core, INPUT_SUFFIX, data)
            except CoreWriteError as e:
                result.core_error = str(e)

    def close(self) -> None:
        """Stop the guest and release everything."""
        self._release_inline()
        if self.snap is not None:
            self.snap.close()
        self.vm.close()


def _site(outcome) -> tuple:
    """What tells two crashes apart: trigger, vector and faulting RIP (else the whole reason)."""
    frame = outcome.details.get("frame") or {}
    if "rip" in frame:
        return outcome.trigger, outcome.details.get("vector"), frame["rip"]
    return outcome.trigger, outcome.reason


