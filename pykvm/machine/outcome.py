"""How a VM's run ended: the one Outcome the machine records and the Python API hands its callers."""

from __future__ import annotations

from ..record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:                 # annotations only: pathlib is imported for callers that ask for a Path
    from pathlib import Path


@record(frozen=True)
class Outcome:
    """How a VM's run ended.

    status: the `pykvm run` exit status (0 power-off, odd: the guest's debug-exit code, 16 crash,
    18 timeout, 20 pykvm error, 130 stopped by the host); kind: "poweroff", "exit", "crash",
    "timeout", "reset", "saved", "stopped", "interrupted" or "vmm-error"; reason: one line for
    people; core_path: the crash core (a pathlib.Path), when one was written; transcript: serial
    output (bytes); kernel: the kernel file (a pathlib.Path). core_file and kernel_file are the
    same two paths as str (what the fields hold: building a Path costs only those who ask).
    """

    status: int
    kind: str
    reason: str
    core_file: str | None = None
    core_error: str | None = None
    transcript: bytes = b""
    vcpu: int | None = None
    trigger: str | None = None
    kernel_file: str | None = None
    details: dict = field(default_factory=dict, repr=False)

    @property
    def core_path(self) -> Path | None:
        """The crash core, when one was written (a pathlib.Path)."""
        return as_path(self.core_file)

    @property
    def kernel(self) -> Path | None:
        """The kernel file the VM booted (a pathlib.Path)."""
        return as_path(self.kernel_file)

    @property
    def ok(self) -> bool:
        """True when the guest powered off cleanly (status 0)."""
        return self.status == 0

    @property
    def crashed(self) -> bool:
        """True when the guest crashed, hung past its timeout, or pykvm failed running it."""
        return self.kind in ("crash", "timeout", "vmm-error")

    def report(self) -> dict | None:
        """The `pykvm inspect --json` report of the core (with the kernel's symbols), or None without a core."""
        if self.core_path is None:
            return None
        from ..crash.inspect import build_report

        kernel = self.kernel if self.kernel is not None and self.kernel.suffix == ".elf" else None
        return build_report(self.core_path, kernel)

    def report_text(self) -> str | None:
        """What `pykvm inspect CORE --kernel KERNEL` prints, or None without a core."""
        report = self.report()
        if report is None:
            return None
        from ..crash.inspect import render_text

        return render_text(report)


def as_path(path) -> Path | None:
    """path as a pathlib.Path (None stays None); pathlib is imported only here, for API callers that ask."""
    if path is None:
        return None
    from pathlib import Path

    return Path(path)
