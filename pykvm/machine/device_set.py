"""Builds a machine's devices from the registry: the default set plus the ones the config names."""

from __future__ import annotations

import sys
import threading

from .. import abi, errors
from ..devices import DeviceManager
from ..devices import registry
from ..devices.policy import PolicyAuthority
from ..devices.supervisor import Supervisor
from ..record import field, record
from .outcome import Outcome
from .eoi_watch import EoiWatch
from .pausing import kick

TYPE_CHECKING = False
if TYPE_CHECKING:                 # annotations only
    from typing import Any, Callable

IOAPIC_BASE = 0xFEC00000


@record
class BuiltDevices:
    """What build_devices made, for the machine to hold: the manager and the parts other jobs call."""

    devices: DeviceManager
    context: registry.DeviceContext        # hot-add and restore build further devices with it
    policy: PolicyAuthority
    supervisor: Supervisor
    built: dict = field(default_factory=dict)   # registry name -> the first device of that type (kept after stop)
    serial: Any = None                     # the 16550 (crash cores take its tail, faults flush it)
    pvpanic: Any = None                    # the pvpanic device (its events go into crash cores)
    eoi_watch: EoiWatch | None = None      # beside the userspace IOAPIC (split irqchip)
    eoi_handler: Callable[[int], None] | None = None   # the userspace IOAPIC's eoi(vector)
    extint: Any = None                     # the userspace 8259 pair whose output is the BSP's LINT0


def build_devices(machine) -> BuiltDevices:
    """The DeviceManager (with policy and supervisor) for `machine`'s config, and the parts the machine keeps."""
    m = machine
    cfg = m.config
    trace = (lambda msg: print(f"pykvm: io: {msg}", file=sys.stderr)) if cfg.trace_io else None
    policy = PolicyAuthority(cfg.trust)
    dm = DeviceManager(trace_io=trace, strict_io=cfg.strict_io, access_filter=policy)
    dm.window_hook = m.windows.hook
    for region in m.memory.regions:
        dm.reserve(region.gpa, region.size, f"guest RAM ({region.name})")
    dm.reserve(abi.PYKVM_LAPIC_BASE, 0x1000, "the local APIC page")
    if cfg.irqchip == "full":
        dm.reserve(IOAPIC_BASE, 0x1000, "the in-kernel IOAPIC")
    dm.reserve(m.reserved_low, m.reserved_size, "KVM's TSS and identity-map pages")
    vm = m.vm
    from ..devices.acpi_pm import WakeSignal

    ctx = registry.DeviceContext(
        memory=m.memory, cpus=cfg.cpus,
        irq_line=(lambda line, level: vm.irq_line(line, level)) if cfg.irqchip == "full" else None,
        serial_out=cfg.serial_out, serial_in=cfg.serial_in,
        serial_unbuffered=cfg.serial_unbuffered, exit_port=cfg.exit_port,
        on_pvpanic_crash_loaded=_pvpanic_crash_loaded, irqchip=cfg.irqchip,
        msi=lambda address, data: vm.signal_msi(address, data), wake=WakeSignal(), bus=m.bus)
    wanted = [(t.name, {}) for t in registry.TYPES.values() if t.default]
    wanted += [(name, dict(opts)) for name, opts in cfg.devices]
    if cfg.display == "text":      # a hobby kernel: its cursor, and the keyboard controller it polls
        for name in ("vga", "i8042"):
            if not any(n == name for n, _o in wanted):
                wanted.append((name, {}))
    names = {name for name, _o in wanted}
    if "acpi-pm" in names:            # its PM1a_CNT is the power-off port
        wanted = [(n, o) for n, o in wanted if n != "poweroff"]
    if any(registry.TYPES[n].pci for n, _o in wanted if n in registry.TYPES) and "pci-host" not in names:
        wanted.insert(0, ("pci-host", {}))     # a PCI device brings its bus
    out = BuiltDevices(devices=dm, context=ctx, policy=policy, supervisor=None)
    ioapic = _split_ioapic(m, ctx, wanted, out)
    if ioapic is not None:
        wanted = [(n, o) for n, o in wanted if n != "ioapic"]
    pic = _split_pic(m, ctx, wanted)
    if pic is not None:
        wanted = [(n, o) for n, o in wanted if n != "pic"]
        out.extint = pic.pair
    if m.bus is not None and not any(name == "bus" for name, _o in wanted):
        wanted.append(("bus", {}))
    built = out.built
    if ioapic is not None:
        built["ioapic"] = dm.add(ioapic)
    if pic is not None:
        built["pic"] = dm.add(pic)
        dm.add(pic.companion)
    try:
        host_opts = next((o for n, o in wanted if n == "pci-host"), None)
        if host_opts is not None:       # before the functions that attach to it
            wanted = [(n, o) for n, o in wanted if n != "pci-host"]
            ctx.pci = built["pci-host"] = dm.add(registry.lookup("pci-host").make(ctx, dict(host_opts)))
            ctx.mmio_free = dm.mmio_free
        for name, opts in wanted:
            dev = dm.add(registry.lookup(name).make(ctx, opts))
            built.setdefault(name, dev)
    except (registry.DeviceSpecError, ValueError) as e:
        raise errors.DeviceConfigError(f"--device: {e}") from None
    # the machine's own hooks into models it reports on (crash cores, serial flush, pvpanic events)
    out.serial = built["serial"]
    out.pvpanic = built["pvpanic"]
    policy.check(dm.devices)   # every description against its model's ranges, before anything runs
    out.supervisor = Supervisor(dm, intensity=cfg.restart_intensity, period=cfg.restart_period,
                                escalate=cfg.on_device_failure, on_escalate=lambda dev, msg: _failed_for_good(m, msg),
                                deadline=cfg.device_deadline)
    return out


def _split_ioapic(m, ctx, wanted, out: BuiltDevices):
    """Under the split irqchip, the userspace IOAPIC when asked for or when a device raises IRQs; it becomes ctx.irq_line."""
    if m.config.irqchip == "full" or not any(
            n == "ioapic" or registry.lookup(n).needs_irq for n, _o in wanted if n in registry.TYPES):
        return None
    vm = m.vm

    def iommu():
        host = ctx.pci
        return None if host is None else host.iommu

    def irq_msi(address, data):
        # the IOAPIC's interrupt requests go through interrupt remapping when there is an IOMMU
        unit = iommu()
        if unit is None:
            vm.signal_msi(address, data)
        else:
            unit.interrupt(address, data, None)

    def route(pin, address, data):
        # KVM's route for the pin must hold the vector the guest will EOI: the remapped one
        unit = iommu()
        if unit is not None:
            from ..devices.vtd_tables import VtdFault
            try:
                address, data = unit.remap(address, data, None)
            except VtdFault:
                pass               # not remappable yet (an IRTE the guest has still to write)
        vm.gsi_routing.add_msi(pin, address, data)

    ctx.irq_msi = irq_msi
    ctx.ioapic_route = route
    watch = EoiWatch(m)
    ctx.ioapic_level_sent = watch.notify
    opts = next((o for n, o in wanted if n == "ioapic"), {})
    try:
        ioapic = registry.lookup("ioapic").make(ctx, dict(opts))
    except (registry.DeviceSpecError, ValueError) as e:
        raise errors.DeviceConfigError(f"--device: {e}") from None
    watch.ioapic = ioapic
    out.eoi_watch = watch
    # ISA IRQ 0 (the PIT) is IOAPIC pin 2, as the MADT's override says and QEMU wires it; IRQ 2 is the
    # PIC cascade and reaches no pin
    ctx.irq_line = lambda line, level: ioapic.set_irq(2, level) if line == 0 else (
        None if line == 2 else ioapic.set_irq(line, level))
    out.eoi_handler = ioapic.eoi
    return ioapic


def _split_pic(m, ctx, wanted):
    """The userspace 8259 pair when asked for: ISA lines reach it as well as the IOAPIC, its output the BSP."""
    opts = next((o for n, o in wanted if n == "pic"), None)
    if opts is None:
        return None
    if m.config.irqchip == "full":
        raise errors.DeviceConfigError("--device pic: the in-kernel irqchip (--irqchip full) has its own PIC")

    def notify():
        # the pair's output rose: a BSP blocked in KVM_RUN (say, in HLT) must come out to take the vector
        threads = m.threads[:1]
        if threads and threads[0] is not threading.current_thread():
            kick(threads)

    ctx.extint_notify = notify
    try:
        pic = registry.lookup("pic").make(ctx, dict(opts))
    except (registry.DeviceSpecError, ValueError) as e:
        raise errors.DeviceConfigError(f"--device: {e}") from None
    ioapic_line = ctx.irq_line
    if ioapic_line is None:
        ctx.irq_line = pic.pair.set_irq
    else:
        ctx.irq_line = lambda line, level: (ioapic_line(line, level), pic.pair.set_irq(line, level))
    return pic


def acpi_platform(irqchip: str, built: dict):
    """The ACPI platform the built devices make: IOAPIC, PM1 blocks and timer, S3, CMOS RTC."""
    from .. import record

    from ..boot.acpi import InterruptOverride, platform_for_irqchip
    from ..boot.acpi.topology import POLARITY_HIGH, TRIGGER_LEVEL

    p = platform_for_irqchip(irqchip)
    changes = {}
    if "ioapic" in built and not p.ioapic:
        changes.update(ioapic=True, overrides=(InterruptOverride(0, 2),
                                               InterruptOverride(p.sci_irq, p.sci_irq, POLARITY_HIGH, TRIGGER_LEVEL)))
    pm = built.get("acpi-pm")
    if pm is not None:
        changes.update(pm1a_evt=pm.base, pm1a_cnt=pm.base + 4, pm_timer=pm.base + 8, s3="rtc" in built)
    if "rtc" in built:
        changes.update(cmos_rtc=True)
    if "pic" in built:             # MADT PCAT_COMPAT: kernels mask or use the 8259s only when it says so
        changes.update(pic=True)
    for flag in ("i8042", "vga"):    # FADT boot flags: Linux probes no i8042 the FADT says is absent
        if flag in built:
            changes[flag] = True
    return record.replace(p, **changes)


def _failed_for_good(machine, message: str) -> None:
    machine.finish(Outcome(errors.EXIT_GUEST_CRASH, "crash", message, trigger="device-failure"))


def _pvpanic_crash_loaded(value: int) -> None:
    print(f"pykvm: guest reported pvpanic 'crash loaded' (event {value:#x}); continuing", file=sys.stderr)
