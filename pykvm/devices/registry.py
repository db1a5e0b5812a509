"""Device types by name: what `--device NAME[,key=value...]`, hot-add and restore build.

The machine does not hard-wire models: it asks the registry for the default set and for each
device the user names. A type's factory receives a DeviceContext (what the machine lends a
model: guest memory, interrupt lines, run options) and the validated options; it never sees
the VM's file descriptors.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:                 # annotations only (they are strings here): importing typing costs every run
    from typing import Any, Callable

from .. import abi
from ..record import field, record
from .device import Device

PORT_MAX = 0xFFFF
ADDR_MAX = (1 << 52) - 1      # guest-physical addresses x86-64 can express


class DeviceSpecError(ValueError):
    """A device name or option the registry cannot accept."""


@record
class DeviceContext:
    """What the machine lends device factories."""

    memory: Any = None                         # GuestMemory (DMA-capable models only)
    # irq_line: the in-kernel irqchip with --irqchip full; the userspace IOAPIC's pins under split
    cpus: int = 1
    irq_line: Callable[[int, int], None] | None = None   # (line, level), only with the in-kernel PIC/IOAPIC
    serial_out: int | None = 1
    serial_in: int | None = None
    serial_unbuffered: bool = False            # write serial output byte by byte (the API's expect)
    exit_port: int = abi.PYKVM_PORT_DEBUG_EXIT
    on_pvpanic_crash_loaded: Callable[[int], None] | None = None
    # the hooks the machine wires between models; None where this machine has no such part
    irqchip: str = "split"                     # the machine's --irqchip: "split" or "full"
    msi: Callable[[int, int], None] | None = None          # (address, data): KVM_SIGNAL_MSI
    irq_msi: Callable[[int, int], None] | None = None      # the IOAPIC's MSIs, through interrupt remapping
    ioapic_route: Callable[[int, int, int], None] | None = None   # (pin, address, data): KVM's GSI route
    ioapic_level_sent: Callable[[], None] | None = None    # a level interrupt went out: the EOI watch looks
    extint_notify: Callable[[], None] | None = None        # the 8259 pair's output rose
    wake: Any = None                           # acpi_pm.WakeSignal shared by the RTC alarm and the PM block
    bus: Any = None                            # bus.host.BusHost with --bus or --disk
    pci: Any = None                            # pci.PciHost once built: PCI functions attach to it
    mmio_free: Callable[[int, int], bool] | None = None    # DeviceManager.mmio_free: whether a BAR may go there
    fuzz: Any = None                           # who acts on the fuzz port's calls (pykvm.fuzz, snapshot.point), set after build

    def pulse(self):
        """An edge-triggered interrupt callable (line) -> None, or None without an irqchip."""
        if self.irq_line is None:
            return None
        line_fn = self.irq_line
        return lambda line: (line_fn(line, 1), line_fn(line, 0))


def _port(v: int) -> int:
    if not 0 <= v <= PORT_MAX:
        raise DeviceSpecError(f"{v:#x} is not an I/O port (0..0xffff)")
    return v


def _addr(v: int) -> int:
    if not 0 <= v <= ADDR_MAX:
        raise DeviceSpecError(f"{v:#x} is not a guest-physical address")
    return v


def _name(v: str) -> str:
    if not v or len(v) > 32 or not all(c.isalnum() or c in "-_." for c in v):
        raise DeviceSpecError(f"{v!r} is not a device name (1-32 letters, digits, '-', '_', '.')")
    return v


def _text(v: str) -> str:
    if len(v) > 64 or not v.isprintable():
        raise DeviceSpecError("expected at most 64 printable characters")
    return v


def _seconds(v: float) -> float:
    if not 0 < v <= 3600:
        raise DeviceSpecError(f"{v} is not a duration in seconds (0 < s <= 3600)")
    return v


def _switch(v: str) -> bool:
    if v not in ("on", "off"):
        raise DeviceSpecError(f"{v!r} is not on or off")
    return v == "on"


# option kinds: (python type the value must become, range/format check)
KINDS: dict[str, tuple[type, Callable]] = {
    "port": (int, _port), "addr": (int, _addr), "name": (str, _name), "seconds": (float, _seconds),
    "text": (str, _text), "switch": (str, _switch),
}


def parse_option(kind: str, raw) -> Any:
    """One option value from text (command line) or JSON (control channel), typed and range-checked."""
    typ, check = KINDS[kind]
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise DeviceSpecError(f"expected a {typ.__name__}, got {type(raw).__name__}")
    if typ is int:
        if isinstance(raw, float):
            raise DeviceSpecError(f"expected an integer, got {raw!r}")
        if isinstance(raw, str):
            try:
                raw = int(raw.strip(), 0)
            except ValueError:
                raise DeviceSpecError(f"expected an integer (decimal or 0x...), got {raw!r}") from None
    elif typ is float:
        try:
            raw = float(raw)
        except ValueError:
            raise DeviceSpecError(f"expected a number, got {raw!r}") from None
    elif not isinstance(raw, str):
        raise DeviceSpecError(f"expected text, got {raw!r}")
    return check(raw)


@record(frozen=True)
class DeviceType:
    """One buildable device type."""

    name: str
    summary: str
    cls: str                                   # "module:Class", as saved state files name it
    build: Callable[[DeviceContext, dict], Device]
    options: dict[str, str] = field(default_factory=dict)   # option -> kind (KINDS)
    default: bool = False                      # part of every VM
    hotplug: bool = False                      # the host may add it while the guest runs
    needs_irq: bool = False                    # raises ISA IRQs: under the split irqchip this brings the IOAPIC
    pci: bool = False                          # sits on the PCI host (brought in with the first such device)

    def make(self, ctx: DeviceContext, raw_options: dict) -> Device:
        """Validate raw options and build an instance."""
        opts = {}
        for key, raw in raw_options.items():
            kind = self.options.get(key)
            if kind is None:
                known = ", ".join(sorted(self.options)) or "none"
                raise DeviceSpecError(f"device {self.name}: unknown option {key!r} (options: {known})")
            try:
                opts[key] = parse_option(kind, raw)
            except DeviceSpecError as e:
                raise DeviceSpecError(f"device {self.name}: option {key}: {e}") from None
        return self.build(ctx, opts)


def _import(spec: str):
    import importlib

    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def _simple(spec: str, **fixed):
    return lambda ctx, opts: _import(spec)(**fixed, **opts)


TYPES: dict[str, DeviceType] = {t.name: t for t in [
    DeviceType("serial", "16550 UART (COM1, 0x3f8)", "pykvm.devices.serial:Serial16550",
               lambda ctx, o: _import("pykvm.devices.serial:Serial16550")(
                   out_fd=ctx.serial_out, in_fd=ctx.serial_in, unbuffered=ctx.serial_unbuffered,
                   irq=(lambda level: ctx.irq_line(4, level)) if ctx.irq_line else None),
               default=True),
    DeviceType("debug-exit", "isa-debug-exit: the guest ends the run with a status",
               "pykvm.devices.simple:DebugExit",
               lambda ctx, o: _import("pykvm.devices.simple:DebugExit")(port=ctx.exit_port), default=True),
    DeviceType("pvpanic", "pvpanic (0x505): the guest reports a panic", "pykvm.devices.simple:PvPanic",
               lambda ctx, o: _import("pykvm.devices.simple:PvPanic")(on_crash_loaded=ctx.on_pvpanic_crash_loaded),
               default=True),
    DeviceType("poweroff", "ACPI-style power-off port (0x604)", "pykvm.devices.simple:PowerOff",
               _simple("pykvm.devices.simple:PowerOff"), default=True),
    DeviceType("fw-cfg", "QEMU fw_cfg: RAM size and vCPU count", "pykvm.devices.fwcfg:FwCfg",
               lambda ctx, o: _import("pykvm.devices.fwcfg:FwCfg")(ctx.memory.size, ctx.memory.top, ctx.cpus),
               default=True),
    DeviceType("firmware-trap", "where the exception stubs report a guest fault",
               "pykvm.devices.simple:FirmwareTrapPort", _simple("pykvm.devices.simple:FirmwareTrapPort"),
               default=True),
    DeviceType("post-code", "POST code port 0x80 (keeps the last byte)", "pykvm.devices.simple:PostCode",
               _simple("pykvm.devices.simple:PostCode"), {"port": "port"}, default=False),
    DeviceType("power-control", "guest-requested device power changes (D0/D3)", "pykvm.devices.power:PowerControl",
               _simple("pykvm.devices.power:PowerControl"), default=False),
    DeviceType("i8042", "i8042 keyboard controller (0x60/0x64): status, self-tests, reset through 0xfe "
               "(added by --display text)", "pykvm.devices.i8042:I8042", _simple("pykvm.devices.i8042:I8042")),
    DeviceType("vga", "VGA CRTC ports (0x3d4/0x3d5): the text screen's cursor (added by --display text)",
               "pykvm.devices.vga:VgaCrtc", _simple("pykvm.devices.vga:VgaCrtc")),
    DeviceType("mailbox", "256 supervised 32-bit slots (recovery demonstration)", "pykvm.devices.mailbox:Mailbox",
               _simple("pykvm.devices.mailbox:Mailbox"),
               {"base": "port", "name": "name", "hang_seconds": "seconds"}, default=False, hotplug=True),
    DeviceType("identity", "memory-backed identity/status windows (no exit per read)",
               "pykvm.devices.identity:Identity", _simple("pykvm.devices.identity:Identity"),
               {"base": "addr", "name": "name", "serial": "text"}, default=False, hotplug=True),
    DeviceType("bus", "partition bus connect registers (added with --bus or --disk)", "pykvm.devices.busctl:BusControl",
               lambda ctx, o: _import("pykvm.devices.busctl:BusControl")(bus=ctx.bus)),
    DeviceType("echo-port", "trapped echo device (the bus benchmark's reference)", "pykvm.devices.echoport:EchoPort",
               _simple("pykvm.devices.echoport:EchoPort"), {"base": "port"}),
    DeviceType("fuzz", "snapshot fuzzing port (0x5d0): the input buffer and snapshot/done/crash calls "
               "(added by pykvm fuzz)", "pykvm.devices.fuzzport:FuzzPort",
               lambda ctx, o: _import("pykvm.devices.fuzzport:FuzzPort")(ctx=ctx)),
    DeviceType("ioapic", "I/O APIC at 0xfec00000 for the split irqchip (added with any device that raises IRQs)",
               "pykvm.devices.ioapic:IoApic",
               lambda ctx, o: _import("pykvm.devices.ioapic:IoApic")(
                   deliver=ctx.irq_msi or ctx.msi, route=ctx.ioapic_route,
                   on_level_sent=ctx.ioapic_level_sent)),
    DeviceType("pic", "the PC's 8259A pair at 0x20 and 0xa0 (vectors 0x08/0x70) on the BSP's LINT0 (split irqchip)",
               "pykvm.devices.i8259:I8259",
               lambda ctx, o: _import("pykvm.devices.i8259:I8259")(notify=ctx.extint_notify)),
    DeviceType("pit", "8254 PIT at 0x40: counter 0 in modes 0, 2, 3 raises IRQ 0 (PIC IRQ 0, IOAPIC pin 2)",
               "pykvm.devices.i8254:Pit",
               lambda ctx, o: _import("pykvm.devices.i8254:Pit")(
                   irq=(lambda level: ctx.irq_line(0, level)) if ctx.irq_line else None), needs_irq=True),
    DeviceType("pc-testdev", "QEMU pc-testdev: 0xe0 latch, 0xe4 flush-page, IO RAM at 0xff000000",
               "pykvm.devices.testdev:PcTestdev", _simple("pykvm.devices.testdev:PcTestdev")),
    DeviceType("pc-testdev-irq", "QEMU pc-testdev IRQ lines: a write to 0x2000+n drives line n",
               "pykvm.devices.testdev:PcTestdevIrq",
               lambda ctx, o: _import("pykvm.devices.testdev:PcTestdevIrq")(irq_line=ctx.irq_line), needs_irq=True),
    DeviceType("acpi-pm", "ACPI PM1a event/control (S3, S5) and PM timer at 0x600 (replaces poweroff)",
               "pykvm.devices.acpi_pm:AcpiPm",
               lambda ctx, o: _import("pykvm.devices.acpi_pm:AcpiPm")(
                   sci=(lambda level: ctx.irq_line(9, level)) if ctx.irq_line else None,
                   wake=ctx.wake), needs_irq=True),
    DeviceType("rtc", "MC146818 CMOS RTC at 0x70 (alarm, periodic and update interrupts on IRQ 8)",
               "pykvm.devices.rtc:CmosRtc",
               lambda ctx, o: _import("pykvm.devices.rtc:CmosRtc")(
                   irq=(lambda level: ctx.irq_line(8, level)) if ctx.irq_line else None,
                   on_alarm=ctx.wake.rtc_alarm if ctx.wake is not None else None), needs_irq=True),
    DeviceType("pci-host", "PCI configuration mechanism #1 (0xcf8/0xcfc), bus 0, q35 host bridge at 00:00.0 "
               "(added with any PCI device)", "pykvm.devices.pci:PciHost",
               lambda ctx, o: _import("pykvm.devices.pci:PciHost")(
                   irq_line=ctx.irq_line, msi=ctx.msi, memory=ctx.memory)),
    DeviceType("edu", "QEMU's edu PCI device (1234:11e8): DMA through the IOMMU, MSI or INTx",
               "pykvm.devices.edu:Edu", lambda ctx, o: _pci_function(ctx, _import("pykvm.devices.edu:Edu")()),
               needs_irq=True, pci=True),
    DeviceType("intel-iommu", "Intel VT-d IOMMU at 0xfed90000: DMA and interrupt remapping, queued invalidation",
               "pykvm.devices.intel_iommu:IntelIommu",
               lambda ctx, o: _iommu(ctx, o), {"intremap": "switch", "eim": "switch"}, pci=True),
    DeviceType("dma", "a DMA engine bounded by the access policy", "pykvm.devices.dma:Dma",
               lambda ctx, o: _import("pykvm.devices.dma:Dma")(memory=ctx.memory, irq=ctx.pulse(), **o),
               {"base": "port"}, default=False),
]}


def _pci_function(ctx: DeviceContext, fn):
    host = ctx.pci
    if host is None:
        raise DeviceSpecError(f"device {fn.name}: no PCI host (the machine adds pci-host with a PCI device)")
    placed = ctx.mmio_free
    host.attach(fn, placed)
    return fn


def _iommu(ctx: DeviceContext, opts: dict):
    host = ctx.pci
    if host is None:
        raise DeviceSpecError("device intel-iommu: no PCI host (the machine adds pci-host with it)")
    if host.iommu is not None:
        raise DeviceSpecError("device intel-iommu: only one IOMMU per machine")
    if opts.get("eim"):
        raise DeviceSpecError("device intel-iommu: eim=on (x2APIC interrupt remapping) is not offered")
    if opts.get("intremap", True) and ctx.irqchip == "full":
        raise DeviceSpecError("device intel-iommu: intremap=on needs the split irqchip (the in-kernel IOAPIC "
                              "cannot be remapped)")
    iommu = _import("pykvm.devices.intel_iommu:IntelIommu")(
        memory=ctx.memory, deliver=ctx.msi, intremap=opts.get("intremap", True))
    host.iommu = iommu
    return iommu


@record(frozen=True)
class Preset:
    """A machine preset (`--machine NAME`): device types added to the default set."""

    name: str
    summary: str
    devices: tuple = ()               # registry names, added before any --device
    in_kernel: tuple = ()             # of those, the ones `--irqchip full` already has in the kernel


# What `--machine` names. `pc` is what QEMU's `-M pc` gives that pykvm models and a PC kernel
# probes for: the 8259 pair, the 8254 PIT, the IOAPIC (Linux: "No IOAPIC entries present"
# without it), the CMOS RTC, the ACPI PM block (PM timer, S3/S5) and the i8042. Not in it:
# pc-testdev and pc-testdev-irq (test devices: kvm-unit-tests adds them to `-M pc` with
# `-device pc-testdev` too), pci-host (pykvm's is q35's host bridge, not the i440FX `-M pc`
# has; `--device pci-host` adds it) and vga (`--display text` brings it).
PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("minimal", "the default set only: what a tiny kernel needs (the default)"),
    Preset("pc", "a PC platform as a PC kernel probes it: 8259 PIC, 8254 PIT, IOAPIC, CMOS RTC, ACPI PM, i8042",
           ("ioapic", "pic", "pit", "rtc", "acpi-pm", "i8042"), in_kernel=("ioapic", "pic", "pit")),
]}
DEFAULT_PRESET = "minimal"


def preset_devices(name: str, irqchip: str = "split") -> list[tuple[str, dict]]:
    """The (name, options) a preset adds to the default set; DeviceSpecError names the known presets."""
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise DeviceSpecError(f"unknown machine {name!r} (known: {', '.join(PRESETS)})")
    skip = preset.in_kernel if irqchip == "full" else ()
    return [(d, {}) for d in preset.devices if d not in skip]


def with_preset(name: str, irqchip: str, devices: list) -> list[tuple[str, dict]]:
    """A preset's devices, then `devices`; a device named in both is built once, with `devices`' options."""
    named = {n for n, _o in devices}
    return [(n, o) for n, o in preset_devices(name, irqchip) if n not in named] + list(devices)


def describe_presets() -> list[str]:
    """One line per machine preset: name and the devices it adds to the default set."""
    lines = []
    for p in PRESETS.values():
        adds = " ".join(p.devices) or "-"
        lines.append(f"{p.name:14} {adds:38} {p.summary}")
    return lines


def lookup(name: str) -> DeviceType:
    """The type called `name`, or DeviceSpecError listing the known ones."""
    t = TYPES.get(name)
    if t is None:
        raise DeviceSpecError(f"unknown device {name!r} (known: {', '.join(sorted(TYPES))})")
    return t


def describe_types() -> list[str]:
    """One line per registered type: name, whether it is in the default set, options, summary."""
    lines = []
    for t in sorted(TYPES.values(), key=lambda t: (not t.default, t.name)):
        opts = ",".join(f"{k}=<{v}>" for k, v in t.options.items()) or "-"
        flags = "default" if t.default else ("by name, hot-pluggable" if t.hotplug else "by name")
        lines.append(f"{t.name:14} {flags:22} {opts:38} {t.summary}")
    return lines


def by_class(spec: str) -> DeviceType | None:
    """The type whose model class is `spec` ("module:Class"), for restoring saved devices."""
    return next((t for t in TYPES.values() if t.cls == spec), None)


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """`NAME[,key=value...]` (the --device syntax) as (name, raw options)."""
    if not isinstance(text, str) or len(text) > 1024 or not text.isprintable():
        raise DeviceSpecError("--device: expected NAME[,key=value...] of at most 1024 printable characters")
    name, *pairs = [p.strip() for p in text.split(",")]
    opts: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DeviceSpecError(f"--device {text!r}: expected NAME[,key=value...], got {pair!r}")
        if key in opts:
            raise DeviceSpecError(f"--device {text!r}: option {key!r} given twice")
        opts[key] = value
    lookup(name)
    return name, opts
