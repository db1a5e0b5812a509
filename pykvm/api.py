"""pykvm's Python API: start a VM, talk to its serial port, look into its memory, collect its outcome.

    from pykvm import VM

    with VM("hello", mem="64M", cpus=2, crash_dir="crashes") as vm:
        vm.expect(b"Hello from pykvm!")          # bytes or str: literal; re.Pattern: a regex
        outcome = vm.wait()                       # Outcome(status, kind, reason, core_path, transcript)
    assert outcome.status == 0

The stable interface is VM, Outcome, ExpectError (Timeout, EOF), VMError and parse_size, as
documented here. `VM.machine` is the Machine underneath, for pykvm's own layers; it may change.

A VM runs on a background thread of this process (`start=True`, the default) or on the
calling thread (`start=False`, then `run()`: what the `pykvm` command does). It is not
sandboxed unless asked (`sandbox=True`): the seccomp filter would confine the whole Python
process, not just the VM.
"""

from __future__ import annotations

import os
import threading
import time

from .errors import EXIT_USAGE, MemorySizeError, PykvmError, UsageError
from .paths import clean
from .record import replace
from .units import parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:                 # annotations only
    from pathlib import Path

    from .machine.outcome import Outcome

__all__ = ["VM", "Outcome", "ExpectError", "Timeout", "EOF", "VMError", "parse_size"]

STOPPED_STATUS = 130            # a run the host cut short (VM.stop/close), as for Ctrl-C
MAX_TRANSCRIPT = 16 << 20       # serial output kept per VM; older bytes are dropped
_TAIL = 2000                    # output quoted in expect errors


def __getattr__(name):
    """`Outcome`, the machine's own (pykvm.machine.outcome), imported on first use: the machine is heavy to import."""
    if name == "Outcome":
        from .machine.outcome import Outcome

        return Outcome
    raise AttributeError(f"module 'pykvm.api' has no attribute {name!r}")


def disk_spec(spec) -> tuple[str, bool]:
    """A disk as (path, read_only), from `FILE[,ro]` / `FILE,rw` or a (path, read_only) pair."""
    if isinstance(spec, tuple):
        path, ro = spec
        return str(path), bool(ro)
    text = str(spec)
    path, sep, mode = text.rpartition(",")
    if sep and mode in ("ro", "rw"):
        return path, mode == "ro"
    return text, False


class VMError(PykvmError):
    """An operation the VM cannot do now: not running, a vCPU did not pause, an address not mapped."""

    exit_status = EXIT_USAGE


class ExpectError(Exception):
    """expect() gave up. `buffer`: output not consumed by earlier matches; `transcript`: all output."""

    def __init__(self, message: str, pattern, buffer: bytes, transcript: bytes, outcome: "Outcome | None" = None):
        tail = buffer[-_TAIL:].decode("utf-8", "replace")
        super().__init__(f"{message}\n--- serial output since the last match (last {_TAIL} bytes) ---\n{tail}")
        self.pattern = pattern
        self.buffer = buffer
        self.transcript = transcript
        self.outcome = outcome


class Timeout(ExpectError):
    """The pattern did not appear within the timeout (pexpect.TIMEOUT)."""


class EOF(ExpectError):
    """The VM ended before the pattern appeared (pexpect.EOF); `outcome` says how it ended."""


def _compile(pattern) -> re.Pattern:
    import re   # here, not at the top (~1.4 ms): `pykvm run` imports this module and never calls expect()

    if isinstance(pattern, re.Pattern):
        if isinstance(pattern.pattern, str):  # output is bytes: the same regex over bytes
            return re.compile(pattern.pattern.encode(), pattern.flags & ~re.UNICODE)
        return pattern
    if isinstance(pattern, str):
        pattern = pattern.encode()
    if isinstance(pattern, (bytes, bytearray)):
        if not pattern:
            raise ValueError("expect: empty pattern")
        return re.compile(re.escape(bytes(pattern)))
    raise TypeError(f"expect: pattern must be bytes, str or re.Pattern, not {type(pattern).__name__}")


class SerialLog:
    """Serial output as it arrives: the transcript (last `limit` bytes) and what no match consumed yet."""

    def __init__(self, limit: int = MAX_TRANSCRIPT):
        self.cond = threading.Condition()
        self.limit = max(4096, int(limit))
        self.pending = bytearray()
        self.transcript = bytearray()
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Append output (guest-controlled: both buffers stay within limit)."""
        with self.cond:
            for b in (self.pending, self.transcript):
                b += data
                if len(b) > self.limit:
                    del b[:len(b) - self.limit]
            self.cond.notify_all()

    def close(self) -> None:
        """No more output will come."""
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def find(self, compiled: list, timeout: float | None):
        """(index, match, searched bytes) for the earliest match, consuming output through it;
        (None, None, bytes) once closed without one; TimeoutError after timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while True:
                data = bytes(self.pending)
                best = None
                for i, rx in enumerate(compiled):
                    m = rx.search(data)
                    if m is not None and (best is None or m.start() < best[1].start()):
                        best = (i, m)
                if best is not None:
                    del self.pending[:best[1].end()]
                    return best[0], best[1], data
                if self.eof:
                    return None, None, data
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(data)
                self.cond.wait(left)

    def text(self) -> bytes:
        """The transcript so far."""
        with self.cond:
            return bytes(self.transcript)


def _writer(console):
    """console (None, an fd, a binary or text stream) as (fd or None, write(bytes) or None)."""
    if console is None:
        return None, None
    if isinstance(console, int) and not isinstance(console, bool):
        if console < 0:
            raise UsageError(f"console: bad file descriptor {console}")
        return console, None
    stream = getattr(console, "buffer", console)  # sys.stdout -> its binary buffer
    if not callable(getattr(stream, "write", None)):
        raise UsageError(f"console: expected a file descriptor or a writable stream, not {type(console).__name__}")

    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()
    return None, write


class VM:
    """One guest kernel running on KVM, driven from Python.

    Arguments (all but kernel are keyword-only):
      kernel      a kernel file (pykvm ELF, multiboot ELF, or a flat binary with load_addr) or the
                  name of a bundled guest ("hello")
      mem         RAM: bytes, or a size such as "64M"; cpus: vCPUs (1..255)
      cmdline     the kernel command line; initrd: a file passed as initrd / multiboot module 0
      disks       raw images for the bus block service: "FILE[,ro]" or (path, read_only); implies bus
      devices     extra devices: "NAME[,key=value...]" (as `--device`) or (name, {key: value})
      machine     the machine preset the devices are added to: "minimal" (the default set) or "pc"
                  (PIC, PIT, IOAPIC, RTC, ACPI PM, i8042; `pykvm devices` lists the presets)
      trust       device access policy: "trusted" or "untrusted"
      timeout     seconds before the VM is stopped with a "timeout" outcome (and a core)
      crash_dir   where cores go (None: no cores); bus: give the guest a partition bus
      console     also copy serial output here: a file descriptor or a stream (e.g. sys.stdout)
      serial_input "pipe" (send() writes to the guest), None (no input) or a file descriptor
      capture     keep serial output for expect() and the transcript (False: straight to console)
      start       start on a background thread now; with False call start() or run() later
    Advanced: irqchip ("split"/"full"), exit_port, trace_io, strict_io, load_addr and entry_mode
    (flat binaries), restart_intensity/restart_period/on_device_failure (device recovery),
    sandbox (seccomp-confine this whole process once set up), max_transcript (bytes kept).

    Errors in the arguments or the kernel raise PykvmError subclasses (with the CLI's exit
    statuses) from the constructor; nothing has run by then.
    """

    def __init__(self, kernel, *, mem=128 << 20, cpus: int = 1, cmdline: str = "", initrd=None, disks=(),
                 devices=(), trust: str = "trusted", timeout: float | None = None, crash_dir=None, bus: bool = False,
                 console=None, serial_input="pipe", capture: bool = True, start: bool = True,
                 irqchip: str = "split", exit_port: int | None = None, trace_io: bool = False,
                 strict_io: bool = False, load_addr: int | None = None, entry_mode: int = 64,
                 restart_intensity: int = 5, restart_period: float = 60.0, on_device_failure: str = "remove",
                 sandbox: bool = False, max_transcript: int = MAX_TRANSCRIPT, numa: dict | None = None,
                 memory_log=None, cpu: str = "host", display: str = "none", machine: str = "minimal"):
        from .devices.description import TRUST_LEVELS
        from .machine import MachineConfig
        from .startup.artifacts import resolve_kernel

        size = parse_size(mem) if isinstance(mem, str) else mem
        if not isinstance(size, int) or isinstance(size, bool):
            raise MemorySizeError(f"mem {mem!r}: expected bytes or a size like 128M")
        _choice("trust", trust, TRUST_LEVELS)
        _choice("irqchip", irqchip, ("split", "full"))
        _choice("on_device_failure", on_device_failure, ("remove", "crash"))
        _choice("entry_mode", entry_mode, (64, 32, 16))
        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout {timeout!r}: must be a positive number of seconds")
        options = {}
        if exit_port is not None:
            options["exit_port"] = exit_port
        cfg = MachineConfig(
            kernel=resolve_kernel(str(kernel)), kernel_name=str(kernel), mem=size, cpus=cpus, cmdline=cmdline,
            initrd=clean(initrd) if initrd is not None else None, timeout=timeout, irqchip=irqchip,
            trace_io=trace_io, strict_io=strict_io, flat_addr=load_addr, flat_bits=entry_mode,
            crash_dir=clean(crash_dir) if crash_dir is not None else None, trust=trust,
            restart_intensity=restart_intensity, restart_period=restart_period,
            on_device_failure=on_device_failure, bus=bus, disks=[disk_spec(d) for d in disks],
            devices=_machine_devices(machine, irqchip, devices), sandbox=sandbox, numa=numa,
            memory_log=clean(memory_log) if memory_log is not None else None, cpu=cpu, display=display, **options)
        self._launch(cfg, None, console, serial_input, capture, start, max_transcript)

    @classmethod
    def restore(cls, state, *, disks=(), trust: str | None = None, timeout: float | None = None, crash_dir=None,
                console=None, serial_input="pipe", capture: bool = True, start: bool = True, sandbox: bool = False,
                max_transcript: int = MAX_TRANSCRIPT) -> "VM":
        """Continue a VM saved with save() or `pykvm ctl SOCK save` (state: its path; BadStateError if unfit).

        Host resources come from the caller, never from the file: `disks` ("FILE[,ro]" or (path,
        read_only), in the saved order, each matching the saved disk's size and mode), and `trust`
        ("trusted" must be given to restore a VM that was trusted; the file alone grants at most
        "untrusted").
        """
        from .snapshot.state import SavedState, load_state

        if trust is not None:
            _choice("trust", trust, ("trusted", "untrusted"))
        saved = state if isinstance(state, SavedState) else load_state(state)
        vm = cls.__new__(cls)
        try:
            cfg = saved.machine_config(disks=[disk_spec(d) for d in disks], trust=trust, timeout=timeout,
                                       crash_dir=clean(crash_dir) if crash_dir is not None else None,
                                       sandbox=sandbox)
        except BaseException:
            saved.close()
            raise
        vm._launch(cfg, saved, console, serial_input, capture, start, max_transcript)
        return vm

    # ------------------------------------------------------------------ set-up and teardown
    def _launch(self, cfg, saved, console, serial_input, capture, start, max_transcript) -> None:
        from .machine import Machine
        from .machine.pausing import KICK_SIGNAL, install_kick_handler

        self._saved = saved
        self._fds: list[int] = []
        self._log = SerialLog(max_transcript)
        self._done = threading.Event()
        self._thread = self._reader = self._control = self._in_w = self._out_w = self._in_r = None
        self._started = self._paused = False
        self._error: BaseException | None = None
        self._outcome: Outcome | None = None
        self._closed = False
        self.machine = None
        self.before = self.after = b""
        self.match = None
        self.match_index = None
        try:
            if threading.current_thread() is threading.main_thread():
                install_kick_handler()
            else:
                import signal

                if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
                    raise VMError("create the first VM of a process on its main thread "
                                  "(it installs the signal handler that stops vCPUs)")
            self._console_fd, self._console_write = _writer(console)
            if serial_input == "pipe":
                r, w = os.pipe2(os.O_CLOEXEC)
                self._fds += [r, w]
                os.set_blocking(w, False)
                serial_in, self._in_w = r, w
                self._in_r = r
            elif serial_input is None or isinstance(serial_input, int) and not isinstance(serial_input, bool):
                serial_in = serial_input
            else:
                raise UsageError(f"serial_input {serial_input!r}: expected 'pipe', None or a file descriptor")
            if capture:
                r, w = os.pipe2(os.O_CLOEXEC)
                self._fds += [r, w]
                self._out_r, self._out_w = r, w
                cfg.serial_out, cfg.serial_unbuffered = w, True
            else:
                if self._console_write is not None:
                    raise UsageError("console: without capture, serial output needs a file descriptor")
                cfg.serial_out = self._console_fd
            cfg.serial_in = serial_in
            self.config = cfg
            self.machine = Machine(cfg, restore=saved)
            if capture:
                self._reader = threading.Thread(target=self._read_output, name="pykvm-serial-out", daemon=True)
                self._reader.start()
        except BaseException:
            self._release()
            raise
        if start:
            self.start()

    def start(self) -> "VM":
        """Run the VM on a background thread (once)."""
        self._claim_start()
        self._thread = threading.Thread(target=self._run_in_background, name="pykvm-vm", daemon=True)
        self._thread.start()
        return self

    def run(self) -> Outcome:
        """Run the VM on the calling thread until it ends (Ctrl-C on the main thread stops it); its Outcome."""
        self._claim_start()
        try:
            self.machine.run()
        finally:
            self._ended()
        return self._make_outcome()

    def _claim_start(self) -> None:
        if self._closed:
            raise VMError("this VM is closed")
        if self._started:
            raise VMError("this VM was already started")
        self._started = True

    def _run_in_background(self) -> None:
        try:
            self.machine.run()
        except BaseException as e:  # handed to wait()
            self._error = e
        finally:
            self._ended()

    def _ended(self) -> None:
        """The run is over: stop serving control requests, let the reader see EOF, publish the outcome."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._out_w is not None:     # devices are stopped: nothing writes serial output any more
            self._close_fd(self._out_w)
            self._out_w = None
        if self._reader is not None:
            self._reader.join()
        self._log.close()
        if self.machine.outcome is not None:
            self._outcome = self._make_outcome()
        self._done.set()

    def stop(self) -> None:
        """Stop a running VM now (outcome kind "stopped", status 130); no core is written."""
        from .machine.outcome import Outcome

        if self.machine is not None and self._started:
            self.machine.finish(Outcome(STOPPED_STATUS, "stopped", "stopped by the host (VM.stop)"))

    def close(self) -> None:
        """Stop the VM if it runs and release everything it holds (idempotent; the context manager calls it)."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._release()

    def _release(self) -> None:
        if getattr(self, "_control", None) is not None:
            self._control.close()
            self._control = None
        if self.machine is not None:
            self.machine.close()
        if self._out_w is not None:      # never ran: the reader ends at EOF before its pipe closes
            self._close_fd(self._out_w)
            self._out_w = None
        if self._reader is not None:
            self._reader.join()
        for fd in list(self._fds):
            self._close_fd(fd)
        if self._saved is not None:
            self._saved.close()
            self._saved = None

    def _close_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            os.close(fd)

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ serial port
    def _read_output(self) -> None:
        while True:
            try:
                data = os.read(self._out_r, 65536)
            except OSError:
                data = b""
            if not data:
                return
            if self._console_fd is not None:
                try:
                    while data and self._console_fd is not None:
                        n = os.write(self._console_fd, data)
                        self._console_tee(data[:n])
                        data = data[n:]
                except OSError:
                    self._console_fd = None   # the console went away: keep capturing
                continue
            self._console_tee(data)

    def _console_tee(self, data: bytes) -> None:
        if self._console_write is not None:
            try:
                self._console_write(data)
            except (OSError, ValueError):
                self._console_write = None
        self._log.feed(data)

    def send(self, data) -> int:
        """Write bytes (or str, as UTF-8) to the guest's serial input; returns the count written."""
        if isinstance(data, str):
            data = data.encode()
        if self._in_w is None:
            raise VMError("this VM's serial input is not a pipe (serial_input was not 'pipe')")
        if self._done.is_set():
            raise VMError("the VM has ended: nothing reads its serial input")
        try:
            return os.write(self._in_w, bytes(data))
        except BlockingIOError:
            raise VMError("the guest's serial input is full (64 KiB unread)") from None

    def sendline(self, line="") -> int:
        """send(line + newline)."""
        return self.send((line.encode() if isinstance(line, str) else bytes(line)) + b"\n")

    def expect(self, pattern, timeout: float | None = 30.0) -> re.Match:
        """Wait for serial output matching pattern (or any of a list) and return the re.Match.

        bytes/str match literally, an re.Pattern as a regex (str regexes are applied to the bytes).
        Output up to the match's end is consumed; `before`, `after`, `match` and `match_index` are
        set as in pexpect. Raises Timeout, or EOF once the VM ended without the pattern.
        """
        __tracebackhide__ = True   # pytest shows the caller's line, not this method
        patterns = list(pattern) if isinstance(pattern, (list, tuple)) else [pattern]
        if not patterns:
            raise ValueError("expect: no patterns")
        compiled = [_compile(p) for p in patterns]
        try:
            i, m, data = self._log.find(compiled, timeout)
        except TimeoutError as e:
            raise Timeout(f"expect({pattern!r}): no match within {timeout:g}s", pattern, e.args[0],
                          self._log.text()) from None
        if m is not None:
            self.before, self.after, self.match, self.match_index = data[:m.start()], m.group(0), m, i
            return m
        self._done.wait()
        out = self._outcome
        how = f"{out.kind}: {out.reason}" if out is not None else "the VM stopped"
        raise EOF(f"expect({pattern!r}): the VM ended ({how}) before a match", pattern, data, self._log.text(), out)

    @property
    def transcript(self) -> bytes:
        """All serial output so far (the last max_transcript bytes)."""
        return self._log.text()

    # ------------------------------------------------------------------ running state
    @property
    def running(self) -> bool:
        """True from start() until the guest exits, crashes, times out or is stopped."""
        return self._started and not self._done.is_set()

    @property
    def outcome(self) -> Outcome | None:
        """The Outcome once the run ended, else None."""
        return self._outcome if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> Outcome:
        """Block until the VM ends and return its Outcome (Timeout if it is still running after timeout)."""
        if not self._started:
            raise VMError("the VM was not started (start=False: call start() or run())")
        __tracebackhide__ = True
        if not self._done.wait(timeout):
            raise Timeout(f"wait(): the VM is still running after {timeout:g}s", None, b"", self.transcript)
        if self._error is not None:
            raise self._error
        return self._outcome

    def _make_outcome(self) -> Outcome:
        return replace(self.machine.outcome, transcript=self._log.text(), details=dict(self.machine.outcome.details),
                       kernel_file=clean(self.config.kernel) if self.config.kernel else None)

    def pause(self) -> None:
        """Stop every vCPU outside the guest until resume() (VMError if one does not stop in time)."""
        m = self._live_machine()
        if not m.call(m.pause):
            m.call(m.resume)
            raise VMError("a vCPU did not stop in time")
        self._paused = True

    @property
    def paused(self) -> bool:
        """Whether pause() holds the vCPUs (until resume())."""
        return self._paused

    def resume(self) -> None:
        """Let paused vCPUs run the guest again."""
        m = self._live_machine()
        self._paused = False
        m.call(m.resume)

    def _live_machine(self):
        if not self.running:
            raise VMError("the VM is not running")
        return self.machine

    def _stopped_do(self, fn):
        """fn() while no vCPU is in the guest: paused already, not running, or paused around it."""
        m = self.machine
        if m is None:
            raise VMError("this VM is closed")
        if self._paused or not self.running:
            return fn()

        def paused():
            if not m.pause():
                m.resume()
                raise VMError("a vCPU did not stop in time")
            try:
                return fn()
            finally:
                m.resume()
        return m.call(paused)

    # ------------------------------------------------------------------ registers and memory
    def _vcpu(self, index: int):
        vcpus = self.machine.vcpus if self.machine is not None else []
        if not isinstance(index, int) or not 0 <= index < len(vcpus):
            raise VMError(f"no vCPU {index!r} (this VM has {len(vcpus)})")
        return vcpus[index]

    def regs(self, vcpu: int = 0) -> dict:
        """General registers of a vCPU ({"rax": ..., "rip": ..., "rflags": ...})."""
        from .kvm.vcpu import regs_to_dict

        v = self._vcpu(vcpu)
        return self._stopped_do(lambda: regs_to_dict(v.get_regs()))

    def sregs(self, vcpu: int = 0) -> dict:
        """Segment and control registers of a vCPU (cr0, cr3, cr4, efer, cs, ...)."""
        from .kvm.vcpu import sregs_to_dict

        v = self._vcpu(vcpu)
        return self._stopped_do(lambda: sregs_to_dict(v.get_sregs()))

    def _ram(self, addr: int, size: int) -> memoryview:
        from .memory import GuestMemoryError

        if not isinstance(addr, int) or not isinstance(size, int) or addr < 0 or size < 0:
            raise VMError(f"bad guest-physical range {addr!r}+{size!r}")
        if self.machine is None or self.machine.memory is None:
            raise VMError("this VM is closed")
        try:
            return self.machine.memory.view(addr, size)
        except GuestMemoryError as e:
            raise VMError(str(e)) from None

    def read_phys(self, addr: int, size: int) -> bytes:
        """size bytes of guest RAM at guest-physical addr (VMError where it is not RAM)."""
        return bytes(self._ram(addr, size))

    def write_phys(self, addr: int, data) -> None:
        """Copy data into guest RAM at guest-physical addr."""
        data = bytes(data)
        self._ram(addr, len(data))[:] = data

    def translate(self, vaddr: int, vcpu: int = 0) -> int | None:
        """The guest-physical address vaddr maps to through vCPU's page tables, or None when unmapped."""
        from .memory.pagewalk import translate

        if not isinstance(vaddr, int) or vaddr < 0:
            raise VMError(f"bad virtual address {vaddr!r}")
        s = self.sregs(vcpu)
        return translate(self.machine.memory, s["cr0"], s["cr3"], s["cr4"], s["efer"], vaddr)

    def _pages(self, vaddr: int, size: int, vcpu: int) -> list[tuple[int, int]]:
        """[(guest-physical address, length)] covering [vaddr, vaddr+size), one piece per page."""
        from .memory.pagewalk import virtual_spans

        if not isinstance(vaddr, int) or not isinstance(size, int) or vaddr < 0 or size < 0:
            raise VMError(f"bad virtual range {vaddr!r}+{size!r}")
        if size == 0:
            return []
        s = self.sregs(vcpu)
        # not only RAM: a mapped page outside RAM gets _ram's own error
        pieces = virtual_spans(self.machine.memory, s["cr0"], s["cr3"], s["cr4"], s["efer"], vaddr, size,
                               ram_only=False)
        done = sum(n for _pa, n in pieces)
        if done < size:
            raise VMError(f"virtual address {vaddr + done:#x} is not mapped on vCPU {vcpu}")
        return pieces

    def read_virt(self, vaddr: int, size: int, vcpu: int = 0) -> bytes:
        """size bytes at guest-virtual vaddr, translated through vCPU's page tables page by page."""
        return b"".join(self.read_phys(pa, n) for pa, n in self._pages(vaddr, size, vcpu))

    def write_virt(self, vaddr: int, data, vcpu: int = 0) -> None:
        """Copy data to guest-virtual vaddr, translated through vCPU's page tables page by page."""
        data = bytes(data)
        pieces = self._pages(vaddr, len(data), vcpu)
        views = [self._ram(pa, n) for pa, n in pieces]   # all checked before any byte is written
        at = 0
        for view in views:
            view[:] = data[at:at + len(view)]
            at += len(view)

    # ------------------------------------------------------------------ cores, saving, the control socket
    def dump(self) -> Path:
        """Write a core of the VM as it is now (pausing it briefly) and return its path."""
        m = self.machine
        if m is None:
            raise VMError("this VM is closed")
        if self.config.crash_dir is None:
            raise VMError("this VM has no crash_dir: cores are disabled")
        if self.running:
            path, err = m.call(m.host_dump)
        else:
            from .machine.outcome import Outcome

            path, err = m.dumper.write(Outcome(0, "dump", "core requested by the host", trigger="host-request"))
        if path is None:
            raise VMError(f"no core written: {err}")
        from .machine.outcome import as_path

        return as_path(path)

    def request_dump(self) -> None:
        """Ask for a core without waiting (safe in a signal handler); its path goes to stderr."""
        self.machine.request_dump()

    def save(self, path, stop: bool = False) -> dict:
        """Save the running VM to path (VM.restore or `pykvm restore` continues it); stop=True ends this run."""
        from .snapshot.state import SaveRefused, save_vm

        m = self._live_machine()
        try:
            return m.call(lambda: save_vm(m, str(path), stop=stop))
        except SaveRefused as e:
            raise VMError(f"not saved: {e}") from None

    def snapshot(self):
        """The VM's state now (pausing it briefly): vCPUs, devices, RAM; reset(snap) returns to it.

        The first snapshot turns on KVM's dirty-page logging for guest RAM. A snapshot holds a
        copy of the RAM that held data; close() it (or drop it) to release that.
        """
        from .snapshot.reset import ResetRefused, take

        m = self._machine_for_reset()
        try:
            return self._stopped_do(lambda: take(m))
        except ResetRefused as e:
            raise VMError(f"no snapshot taken: {e}") from None

    def reset(self, snap) -> int:
        """Put the VM back to `snap` (taken by snapshot() of this VM), restoring only the pages
        written since; it runs on from there. Returns how many 4 KiB pages were copied back."""
        from .snapshot.reset import ResetRefused, restore

        m = self._machine_for_reset()

        def go():
            copied = restore(m, snap)
            self._drop_serial()
            return copied
        try:
            return self._stopped_do(go)
        except ResetRefused as e:
            raise VMError(f"not reset: {e}") from None

    def _drop_serial(self) -> None:
        """After a reset: output the guest wrote before it, and input it did not read, are not this run's."""
        import fcntl
        import termios

        def queued(fd) -> int:
            buf = bytearray(4)
            fcntl.ioctl(fd, termios.FIONREAD, buf)
            return int.from_bytes(buf, "little")

        if self._in_r is not None:
            while (n := queued(self._in_r)) > 0:
                os.read(self._in_r, n)
        if getattr(self, "_out_r", None) is not None and self._reader is not None:
            deadline = time.monotonic() + 2.0
            while queued(self._out_r) > 0 and time.monotonic() < deadline:
                time.sleep(0.0005)          # the reader thread takes what was written before the pause
        with self._log.cond:
            self._log.pending.clear()
        self.before = self.after = b""
        self.match = self.match_index = None

    def _machine_for_reset(self):
        m = self.machine
        if m is None or self._closed:
            raise VMError("this VM is closed")
        if self._done.is_set() or m.outcome is not None:
            raise VMError("the VM has ended: a snapshot or reset needs a VM that runs (or has not started)")
        return m

    def serve_control(self, path) -> None:
        """Serve `pykvm ctl` commands on a unix socket at path until the run ends."""
        from .control.server import ControlServer

        if self._control is not None:
            raise VMError("this VM already serves a control socket")
        try:
            self._control = ControlServer(self.machine, str(path))
        except OSError as e:
            raise UsageError(f"--control {path}: {e.strerror}") from None

    # ------------------------------------------------------------------ reports
    @property
    def kernel(self) -> Path:
        """The kernel file this VM booted (a pathlib.Path)."""
        from .machine.outcome import as_path

        return as_path(self.config.kernel)

    def stats(self) -> dict:
        """Exit counts, unclaimed I/O, device events, windows and bus counters (as `pykvm ctl stats`)."""
        return self.machine.stats()

    @property
    def policy_summary(self) -> str:
        """One line on what the device access policy denied or translated ("" when nothing)."""
        return self.machine.policy.summary()

    @property
    def unclaimed_io(self) -> dict:
        """{(kind, address, "r"/"w"): count} of accesses no device claimed."""
        return dict(self.machine.devices.unclaimed.items())


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise UsageError(f"{name} {value!r}: expected one of {', '.join(map(str, allowed))}")


def _machine_devices(machine, irqchip: str, devices) -> list[tuple[str, dict]]:
    """The preset's devices plus the extra ones (which win where both name a type)."""
    from .devices import registry

    extra = [device_spec(d) for d in devices]
    try:
        return registry.with_preset(machine, irqchip, extra)
    except registry.DeviceSpecError:
        raise UsageError(f"--machine {machine!r}: not a machine preset (known: {', '.join(registry.PRESETS)}; "
                         "`pykvm devices` lists what each adds)") from None


def device_spec(spec) -> tuple[str, dict]:
    """A device as (registry name, options), from `NAME[,key=value...]` or such a pair."""
    from .devices import registry
    from .errors import DeviceConfigError

    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        return str(spec[0]), dict(spec[1])
    try:
        return registry.parse_spec(str(spec))
    except registry.DeviceSpecError as e:
        raise DeviceConfigError(str(e) if str(e).startswith("--device") else f"--device: {e}") from None
