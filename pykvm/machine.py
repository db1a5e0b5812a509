"""Assembles a VM from a config (memory, CPUs, devices, kernel) and runs one thread per vCPU."""

from __future__ import annotations

import os
import queue
import signal
import struct
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from . import abi, errors
from .boot import cpu as cpu_setup
from .boot import trapframe
from .boot.firmware import load_firmware
from .boot.image import load_image
from .boot.loader import BootPlan, load
from .devices import DeviceManager, FirmwareTrap, GuestCrash, GuestExit, VmEvent
from .devices import memwindow
from .devices.dma import Dma
from .devices.fwcfg import FwCfg
from .devices.identity import Identity
from .devices.serial import Serial16550
from .devices.mailbox import Mailbox
from .devices.power import PowerControl
from .devices.policy import PolicyAuthority
from .devices.simple import DebugExit, FirmwareTrapPort, PostCode, PowerOff, PvPanic
from .devices.supervisor import DeviceHung, Supervisor
from .kvm import Kvm, KvmError, constants as C
from .memory import GuestMemory, GuestMemoryError
from .memory.pagewalk import EFER_LMA

TSS_ADDR = 0xFFFBD000          # three pages KVM needs on Intel for real-mode emulation
IDENTITY_MAP_ADDR = 0xFFFBC000
KICK_SIGNAL = signal.SIGUSR2   # interrupts a vCPU thread blocked in KVM_RUN
MIN_MEMORY = 2 << 20
WINDOW_SLOT_BASE = 64          # memslots of device windows; RAM (and vNUMA nodes) use 0..63
COALESCED_DRAIN_PERIOD = 0.01  # how often queued coalesced writes are applied when nothing else exits

_io_hdr = struct.Struct("<BBHIQ")            # kvm_run.io: direction, size, port, count, data_offset
_mmio_hdr = struct.Struct("<Q8sIB")          # kvm_run.mmio: phys_addr, data, len, is_write
_exit_hdr = struct.Struct("<I20xBBHIQ")     # exit_reason, then kvm_run.io at offset 32
_SIZED = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


def _bad_port_size(*_args):
    raise GuestCrash("internal-error", "KVM reported port I/O of a size other than 1, 2 or 4 bytes")


# Indexed by kvm_run.io.size (a byte): sizes a port access cannot have stop the VM cleanly.
_UNPACK = [_SIZED[n].unpack_from if n in (1, 2, 4) else _bad_port_size for n in range(256)]
_PACK = [_SIZED[n].pack_into if n in (1, 2, 4) else _bad_port_size for n in range(256)]
_MASK = [(1 << (8 * n)) - 1 for n in range(256)]


@dataclass
class MachineConfig:
    """Everything that describes one VM run."""

    kernel: Path
    kernel_name: str = ""            # argv[0] for multiboot command lines (what the user typed)
    mem: int = 128 << 20
    cpus: int = 1
    cmdline: str = ""
    initrd: Path | None = None
    serial_out: int | None = 1       # fd, or None to discard
    serial_in: int | None = None
    timeout: float | None = None
    exit_port: int = abi.PYKVM_PORT_DEBUG_EXIT
    irqchip: str = "split"           # "split" (LAPIC in kernel) or "full" (+IOAPIC, PIC, PIT)
    trace_io: bool = False
    strict_io: bool = False
    flat_addr: int | None = None
    flat_bits: int = 64
    crash_dir: Path | None = None    # where cores go; None disables dumping
    restart_intensity: int = 5       # device restarts allowed per restart_period before escalating
    restart_period: float = 60.0
    on_device_failure: str = "remove"  # past the intensity: "remove" (guest sees surprise removal) or "crash"
    device_deadline: float = 0.5     # a device callback running longer than this has hung
    trust: str = "trusted"           # device access policy level: "trusted" or "untrusted" (devices/policy.py)
    sandbox: bool = False            # seccomp filter once set up (pykvm/sandbox.py); the CLI turns it on


@dataclass
class Outcome:
    """How the run ended: an exit status and the words that go with it."""

    status: int
    kind: str                        # "exit", "poweroff", "reset", "crash", "timeout", "interrupted", "vmm-error"
    message: str
    vcpu: int | None = None
    trigger: str | None = None
    details: dict = field(default_factory=dict)
    core_path: Path | None = None
    core_error: str | None = None


class Machine:
    """One VM: build with a config, then run() until the guest exits, crashes or times out."""

    def __init__(self, config: MachineConfig, restore=None):
        self.config = config
        self._restore = restore          # a state.SavedState to resume instead of booting config.kernel
        # memory-backed device windows and coalesced MMIO (see _window_hook)
        self._win_lock = threading.RLock()
        self._win_slots: dict[int, tuple] = {}      # id(window) -> (slot, window)
        self._zones: dict[int, tuple] = {}          # id(device) -> (device, [(gpa, length)])
        self._zone_list: list[tuple[int, int]] = []
        self._ring_lock = threading.RLock()
        self._ring_page = 0                         # KVM_COALESCED_MMIO_PAGE_OFFSET, 0 = unsupported
        self._readonly_mem = False
        self._warned_ro = False
        self._drainer: threading.Thread | None = None
        self.ring_stats = memwindow.RingStats()
        # one applier per (on a vCPU thread, strict) so draining builds no closure per call
        self._appliers = {(on_vcpu, strict): (lambda a, n, v, o=on_vcpu, st=strict: self._apply_coalesced(a, n, v, o, st))
                          for on_vcpu in (False, True) for strict in (False, True)}
        self.pending_images: dict[tuple[str, str], bytes] = {}   # (device, window) -> bytes, from a restore
        self.kvm = self.vm = self.memory = None
        self.vcpus = []
        self.threads: list[threading.Thread] = []
        self.outcome: Outcome | None = None
        self._outcome_lock = threading.Lock()
        self._done = threading.Event()
        self.stopping = False
        self.exit_counts: list[dict[int, int]] = []
        self.plan = None
        # pausing every vCPU (host-requested dumps) without stopping the guest
        self._pausing = False
        self._parked = 0
        self._park_cond = threading.Condition()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()   # (fn, Future | None) for the main thread
        self._wake = threading.Event()
        self._main_ident: int | None = None
        self._requests_closed = False   # after run(): calls execute directly, nothing serves a queue
        self._requests_lock = threading.Lock()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- build
    def _build(self) -> None:
        cfg = self.config
        if cfg.mem < MIN_MEMORY or cfg.mem % 4096:
            raise errors.MemorySizeError(
                f"memory size {cfg.mem} bytes: must be a multiple of 4096 and at least {MIN_MEMORY >> 20} MiB")
        if not 1 <= cfg.cpus <= 255:
            raise errors.UsageError(f"--cpus {cfg.cpus}: must be between 1 and 255")
        restoring = self._restore is not None
        if not restoring:
            from .artifacts import firmware_path

            image = load_image(cfg.kernel, flat_addr=cfg.flat_addr, flat_bits=cfg.flat_bits)
            firmware = load_firmware(firmware_path())

        self.kvm = Kvm.open(os.environ.get("PYKVM_DEV_KVM", "/dev/kvm"))
        max_vcpus = self.kvm.check_extension(C.KVM_CAP_MAX_VCPUS) or self.kvm.check_extension(C.KVM_CAP_NR_VCPUS)
        if cfg.cpus > max_vcpus:
            raise errors.UsageError(f"--cpus {cfg.cpus}: this host's KVM allows at most {max_vcpus}")
        self.vm = self.kvm.create_vm()
        try:
            self.memory = GuestMemory.create(cfg.mem, abi.PYKVM_MMIO_HOLE)
        except GuestMemoryError as e:
            raise errors.MemorySizeError(str(e)) from None
        except OSError as e:
            raise errors.MemorySizeError(f"cannot allocate {cfg.mem >> 20} MiB of guest memory: {e.strerror}") from None
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
        self._readonly_mem = bool(self.vm.check_extension(C.KVM_CAP_READONLY_MEM))
        self._ring_page = self.vm.check_extension(C.KVM_CAP_COALESCED_MMIO)
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        if cfg.irqchip == "full":
            self.vm.create_irqchip()
            self.vm.create_pit2(C.KVM_PIT_SPEAKER_DUMMY)
        else:
            self.vm.enable_split_irqchip()

        self.devices = self._build_devices()
        if not restoring:
            self.plan: BootPlan = load(self.memory, image, firmware, cfg.cpus, cmdline=cfg.cmdline,
                                       argv0=cfg.kernel_name or str(cfg.kernel), initrd=cfg.initrd)

        supported = self.kvm.supported_cpuid()
        nx = cpu_setup.nx_supported(supported)
        from .kvm.abi import ffi as kffi

        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid2(cpu_setup.cpuid_for_vcpu(supported, i, kffi))
        self.exit_counts = [dict() for _ in self.vcpus]
        if restoring:
            from .state import apply_state

            apply_state(self, self._restore)
        else:
            cpu_setup.apply_entry(self.vcpus[0], self.plan.entry, nx)

    def _build_devices(self) -> DeviceManager:
        cfg = self.config
        trace = (lambda msg: print(f"pykvm: io: {msg}", file=sys.stderr)) if cfg.trace_io else None
        self.policy = PolicyAuthority(cfg.trust)
        dm = DeviceManager(trace_io=trace, strict_io=cfg.strict_io, access_filter=self.policy)
        dm.window_hook = self._window_hook
        irq4 = (lambda level: self.vm.irq_line(4, level)) if cfg.irqchip == "full" else None
        self.serial = dm.add(Serial16550(out_fd=cfg.serial_out, in_fd=cfg.serial_in, irq=irq4))
        dm.add(DebugExit(port=cfg.exit_port))
        self.pvpanic = dm.add(PvPanic(on_crash_loaded=self._pvpanic_crash_loaded))
        dm.add(PowerOff())
        dm.add(PostCode())
        dm.add(FwCfg(self.memory.size, self.memory.top, cfg.cpus))
        dm.add(FirmwareTrapPort())
        dm.add(PowerControl())
        dm.add(Mailbox())
        self.identity = dm.add(Identity())
        pulse = ((lambda line: (self.vm.irq_line(line, 1), self.vm.irq_line(line, 0)))
                 if cfg.irqchip == "full" else None)
        self.dma = dm.add(Dma(memory=self.memory, irq=pulse))
        self.policy.check(dm.devices)   # every description against its model's ranges, before anything runs
        self.supervisor = Supervisor(dm, intensity=cfg.restart_intensity, period=cfg.restart_period,
                                     escalate=cfg.on_device_failure, on_escalate=self._device_failed_for_good,
                                     deadline=cfg.device_deadline)
        return dm

    def _device_failed_for_good(self, dev, message: str) -> None:
        self._finish(Outcome(errors.EXIT_GUEST_CRASH, "crash", message, trigger="device-failure"))

    def _pvpanic_crash_loaded(self, value: int) -> None:
        print(f"pykvm: guest reported pvpanic 'crash loaded' (event {value:#x}); continuing", file=sys.stderr)

    # ---------------------------------------------------------------- run
    def run(self) -> Outcome:
        """Start every vCPU thread and wait until one of them (or the timeout) ends the VM."""
        self._install_kick_handler()
        self.devices.start_all()
        self.supervisor.start()
        try:
            if self.config.sandbox:  # devices are up, no guest code has run: from here on, only what running needs
                from . import sandbox
                sandbox.install(self.config.crash_dir)
            for vcpu in self.vcpus:
                t = threading.Thread(target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True)
                self.threads.append(t)
                t.start()
                self.supervisor.vcpu_threads[t.ident] = vcpu.index
            deadline = None if self.config.timeout is None else time.monotonic() + self.config.timeout
            self._main_ident = threading.get_ident()
            try:
                while not self._done.is_set():
                    self._wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                    self._wake.clear()
                    self._serve_requests()
                    if deadline is not None and time.monotonic() >= deadline and not self._done.is_set():
                        self._finish(Outcome(errors.EXIT_TIMEOUT, "timeout",
                                             f"guest still running after --timeout {self.config.timeout:g}s; stopped",
                                             trigger="timeout"))
                        break
            except KeyboardInterrupt:
                self._finish(Outcome(130, "interrupted", "interrupted by the user (Ctrl-C)"))
            finally:
                self._main_ident = None
                with self._requests_lock:
                    self._requests_closed = True
            self._serve_requests()  # answer callers still waiting, then refuse new ones
            self._stop_vcpus()
            if self.outcome.kind in ("crash", "timeout", "vmm-error"):
                self._dump_outcome(self.outcome)
        finally:
            self.supervisor.stop()
            self.devices.stop_all()
        return self.outcome

    def _install_kick_handler(self) -> None:
        # A no-op Python handler is enough: its C-level handler is installed without SA_RESTART,
        # so a kicked thread's KVM_RUN returns EINTR.
        if threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda *_: None)

    def _stop_vcpus(self) -> None:
        self.stopping = True
        for vcpu in self.vcpus:
            vcpu.immediate_exit = 1
        for _ in range(200):
            alive = [t for t in self.threads if t.is_alive()]
            if not alive:
                break
            for t in alive:
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass
            for t in alive:
                t.join(0.01)

    # ---------------------------------------------------------------- pause / dump
    def _park(self, vcpu) -> None:
        """Called by a kicked vCPU thread: wait outside KVM_RUN until the pause ends."""
        with self._park_cond:
            self._parked += 1
            self._park_cond.notify_all()
            while self._pausing and not self.stopping:
                self._park_cond.wait(0.1)
            self._parked -= 1
        if not self.stopping:  # a VM that stops while paused (save with stop) never re-enters the guest
            vcpu.immediate_exit = 0

    def pause(self, timeout: float = 2.0) -> bool:
        """Get every running vCPU out of KVM_RUN and parked; True when all parked in time."""
        self._pausing = True
        for vcpu in self.vcpus:
            vcpu.immediate_exit = 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [t for t in self.threads if t.is_alive()]
            with self._park_cond:
                parked = self._parked >= len(alive)
            if parked:
                self.drain_coalesced()  # queued writes belong to the state being looked at
                return True
            for t in alive:
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass
            with self._park_cond:
                self._park_cond.wait(0.005)
        return False

    def resume(self) -> None:
        """Let parked vCPUs re-enter the guest."""
        with self._park_cond:
            self._pausing = False
            self._park_cond.notify_all()

    def call(self, fn, timeout: float = 60.0):
        """Run fn() on the thread that runs the machine (where pausing and dumping are safe)."""
        # Before run() reaches its loop, requests wait in the queue: devices are still starting.
        if threading.get_ident() == self._main_ident:
            return fn()
        with self._requests_lock:
            queued = not self._requests_closed
            if queued:
                fut: Future = Future()
                self._requests.put((fn, fut))
                self._wake.set()
        return fut.result(timeout) if queued else fn()

    def _serve_requests(self) -> None:
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

    def request_dump(self) -> None:
        """Ask for a core of the running guest without stopping it (safe from a signal handler)."""
        self._requests.put((self._signal_dump, None))
        self._wake.set()

    def _signal_dump(self) -> None:
        path, err = self.host_dump()
        print(f"pykvm: host-requested core: {path if path else 'failed: ' + str(err)}", file=sys.stderr)

    def host_dump(self) -> tuple[Path | None, str | None]:
        """Pause every vCPU, write a 'host-request' core, resume; (path, None) or (None, why not)."""
        if not self.pause():
            self.resume()
            return None, "a vCPU did not stop in time"
        try:
            out = Outcome(0, "dump", "core requested by the host while the guest runs", trigger="host-request")
            return self._write_core(out)
        finally:
            self.resume()

    def stats(self) -> dict:
        """Counters for the control channel and the exit summary."""
        return {
            "exits": [{C.EXIT_REASON_NAMES.get(r, str(r)): n for r, n in c.items()} for c in self.exit_counts],
            "unclaimed": {f"{k} {a:#x} {rw}": n for (k, a, rw), n in self.devices.unclaimed.items()},
            "outside_d0": {f"{d} {rw}": n for (d, rw), n in self.devices.outside_d0.items()},
            "device_events": list(self.devices.events),
            "windows": self.window_info(),
            "coalesced": self.ring_stats.as_dict(),
        }

    def _dump_outcome(self, outcome: Outcome) -> None:
        outcome.core_path, outcome.core_error = self._write_core(outcome)

    def _write_core(self, outcome: Outcome) -> tuple[Path | None, str | None]:
        """Snapshot every vCPU and guest RAM into a core; (path, None) or (None, why not)."""
        if self.config.crash_dir is None:
            return None, None
        self.drain_coalesced()
        from .capture import apply_trap_frame, guest_crash_info, vcpu_state
        from .crash.core import CoreWriteError, write_core
        from .crash.snapshot import CrashSnapshot

        try:
            states = [vcpu_state(v) for v in self.vcpus]
            frame = outcome.details.get("frame")
            crashing = outcome.vcpu if outcome.vcpu is not None else 0
            if frame is not None:
                apply_trap_frame(states[crashing], frame)
            cfg = self.config
            snap = CrashSnapshot(
                trigger=outcome.trigger or outcome.kind, reason=outcome.message, vcpus=states,
                crashing_vcpu=crashing, memory=self.memory,
                vector=outcome.details.get("vector"), error_code=outcome.details.get("error_code"),
                exit_reason=outcome.details.get("exit_reason"), serial_tail=self.serial.output_tail(),
                config={"kernel": str(cfg.kernel), "mem": cfg.mem, "cpus": cfg.cpus, "cmdline": cfg.cmdline,
                        "irqchip": cfg.irqchip, "protocol": self.plan.image.protocol if self.plan else None,
                        "pvpanic_events": list(self.pvpanic.events)},
                crash_info=guest_crash_info(self.memory, self.plan))
            path = write_core(snap, cfg.crash_dir)
        except CoreWriteError as e:
            return None, str(e)
        except KvmError as e:
            return None, f"cannot read vCPU state: {e}"
        return path, None

    def _finish(self, outcome: Outcome) -> bool:
        """Record the first outcome only; later ones (other vCPUs stopping) are dropped."""
        with self._outcome_lock:
            if self.outcome is not None:
                return False
            self.outcome = outcome
        self.stopping = True
        self._done.set()
        self._wake.set()
        return True

    # ---------------------------------------------------------------- device windows and coalesced MMIO
    def _window_hook(self, dev, live: bool) -> None:
        """DeviceManager.window_hook: make KVM match `dev`'s windows and coalesced registers.

        live: map each "backed" window as a read-only memslot over its image (so reads cost no exit)
        and unmap "trapped" ones (every access exits to the model); register the device's coalesced
        zones. Not live (the device is leaving D0): apply what is queued, drop the zones, unmap all.
        """
        if self.vm is None:
            return
        if not live:
            self.drain_coalesced(strict=False)
        with self._win_lock:
            if live and dev.windows and not self._readonly_mem and not self._warned_ro:
                self._warned_ro = True
                print("pykvm: warning: this KVM lacks KVM_CAP_READONLY_MEM: memory-backed device windows "
                      "fall back to trapped mode (every read exits)", file=sys.stderr)
            for w in dev.windows:
                self._sync_window(dev, w, live)
            dropped = self._sync_zones(dev, live)
        if dropped:
            self.drain_coalesced(strict=False)  # writes queued while the zones were being dropped
            with self._win_lock:
                self._zone_list = [z for _d, zs in self._zones.values() for z in zs]

    def _sync_window(self, dev, w, live: bool) -> None:
        key = id(w)
        cur = self._win_slots.get(key)
        if live:
            pending = self.pending_images.pop((dev.name, w.name), None)
            if pending is not None:
                memwindow.load_image(w, pending)
        want = live and w.mode == "backed" and self._readonly_mem
        if want and cur is None:
            region = memwindow.ensure_image(w)
            used = {slot for slot, *_ in self._win_slots.values()}
            slot = next(n for n in range(WINDOW_SLOT_BASE, WINDOW_SLOT_BASE + len(used) + 1) if n not in used)
            try:
                self.vm.set_user_memory_region(slot, w.gpa, w.size, region.host_addr, C.KVM_MEM_READONLY)
            except KvmError as e:
                print(f"pykvm: warning: {dev.name}: cannot map window {w.name} at {w.gpa:#x}: {e}; "
                      "its reads exit instead", file=sys.stderr)
                return
            self._win_slots[key] = (slot, w, dev.name)
        elif not want and cur is not None:
            del self._win_slots[key]
            self.vm.set_user_memory_region(cur[0], w.gpa, 0, 0)

    def _sync_zones(self, dev, live: bool) -> bool:
        """Register or unregister dev's coalesced zones; True when some were dropped (drain again)."""
        key = id(dev)
        cur = self._zones.get(key, (dev, []))[1]
        want = []
        if live and self._ring_page and self.vcpus:
            ring_end = (self._ring_page + 1) * 4096
            if len(self.vcpus[0].run_mmap) >= ring_end:
                for gpa, length in getattr(dev, "coalesced", ()):
                    if 1 <= length <= 8 and any(b <= gpa and gpa + length <= b + n for b, n in dev.mmio):
                        want.append((gpa, length))
        for gpa, length in cur:
            if (gpa, length) not in want:
                self.vm.unregister_coalesced_mmio(gpa, length)
        for gpa, length in list(want):
            if (gpa, length) not in cur:
                try:
                    self.vm.register_coalesced_mmio(gpa, length)
                except KvmError as e:  # e.g. out of zones: the writes simply exit
                    want.remove((gpa, length))
                    print(f"pykvm: warning: {dev.name}: cannot coalesce writes at {gpa:#x}: {e}", file=sys.stderr)
        if want:
            self._zones[key] = (dev, want)
        else:
            self._zones.pop(key, None)
        dropped = any(z not in want for z in cur)
        if not dropped:
            self._zone_list = [z for _d, zs in self._zones.values() for z in zs]
        if self._zone_list and self._drainer is None:
            self._drainer = threading.Thread(target=self._drain_loop, name="coalesced-drain", daemon=True)
            self._drainer.start()
        return dropped

    def window_info(self) -> list[dict]:
        """Mapped windows (memslot numbers) and coalesced zones, for stats and tests."""
        with self._win_lock:
            out = [{"device": name, "window": w.name, "gpa": w.gpa, "size": w.size, "slot": slot}
                   for slot, w, name in sorted(self._win_slots.values(), key=lambda e: e[0])]
            out += [{"device": d.name, "coalesced": gpa, "size": n} for d, zs in self._zones.values() for gpa, n in zs]
        return out

    def drain_coalesced(self, on_vcpu: bool = False, strict: bool = True) -> int:
        """Apply the writes KVM queued in the coalesced-MMIO ring, in order; returns how many.

        Called before any slow exit is handled, when all vCPUs are paused (save, dump), when a
        device with coalesced registers leaves D0, and every COALESCED_DRAIN_PERIOD from a thread.
        """
        if not self._zone_list or not self.vcpus or not self._ring_page:
            return 0
        mm = self.vcpus[0].run_mmap
        if mm.closed:
            return 0
        with self._ring_lock:
            return memwindow.drain_ring(mm, self._ring_page * 4096, self._zone_list,
                                        self._appliers[on_vcpu, strict],
                                        self.ring_stats)

    def _apply_coalesced(self, addr: int, length: int, value: int, on_vcpu: bool, strict: bool) -> None:
        try:
            self.devices.mmio_access(addr, length, True, value)
        except VmEvent as ev:
            if on_vcpu:
                raise  # handled by the vCPU loop with this vCPU's context
            self._handle_event(None, ev)
        except Exception as e:
            hit = self.devices.mmio_lookup(addr)
            dev = hit[0] if hit else None
            why = f"{type(e).__name__}: {e}"
            if not strict:  # the device is leaving D0 already
                print(f"pykvm: {dev.name if dev else 'device'}: coalesced write at {addr:#x} failed: {why}",
                      file=sys.stderr)
            elif dev is None or not self.supervisor.report_failure(dev, why):
                self._finish(Outcome(errors.EXIT_VMM_ERROR, "vmm-error",
                                     f"internal error applying a coalesced write at {addr:#x}"
                                     f"{' to ' + dev.name if dev else ''}: {why}", trigger="vmm-error"))

    def _drain_loop(self) -> None:
        while not self._done.wait(COALESCED_DRAIN_PERIOD) and self.vm is not None:
            if self.vcpus:
                try:
                    self.drain_coalesced()
                except Exception as e:  # never let the drainer die silently
                    self._finish(Outcome(errors.EXIT_VMM_ERROR, "vmm-error",
                                         f"internal error draining coalesced MMIO: {type(e).__name__}: {e}",
                                         trigger="vmm-error"))
                    return

    # ---------------------------------------------------------------- vCPU loop
    def _vcpu_thread(self, vcpu) -> None:
        try:
            self._vcpu_loop(vcpu)
        except Exception as e:  # a VMM or device-model bug: report it as such, never hang
            import traceback

            self._finish(Outcome(errors.EXIT_VMM_ERROR, "vmm-error",
                                 f"internal error on vCPU {vcpu.index}: {type(e).__name__}: {e}",
                                 vcpu=vcpu.index, trigger="vmm-error",
                                 details={"traceback": traceback.format_exc()}))

    def _vcpu_loop(self, vcpu) -> None:
        while not self.stopping:
            try:
                self._run_fast(vcpu)
            except VmEvent as ev:
                self._handle_event(vcpu, ev)
            except DeviceHung:
                self._complete_failed_access(vcpu)  # the supervisor already took the device out
            except Exception as e:
                dev = self._device_of_exit(vcpu)
                if dev is None or not self.supervisor.report_failure(dev, f"{type(e).__name__}: {e}"):
                    raise
                self._complete_failed_access(vcpu)

    def _device_of_exit(self, vcpu):
        """The device the vCPU's current I/O exit is addressed to, or None."""
        mm = vcpu.run_mmap
        reason, _d, _s, port, _c, _o = _exit_hdr.unpack_from(mm, 8)
        if reason == C.KVM_EXIT_IO:
            ent = self.devices.port_map.get(port)
            return ent[0] if ent else None
        if reason == C.KVM_EXIT_MMIO:
            hit = self.devices.mmio_lookup(_mmio_hdr.unpack_from(mm, 32)[0])
            return hit[0] if hit else None
        return None

    def _complete_failed_access(self, vcpu) -> None:
        """Answer the access that hit a failing model like an absent device: reads get all ones."""
        mm = vcpu.run_mmap
        reason, direction, size, _port, count, off = _exit_hdr.unpack_from(mm, 8)
        if reason == C.KVM_EXIT_IO and not direction and size in (1, 2, 4) and off + size * count <= len(mm):
            mm[off:off + size * count] = b"\xff" * (size * count)
        elif reason == C.KVM_EXIT_MMIO and not _mmio_hdr.unpack_from(mm, 32)[3]:
            mm[40:48] = b"\xff" * 8


    def _run_fast(self, vcpu) -> None:
        """The hot loop: single port I/O to a D0 device is handled inline, all else goes slow."""
        run = vcpu.run
        mm = vcpu.run_mmap
        header = _exit_hdr.unpack_from
        unpack = _UNPACK
        pack = _PACK
        masks = _MASK
        reads = self.devices.live_port_reads
        writes = self.devices.live_port_writes
        EXIT_IO = C.KVM_EXIT_IO
        while True:
            if run():
                if self.stopping:  # EINTR/EAGAIN from a kick
                    return
                if self._pausing:
                    self._park(vcpu)
                continue
            reason, direction, size, port, count, off = header(mm, 8)
            if reason == EXIT_IO and count == 1:
                if direction:
                    h = writes.get(port)
                    if h is not None:
                        h[0](port - h[1], size, unpack[size](mm, off)[0])
                        continue
                else:
                    h = reads.get(port)
                    if h is not None:
                        pack[size](mm, off, h[0](port - h[1], size) & masks[size])
                        continue
            self._exit_slow(vcpu, mm, reason)

    def _exit_slow(self, vcpu, mm, reason: int) -> None:
        """Exits the hot loop does not take: string, unclaimed or inactive I/O, MMIO, and the rest."""
        counts = self.exit_counts[vcpu.index]
        counts[reason] = counts.get(reason, 0) + 1
        if self._zone_list:
            self.drain_coalesced(on_vcpu=True)  # writes queued before this exit happened before it
        if reason == C.KVM_EXIT_IO:
            direction, size, port, count, off = _io_hdr.unpack_from(mm, 32)
            self._io_slow(mm, direction, size, port, count, off)
        elif reason == C.KVM_EXIT_MMIO:
            addr, data, length, is_write = _mmio_hdr.unpack_from(mm, 32)
            self._mmio(mm, addr, data, length, is_write)
        else:
            self._other_exit(vcpu, reason)

    def _io_slow(self, mm, direction, size, port, count, off) -> None:
        """Port I/O through the device manager, one element at a time (string I/O has count > 1)."""
        if size not in (1, 2, 4) or count > 4096 or off + size * count > len(mm):
            raise GuestCrash("internal-error", f"KVM reported malformed port I/O (port {port:#x} size {size} count {count})")
        s = _SIZED[size]
        access = self.devices.port_access
        for i in range(count):
            at = off + i * size
            if direction:
                access(port, size, True, s.unpack_from(mm, at)[0])
            else:
                s.pack_into(mm, at, access(port, size, False))

    def _mmio(self, mm, addr, data, length, is_write) -> None:
        if length not in _SIZED:
            raise GuestCrash("internal-error", f"KVM reported an MMIO access of {length} bytes at {addr:#x}")
        s = _SIZED[length]
        if is_write:
            self.devices.mmio_access(addr, length, True, s.unpack_from(data)[0])
        else:
            buf = bytearray(8)
            s.pack_into(buf, 0, self.devices.mmio_access(addr, length, False))
            mm[40:48] = buf

    def _other_exit(self, vcpu, reason: int) -> None:
        """Every exit reason besides port and MMIO I/O."""
        run = vcpu.run_ptr
        if reason == C.KVM_EXIT_HLT:
            time.sleep(0.001)  # only without an in-kernel LAPIC, which pykvm always creates
        elif reason in (C.KVM_EXIT_INTR, C.KVM_EXIT_IRQ_WINDOW_OPEN, C.KVM_EXIT_IOAPIC_EOI):
            pass
        elif reason == C.KVM_EXIT_SHUTDOWN:
            self._crash(vcpu, "triple-fault", "triple fault (KVM_EXIT_SHUTDOWN): the guest faulted while "
                        "handling a fault, with no usable IDT or stack")
        elif reason == C.KVM_EXIT_FAIL_ENTRY:
            why = run.fail_entry.hardware_entry_failure_reason
            self._crash(vcpu, "fail-entry", f"VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {why:#x}): "
                        "the guest's CPU state is invalid")
        elif reason == C.KVM_EXIT_INTERNAL_ERROR:
            sub = run.internal.suberror
            name = C.INTERNAL_ERROR_NAMES.get(sub, f"suberror {sub}")
            hint = (" — this host's KVM could not emulate the instruction (nested or software-assisted "
                    "KVM cannot emulate e.g. int3, movbe, xrstor, lock cmpxchg16b)"
                    if sub == C.KVM_INTERNAL_ERROR_EMULATION else "")
            self._crash(vcpu, "internal-error", f"KVM internal error ({name}){hint}")
        elif reason == C.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == C.KVM_SYSTEM_EVENT_CRASH:
                self._crash(vcpu, "system-event-crash", "the host reported a guest crash (KVM_SYSTEM_EVENT_CRASH)")
            elif kind == C.KVM_SYSTEM_EVENT_RESET:
                self._finish(Outcome(errors.EXIT_OK, "reset", "guest requested a reset; pykvm stops instead of rebooting",
                                     vcpu=vcpu.index))
            else:
                self._finish(Outcome(errors.EXIT_OK, "poweroff", "guest powered off", vcpu=vcpu.index))
        else:
            name = C.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
            self._crash(vcpu, "unhandled-exit", f"unhandled exit {name} ({reason})")

    # ---------------------------------------------------------------- events and crashes
    def _handle_event(self, vcpu, ev: VmEvent) -> None:
        """A device's VmEvent; vcpu is None for one raised off the vCPU threads (a drained coalesced write)."""
        self.serial.flush()
        if isinstance(ev, GuestExit):
            kind = "poweroff" if ev.how == "power-off" else "exit"
            self._finish(Outcome(ev.status, kind, f"guest exited: {ev.how}", vcpu=vcpu.index if vcpu else None))
        elif vcpu is None:  # no vCPU context to read RIP from
            trigger = ev.trigger if isinstance(ev, GuestCrash) else "strict-io"
            self._finish(Outcome(errors.EXIT_GUEST_CRASH, "crash", f"guest crashed: {ev}", trigger=trigger))
        elif isinstance(ev, FirmwareTrap):
            self._firmware_trap(vcpu)
        elif isinstance(ev, GuestCrash):
            self._crash(vcpu, ev.trigger, ev.reason)
        else:  # StrictIoViolation and any other policy stop
            self._crash(vcpu, "strict-io", str(ev))

    def _rip_text(self, vcpu) -> str:
        try:
            regs = vcpu.get_regs()
            sregs = vcpu.get_sregs()
            rip = regs.rip
            text = f"RIP {rip:#x}"
            code = self._code_bytes(vcpu, sregs.cs.base + rip)
            if code:
                text += f" (bytes {code.hex(' ')})"
            return text
        except KvmError:
            return "RIP unavailable"

    def _code_bytes(self, vcpu, linear: int, n: int = 16) -> bytes:
        """Up to n instruction bytes at a linear address, via the vCPU's own translation; b'' if unmapped."""
        try:
            phys, valid, _w = vcpu.translate(linear)
        except KvmError:
            return b""
        if not valid:
            return b""
        r = self.memory.region_of(phys)
        if r is None:
            return b""
        return self.memory.read(phys, min(n, r.end - phys))

    def _crash(self, vcpu, trigger: str, reason: str, **details) -> None:
        details.setdefault("exit_reason", C.EXIT_REASON_NAMES.get(vcpu.run_ptr.exit_reason))
        where = self._rip_text(vcpu)
        self._finish(Outcome(errors.EXIT_GUEST_CRASH, "crash", f"guest crashed on vCPU {vcpu.index}: {reason}; {where}",
                             vcpu=vcpu.index, trigger=trigger, details=details))

    def _firmware_trap(self, vcpu) -> None:
        """Read the stub's trap frame and report the exception at the faulting instruction."""
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
        long_mode = bool(sregs.efer & EFER_LMA)
        size = trapframe.frame_size(long_mode)
        rsp = regs.rsp if long_mode else regs.rsp & 0xFFFFFFFF
        try:
            phys, valid, _w = vcpu.translate(sregs.ss.base + rsp)
            raw = self.memory.read(phys, size) if valid else None
        except (KvmError, GuestMemoryError):
            raw = None
        if raw is None:
            self._crash(vcpu, "exception", f"firmware stub reported an exception but its trap frame at "
                        f"RSP {rsp:#x} is unreadable")
            return
        frame = trapframe.parse(raw, long_mode, rsp)
        vec, err = frame["vector"], frame["error_code"]
        name = trapframe.exception_name(vec)
        text = f"exception {name} (vector {vec}, error code {err:#x}) at RIP {frame['rip']:#x}"
        if vec == 14:
            text += f", CR2 {sregs.cr2:#x}"
        code = self._code_bytes(vcpu, frame["rip"] + (sregs.cs.base if not long_mode else 0))
        if code:
            text += f" (bytes {code.hex(' ')})"
        self._finish(Outcome(errors.EXIT_GUEST_CRASH, "crash", f"guest crashed on vCPU {vcpu.index}: {text}",
                             vcpu=vcpu.index, trigger="exception",
                             details={"vector": vec, "error_code": err, "frame": frame, "cr2": sregs.cr2}))

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        """Release vCPUs, the VM, guest memory and /dev/kvm."""
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
