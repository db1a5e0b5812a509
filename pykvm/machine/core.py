"""One partition: builds a VM from a MachineConfig and runs it until the guest exits, crashes or times out.

The Machine owns the KVM objects and the run's lifetime; each job lives in its own module and
reaches the machine through the small public surface below (pause/resume, call, finish,
handle_event, stats, host_dump and the attributes documented in __init__).
"""

from __future__ import annotations

import os
import threading
import time

from .. import abi, errors, record
from ..boot import cpu as cpu_setup
from ..boot.firmware import load_firmware
from ..boot.image import load_image
from ..boot.loader import BootPlan, load
from ..kvm import Kvm
from ..kvm import constants as C
from ..memory import GuestMemory, GuestMemoryError
from . import device_set
from .bus_wiring import build_bus
from .config import MIN_MEMORY, MachineConfig
from .outcome import Outcome
from .dumps import Dumper
from .faults import Faults
from .numa import MachineNuma
from .pausing import Pauser, install_kick_handler
from .requests import MainThreadQueue
from .vcpu_loop import VcpuLoop
from .windows import WindowSync

TSS_ADDR = 0xFFFBD000          # three pages KVM needs on Intel for real-mode emulation
IDENTITY_MAP_ADDR = 0xFFFBC000


# KVM keeps per-page metadata for every memslot in host kernel memory (the reverse maps and
# large-page bookkeeping: about 8 bytes per 4 KiB guest page), allocated when the slot is
# registered, touched or not. A sparse guest far larger than the host would make the kernel
# allocate that up front and can drive the host out of memory.
KVM_BYTES_PER_GUEST_PAGE = 8


def _check_host_can_track(mem: int) -> None:
    """Refuse guest RAM whose KVM page metadata would not fit half of the host's available memory."""
    need = mem // 4096 * KVM_BYTES_PER_GUEST_PAGE
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return   # no way to tell: let KVM decide
    if need > avail // 2:
        raise errors.MemorySizeError(
            f"--mem {mem >> 30} GiB: KVM would need about {need >> 20} MiB of host kernel memory to track its "
            f"pages, more than half of the {avail >> 20} MiB this host has available; use a smaller --mem")


class Machine:
    """One VM: build with a config, then run() until the guest exits, crashes or times out.

    Public state other layers read: config, kvm, vm, memory, vcpus, threads, devices, policy,
    supervisor, serial, pvpanic, plan, outcome, stopping, done (an Event), exit_counts, hot_io_exits,
    windows (WindowSync), requests (MainThreadQueue), debugger (a gdb stub, or None), bus, numa.
    """

    def __init__(self, config: MachineConfig, restore=None):
        self.config = config
        self._restore = restore          # a state.SavedState to resume instead of booting config.kernel
        self.kvm = self.vm = self.memory = None
        self.vcpus = []
        self.threads: list[threading.Thread] = []
        self.outcome: Outcome | None = None
        self._outcome_lock = threading.Lock()
        self.done = threading.Event()
        self.stopping = False
        self.exit_counts: list[dict[int, int]] = []   # per vCPU: exits the slow path handled, by reason
        self.hot_io_exits: list[list[int]] = []       # per vCPU: [port I/O exits the hot loop handled inline]
        self.plan = None
        # set by device_set.build_devices (a BuiltDevices the build unpacks here)
        self.devices = None              # devices.DeviceManager
        self.device_context = None       # registry.DeviceContext: hot-add and restore build devices with it
        self.policy = None               # devices.policy.PolicyAuthority
        self.supervisor = None           # devices.supervisor.Supervisor
        self.built: dict = {}            # registry name -> the first device of that type
        self.serial = self.pvpanic = None   # the models crash cores and fault handling report on
        self.bus = None                  # bus.host.BusHost when the config asks for a partition bus
        self.bus_final: dict | None = None
        self.debugger = None             # a gdbstub.GdbStub while one is attached
        self.numa = None                 # numa.MachineNuma with --numa-node / --numa
        self.windows = WindowSync(self)
        self.pauser = Pauser(self)
        self.requests = MainThreadQueue()
        self.faults = Faults(self)
        self.dumper = Dumper(self)
        self.loop = VcpuLoop(self)
        self.eoi_handler = None          # the userspace IOAPIC's eoi(vector) under the split irqchip
        self.extint = None               # the userspace 8259 pair (PicPair) whose output is the BSP's LINT0
        self.eoi_watch = None            # eoi_watch.EoiWatch beside the userspace IOAPIC
        self.reset_tracker = None        # snapshot.reset.Tracker once an in-memory snapshot was taken
        # fn(outcome) -> bool, asked before an outcome ends the run: True keeps the VM alive (a fuzz
        # driver takes a crash, writes its core and resets instead); called on the thread that saw it
        self.intercept = None
        try:
            self._build()
        except errors.PykvmError as e:
            self.close()
            if restore is not None and not isinstance(e, errors.BadStateError):
                # everything that describes the VM came from the file: a bad value is a bad file
                raise errors.BadStateError(f"state file {restore.path}: {e}") from None
            raise
        except BaseException:
            self.close()
            raise

    reserved_low = IDENTITY_MAP_ADDR                    # KVM's pages: identity map, then the TSS's three
    reserved_size = TSS_ADDR + 3 * 0x1000 - IDENTITY_MAP_ADDR

    # ---------------------------------------------------------------- build
    def _build(self) -> None:
        cfg = self.config
        if cfg.mem < MIN_MEMORY or cfg.mem % 4096:
            raise errors.MemorySizeError(
                f"memory size {cfg.mem} bytes: must be a multiple of 4096 and at least {MIN_MEMORY >> 20} MiB")
        if not 1 <= cfg.cpus <= 255:
            raise errors.UsageError(f"--cpus {cfg.cpus}: must be between 1 and 255")
        restoring = self._restore is not None
        from ..boot.cpumodel import parse_cpu

        cpu_model = parse_cpu(cfg.cpu)
        if not restoring:
            from ..startup.artifacts import firmware_path

            image = load_image(cfg.kernel, flat_addr=cfg.flat_addr, flat_bits=cfg.flat_bits)
            firmware = load_firmware(firmware_path())

        self.kvm = Kvm.open(os.environ.get("PYKVM_DEV_KVM", "/dev/kvm"))
        max_vcpus = self.kvm.check_extension(C.KVM_CAP_MAX_VCPUS) or self.kvm.check_extension(C.KVM_CAP_NR_VCPUS)
        if cfg.cpus > max_vcpus:
            raise errors.UsageError(f"--cpus {cfg.cpus}: this host's KVM allows at most {max_vcpus}")
        self.vm = self.kvm.create_vm()
        try:
            self.numa = MachineNuma.from_config(self)
        except errors.NumaSpecError as e:
            if restoring:                   # the topology came from the state file
                raise errors.BadStateError(f"state file: vNUMA configuration: {e}") from None
            raise
        _check_host_can_track(cfg.mem)
        try:
            if self.numa is not None:
                self.memory = self.numa.create_memory()
            else:
                self.memory = GuestMemory.create(cfg.mem, abi.PYKVM_MMIO_HOLE)
        except GuestMemoryError as e:
            raise errors.MemorySizeError(str(e)) from None
        except OSError as e:
            raise errors.MemorySizeError(f"cannot allocate {cfg.mem >> 20} MiB of guest memory: {e.strerror}") from None
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr)
            region.slot = slot
        self.windows.probe(self.vm)
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        if cfg.irqchip == "full":
            self.vm.create_irqchip()
            self.vm.create_pit2(C.KVM_PIT_SPEAKER_DUMMY)
        else:
            self.vm.enable_split_irqchip()

        self.bus = build_bus(self)
        parts = device_set.build_devices(self)
        self.devices, self.device_context, self.built = parts.devices, parts.context, parts.built
        self.policy, self.supervisor = parts.policy, parts.supervisor
        self.serial, self.pvpanic = parts.serial, parts.pvpanic
        self.eoi_watch, self.eoi_handler, self.extint = parts.eoi_watch, parts.eoi_handler, parts.extint
        supported = self.kvm.supported_cpuid()
        cpu_setup.check_model(supported, cpu_model)
        if not restoring:
            self.plan: BootPlan = load(self.memory, image, firmware, cfg.cpus, cmdline=cfg.cmdline,
                                       argv0=cfg.kernel_name or str(cfg.kernel), initrd=cfg.initrd,
                                       acpi_platform=device_set.acpi_platform(cfg.irqchip, self.built),
                                       phys_bits=cpu_setup.phys_addr_bits(supported),
                                       numa=self.numa.boot_arg() if self.numa is not None else None,
                                       cpu=cpu_setup.boot_features(supported, cpu_model))

        nx = cpu_setup.nx_supported(supported, cpu_model)
        from ..kvm.abi import ffi as kffi

        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid2(cpu_setup.cpuid_for_vcpu(supported, i, kffi, cpu_model))
        self.exit_counts = [dict() for _ in self.vcpus]
        self.hot_io_exits = [[0] for _ in self.vcpus]
        if restoring:
            self._restore.apply(self)     # the saved state (pykvm.snapshot) puts itself in
        else:
            cpu_setup.apply_entry(self.vcpus[0], self.plan.entry, nx)

    @property
    def identity(self):
        """The identity device, when the VM has one."""
        return self.built.get("identity")

    @property
    def dma(self):
        """The DMA engine, when the VM has one."""
        return self.built.get("dma")

    # ---------------------------------------------------------------- run
    def run(self) -> Outcome:
        """Start every vCPU thread and wait until one of them (or the timeout) ends the VM."""
        install_kick_handler()
        self.devices.start_all()
        self.supervisor.start()
        display = None
        if self.config.display == "text":
            from .display import TextDisplay

            display = TextDisplay(self)
            display.start()             # its thread exists before the sandbox: no clone() needed later
        if self.eoi_watch is not None:
            self.eoi_watch.start()      # likewise
        try:
            if self.config.sandbox:       # after set-up, before any guest code runs
                from .. import sandbox

                sandbox.install(self.config.crash_dir)
            for vcpu in self.vcpus:
                t = threading.Thread(target=self.loop.thread, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True)
                self.threads.append(t)
                t.start()
                self.supervisor.vcpu_threads[t.ident] = vcpu.index
            self._main_loop()
            self.requests.serve()  # answer callers still waiting, then refuse new ones
            self.pauser.stop_all()
            if self.debugger is not None:
                self.debugger.end(self.outcome)  # gdb sees a crash as SIGSEGV before its core is written
            if self.outcome.kind in ("crash", "timeout", "vmm-error"):
                core_file, core_error = self.dumper.write(self.outcome)
                self.outcome = record.replace(self.outcome, core_file=core_file, core_error=core_error)
        finally:
            if display is not None:
                display.stop()
            if self.eoi_watch is not None:
                self.eoi_watch.stop()
            self._close_bus()           # finishes the request in hand (a block write) first
            self.supervisor.stop()
            self.devices.stop_all()
        return self.outcome

    def _close_bus(self) -> None:
        bus = self.bus
        if bus is not None:
            self.bus = None
            bus.stop()                        # the bus thread finishes the requests in hand
            self.bus_final = bus.snapshot()   # what `stats` and tests can still read after the run
            bus.close()

    def _main_loop(self) -> None:
        deadline = None if self.config.timeout is None else time.monotonic() + self.config.timeout
        wake = self.requests.wake
        self.requests.main_ident = threading.get_ident()
        try:
            while not self.done.is_set():
                wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                wake.clear()
                self.requests.serve()
                if deadline is not None and time.monotonic() >= deadline and not self.done.is_set():
                    self.finish(Outcome(errors.EXIT_TIMEOUT, "timeout",
                                        f"guest still running after --timeout {self.config.timeout:g}s; stopped",
                                        trigger="timeout"))
                    break
        except KeyboardInterrupt:
            self.finish(Outcome(130, "interrupted", "interrupted by the user (Ctrl-C)"))
        finally:
            self.requests.main_ident = None
            self.requests.close()

    def finish(self, outcome: Outcome) -> bool:
        """Record the first outcome only (later ones, other vCPUs stopping, are dropped); True if it was first."""
        intercept = self.intercept
        if intercept is not None and intercept(outcome):
            return False
        with self._outcome_lock:
            if self.outcome is not None:
                return False
            self.outcome = outcome
        self.stopping = True
        self.done.set()
        self.requests.wake.set()
        return True

    # ---------------------------------------------------------------- the public surface other layers use
    def pause(self, timeout: float = 10.0) -> bool:
        """Get every running vCPU out of KVM_RUN and parked; True when all parked in time."""
        return self.pauser.pause(timeout)

    def resume(self) -> None:
        """Let parked vCPUs re-enter the guest."""
        self.pauser.resume()

    def call(self, fn, timeout: float = 60.0):
        """Run fn() on the thread that runs the machine (where pausing and dumping are safe)."""
        return self.requests.call(fn, timeout)

    def request_dump(self) -> None:
        """Ask for a core of the running guest without stopping it (safe from a signal handler)."""
        self.dumper.request()

    def host_dump(self):
        """Pause every vCPU, write a 'host-request' core, resume; (path, None) or (None, why not)."""
        return self.dumper.host_dump()

    def handle_event(self, vcpu, ev) -> None:
        """A device's VmEvent (vcpu None when raised off the vCPU threads)."""
        self.faults.handle_event(vcpu, ev)

    def drain_coalesced(self, on_vcpu: bool = False, strict: bool = True) -> int:
        """Apply queued coalesced MMIO writes now."""
        return self.windows.drain(on_vcpu, strict)

    def window_info(self) -> list[dict]:
        """Mapped windows and coalesced zones."""
        return self.windows.info()

    @property
    def ring_stats(self):
        """Counters of the coalesced-MMIO ring."""
        return self.windows.ring_stats

    @property
    def pending_images(self) -> dict:
        """Window images from a restore that are not mapped yet."""
        return self.windows.pending_images

    def exit_summary(self) -> list[dict[str, int]]:
        """Per vCPU, every exit so far by reason name (hot-loop port I/O included)."""
        out = []
        for slow, hot in zip(self.exit_counts, self.hot_io_exits):
            counts = dict(slow)   # a C-level copy: the vCPU thread may be adding a reason
            if hot[0]:
                counts[C.KVM_EXIT_IO] = counts.get(C.KVM_EXIT_IO, 0) + hot[0]
            out.append({C.EXIT_REASON_NAMES.get(r, str(r)): n for r, n in sorted(counts.items())})
        return out

    def stats(self) -> dict:
        """Counters for the control channel and the exit summary."""
        c = self.devices.counters()
        return {
            "exits": self.exit_summary(),
            "unclaimed": {f"{k} {a:#x} {rw}": n for (k, a, rw), n in c["unclaimed"].items()},
            "unclaimed_other": c["unclaimed_other"],
            "outside_d0": {f"{d} {rw}": n for (d, rw), n in c["outside_d0"].items()},
            "device_events": c["events"],
            "unclaimed_total": self.devices.unclaimed.summary(),
            "windows": self.windows.info(),
            "coalesced": self.windows.ring_stats.as_dict(),
            "bus": self.bus.snapshot() if self.bus is not None else None,
            "numa": self.numa.snapshot() if self.numa is not None else None,
        }

    # ---------------------------------------------------------------- teardown
    def close(self) -> None:
        """Release the bus, vCPUs, the VM, guest memory and /dev/kvm."""
        self._close_bus()
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.numa is not None:
            self.numa.close()
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
