"""What describes one VM run (MachineConfig); how it ended is outcome.Outcome."""

from __future__ import annotations

from .. import abi
from ..record import field, record

MIN_MEMORY = 2 << 20


@record
class MachineConfig:
    """Everything that describes one VM run."""

    kernel: str                      # paths here: str or os.PathLike (pykvm's own code passes str)
    kernel_name: str = ""            # argv[0] for multiboot command lines (what the user typed)
    mem: int = 128 << 20
    cpus: int = 1
    cmdline: str = ""
    initrd: str | None = None
    serial_out: int | None = 1       # fd, or None to discard
    serial_in: int | None = None
    serial_unbuffered: bool = False  # each output byte goes to serial_out at once (else per line)
    timeout: float | None = None
    exit_port: int = abi.PYKVM_PORT_DEBUG_EXIT
    irqchip: str = "split"           # "split" (LAPIC in kernel) or "full" (+IOAPIC, PIC, PIT)
    trace_io: bool = False
    strict_io: bool = False
    flat_addr: int | None = None
    flat_bits: int = 64
    crash_dir: str | None = None     # where cores go; None disables dumping
    restart_intensity: int = 5       # device restarts allowed per restart_period before escalating
    restart_period: float = 60.0
    on_device_failure: str = "remove"  # past the intensity: "remove" (guest sees surprise removal) or "crash"
    device_deadline: float = 0.5     # a device callback running longer than this has hung
    trust: str = "trusted"           # device access policy level: "trusted" or "untrusted" (devices/policy.py)
    devices: list = field(default_factory=list)   # extra devices: [(registry name, {option: raw value})]
    bus: bool = False                # give the guest a partition bus (implied by disks or --device bus)
    disks: list = field(default_factory=list)     # block devices on the bus: [(path, read_only)]
    sandbox: bool = False            # seccomp-confine this process once set up (the CLI turns it on)
    numa: dict | None = None         # vNUMA: memory.numa.NumaConfig.as_json() (implies a bus with dynamic memory)
    memory_log: str | None = None    # JSON lines of the dynamic memory timeline (vNUMA only)
    cpu: str = "host"                # CPU model: host[,+feature,-feature...] (boot/cpumodel.py)
    display: str = "none"            # "text": show the VGA text screen on stdout (devices/vga.py)
