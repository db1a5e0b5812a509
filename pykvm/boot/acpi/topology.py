"""What the ACPI tables describe: the vCPUs and NUMA nodes, and the platform's interrupt and PM wiring.

These are the inputs; they may come from users (vNUMA options) so `validate` checks every
field and raises UsageError with a one-line reason before any table is built.
"""

from __future__ import annotations

from ...errors import UsageError
from ...record import record

LOCAL_DISTANCE = 10          # SLIT: a node's distance to itself, by definition
REMOTE_DISTANCE = 20         # the default between two different nodes (what Linux assumes without a SLIT)
MAX_DISTANCE = 255           # 255 means "unreachable"; 0-9 are reserved
MAX_VCPUS = 255              # LAPIC entries carry an 8-bit processor UID and 0xff means "all"
MAX_NODES = 64
MAX_RANGES = 16              # memory ranges per node, plain and hot-pluggable each (all must fit the ACPI area)
X2APIC_ID_MAX = 0xFFFFFFFE   # 0xffffffff is the broadcast id
ADDRESS_LIMIT = 1 << 52      # x86-64 physical address width ceiling
PAGE = 4096

# MADT interrupt source override flags (MPS INTI flags)
POLARITY_CONFORMING, POLARITY_HIGH, POLARITY_LOW = 0, 1, 3
TRIGGER_CONFORMING, TRIGGER_EDGE, TRIGGER_LEVEL = 0, 1, 3

IOAPIC_ADDR = 0xFEC00000     # where KVM's in-kernel IOAPIC (and QEMU's) sits
DEFAULT_SCI_IRQ = 9
DEFAULT_PM1A_EVT = 0x600     # QEMU's PM block: the power-off port 0x604 is its PM1a_CNT
DEFAULT_PM1A_CNT = 0x604


@record(frozen=True)
class Node:
    """One proximity domain: its vCPUs (indexes) and guest-physical (base, length) ranges."""

    cpus: tuple[int, ...]
    memory: tuple[tuple[int, int], ...] = ()
    hotplug: tuple[tuple[int, int], ...] = ()   # reserved for hot-add: SRAT marks them hot-pluggable


@record(frozen=True)
class Topology:
    """The vCPUs (APIC id per vCPU index) and, with vNUMA, the nodes and their distance matrix."""

    apic_ids: tuple[int, ...]
    nodes: tuple[Node, ...] = ()
    distances: tuple[tuple[int, ...], ...] | None = None   # None: 10 on the diagonal, 20 elsewhere

    def distance_matrix(self) -> tuple[tuple[int, ...], ...]:
        """The SLIT matrix, filling in the default when none was given."""
        if self.distances is not None:
            return self.distances
        n = len(self.nodes)
        return tuple(tuple(LOCAL_DISTANCE if i == j else REMOTE_DISTANCE for j in range(n)) for i in range(n))


@record(frozen=True)
class InterruptOverride:
    """A MADT interrupt source override: ISA IRQ `source` arrives on `gsi` with these MPS flags."""

    source: int
    gsi: int
    polarity: int = POLARITY_CONFORMING
    trigger: int = TRIGGER_CONFORMING


@record(frozen=True)
class Platform:
    """Interrupt controllers, legacy devices and ACPI PM ports the tables advertise."""

    ioapic: bool = False
    ioapic_addr: int = IOAPIC_ADDR
    ioapic_id: int = 0
    pic: bool = False                  # dual 8259s present: MADT PCAT_COMPAT
    overrides: tuple[InterruptOverride, ...] = ()
    sci_irq: int = DEFAULT_SCI_IRQ
    pm1a_evt: int = DEFAULT_PM1A_EVT   # I/O port of the PM1a event block (4 bytes: status, enable)
    pm1a_cnt: int = DEFAULT_PM1A_CNT   # I/O port of PM1a control (2 bytes)
    pm_timer: int = 0                  # I/O port of the 32-bit PM timer; 0 = none
    s3: bool = False                   # advertise \_S3 (only once suspend/resume through the FACS works)
    i8042: bool = False                # IA-PC boot architecture flags
    vga: bool = False
    cmos_rtc: bool = False


def default_topology(nr_cpus: int) -> Topology:
    """What every guest gets without vNUMA: vCPU i has APIC id i and there are no nodes."""
    return Topology(apic_ids=tuple(range(nr_cpus)))


def platform_for_irqchip(irqchip: str) -> Platform:
    """The platform pykvm's --irqchip gives: "full" has KVM's IOAPIC and PICs, "split" only LAPICs."""
    if irqchip != "full":
        return Platform()
    # KVM's default routing sends IRQ 0 to IOAPIC pin 2 (as a PC does); the SCI is level, active high.
    return Platform(ioapic=True, pic=True,
                    overrides=(InterruptOverride(0, 2),
                               InterruptOverride(DEFAULT_SCI_IRQ, DEFAULT_SCI_IRQ, POLARITY_HIGH, TRIGGER_LEVEL)))


def _int(value, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise UsageError(f"ACPI topology: {what} is {value!r}; must be an integer in {lo:#x}..{hi:#x}")
    return value


def _ranges(spans, what: str) -> list[tuple[int, int]]:
    if not isinstance(spans, tuple) or len(spans) > MAX_RANGES:
        raise UsageError(f"ACPI topology: {what} must be a tuple of at most {MAX_RANGES} (base, length) pairs")
    out = []
    for i, span in enumerate(spans):
        if not isinstance(span, tuple) or len(span) != 2:
            raise UsageError(f"ACPI topology: {what}[{i}] is {span!r}, not a (base, length) pair")
        base = _int(span[0], f"{what}[{i}] base", 0, ADDRESS_LIMIT - PAGE)
        length = _int(span[1], f"{what}[{i}] length", PAGE, ADDRESS_LIMIT - base)
        if base % PAGE or length % PAGE:
            raise UsageError(f"ACPI topology: {what}[{i}] {base:#x}+{length:#x} is not page-aligned")
        out.append((base, length))
    return out


def validate(topo: Topology, platform: Platform) -> None:
    """Raise UsageError naming the first field that cannot be described in valid ACPI tables."""
    ids = topo.apic_ids
    if not isinstance(ids, tuple) or not 1 <= len(ids) <= MAX_VCPUS:
        raise UsageError(f"ACPI topology: need 1..{MAX_VCPUS} vCPUs as a tuple of APIC ids")
    for i, a in enumerate(ids):
        _int(a, f"APIC id of vCPU {i}", 0, X2APIC_ID_MAX)
    if len(set(ids)) != len(ids):
        raise UsageError("ACPI topology: two vCPUs share an APIC id")
    if not isinstance(topo.nodes, tuple) or len(topo.nodes) > MAX_NODES:
        raise UsageError(f"ACPI topology: at most {MAX_NODES} nodes, as a tuple")
    if topo.nodes:
        _validate_nodes(topo, len(ids))
    elif topo.distances is not None:
        raise UsageError("ACPI topology: a distance matrix needs nodes")
    _validate_platform(platform)


def _validate_nodes(topo: Topology, nr_cpus: int) -> None:
    owner: dict[int, int] = {}
    spans = []
    for n, node in enumerate(topo.nodes):
        if not isinstance(node, Node) or not isinstance(node.cpus, tuple):
            raise UsageError(f"ACPI topology: node {n} is not a Node with a tuple of vCPUs")
        for cpu in node.cpus:
            _int(cpu, f"node {n} vCPU", 0, nr_cpus - 1)
            if cpu in owner:
                raise UsageError(f"ACPI topology: vCPU {cpu} is in node {owner[cpu]} and node {n}")
            owner[cpu] = n
        spans += [(b, l, n) for b, l in _ranges(node.memory, f"node {n} memory")]
        spans += [(b, l, n) for b, l in _ranges(node.hotplug, f"node {n} hotplug")]
    missing = sorted(set(range(nr_cpus)) - owner.keys())
    if missing:
        raise UsageError(f"ACPI topology: vCPU {missing[0]} is in no node")
    spans.sort()
    for (b0, l0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b0 + l0 > b1:
            raise UsageError(f"ACPI topology: memory of node {n0} at {b0:#x}+{l0:#x} overlaps node {n1}'s at {b1:#x}")
    matrix = topo.distance_matrix()
    size = len(topo.nodes)
    if not isinstance(matrix, tuple) or len(matrix) != size or any(
            not isinstance(row, tuple) or len(row) != size for row in matrix):
        raise UsageError(f"ACPI topology: the distance matrix must be {size}x{size} tuples")
    for i, row in enumerate(matrix):
        for j, d in enumerate(row):
            if i == j and d != LOCAL_DISTANCE:
                raise UsageError(f"ACPI topology: distance from node {i} to itself is {d!r}; it must be {LOCAL_DISTANCE}")
            if i != j:
                _int(d, f"distance {i}->{j}", LOCAL_DISTANCE + 1, MAX_DISTANCE)


def _validate_platform(p: Platform) -> None:
    _int(p.ioapic_addr, "IOAPIC address", 0, 0xFFFFF000)
    _int(p.ioapic_id, "IOAPIC id", 0, 0xFF)
    _int(p.sci_irq, "SCI interrupt", 0, 0xFFFF)
    for what, port in (("PM1a event block", p.pm1a_evt), ("PM1a control block", p.pm1a_cnt)):
        _int(port, f"{what} port", 1, 0xFFFF)
    _int(p.pm_timer, "PM timer port", 0, 0xFFFF)
    if not isinstance(p.overrides, tuple) or len(p.overrides) > 16:
        raise UsageError("ACPI platform: at most 16 interrupt source overrides, as a tuple")
    for o in p.overrides:
        _int(o.source, "override source IRQ", 0, 15)
        _int(o.gsi, "override GSI", 0, 0xFFFFFFFF)
        if o.polarity not in (POLARITY_CONFORMING, POLARITY_HIGH, POLARITY_LOW):
            raise UsageError(f"ACPI platform: override polarity {o.polarity!r} is not 0, 1 or 3")
        if o.trigger not in (TRIGGER_CONFORMING, TRIGGER_EDGE, TRIGGER_LEVEL):
            raise UsageError(f"ACPI platform: override trigger {o.trigger!r} is not 0, 1 or 3")
