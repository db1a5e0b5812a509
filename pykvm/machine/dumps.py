"""Writing a core of the machine: at a crash, or on the host's request while the guest runs."""

from __future__ import annotations

import sys

from ..kvm import KvmError
from .outcome import Outcome


class Dumper:
    """Snapshots every vCPU and guest RAM into a core file in the configured crash directory."""

    def __init__(self, machine):
        self.machine = machine

    def request(self) -> None:
        """Ask for a core of the running guest without stopping it (safe from a signal handler)."""
        self.machine.requests.post(self._signal_dump)

    def _signal_dump(self) -> None:
        path, err = self.host_dump()
        print(f"pykvm: host-requested core: {path if path else 'failed: ' + str(err)}", file=sys.stderr)

    def host_dump(self) -> tuple[str | None, str | None]:
        """Pause every vCPU, write a 'host-request' core, resume; (path, None) or (None, why not)."""
        m = self.machine
        if not m.pause():
            m.resume()
            return None, "a vCPU did not stop in time"
        try:
            out = Outcome(0, "dump", "core requested by the host while the guest runs", trigger="host-request")
            return self.write(out)
        finally:
            m.resume()

    def write(self, outcome: Outcome) -> tuple[str | None, str | None]:
        """Snapshot every vCPU and guest RAM into a core; (path, None) or (None, why not)."""
        m = self.machine
        cfg = m.config
        if cfg.crash_dir is None:
            return None, None
        m.windows.drain()
        from ..crash.core import CoreWriteError, write_core_file
        from ..crash.snapshot import CrashSnapshot
        from ..devices.vga import read_screen
        from .capture import apply_trap_frame, guest_crash_info, vcpu_state

        try:
            states = [vcpu_state(v) for v in m.vcpus]
            frame = outcome.details.get("frame")
            crashing = outcome.vcpu if outcome.vcpu is not None else 0
            if frame is not None:
                apply_trap_frame(states[crashing], frame)
            snap = CrashSnapshot(
                trigger=outcome.trigger or outcome.kind, reason=outcome.reason, vcpus=states,
                crashing_vcpu=crashing, memory=m.memory,
                vector=outcome.details.get("vector"), error_code=outcome.details.get("error_code"),
                exit_reason=outcome.details.get("exit_reason"), serial_tail=m.serial.output_tail(),
                config={"kernel": str(cfg.kernel), "mem": cfg.mem, "cpus": cfg.cpus, "cmdline": cfg.cmdline,
                        "irqchip": cfg.irqchip, "protocol": m.plan.image.protocol if m.plan else None,
                        "pvpanic_events": list(m.pvpanic.events),
                        **({"fuzz_input": outcome.details["fuzz_input"]} if "fuzz_input" in outcome.details else {})},
                crash_info=guest_crash_info(m.memory, m.plan),
                bus=m.bus.snapshot() if m.bus is not None else m.bus_final,
                screen=read_screen(m.memory), screen_cursor=_cursor(m))
            path = write_core_file(snap, cfg.crash_dir)
        except CoreWriteError as e:
            return None, str(e)
        except KvmError as e:
            return None, f"cannot read vCPU state: {e}"
        return path, None


def _cursor(machine):
    """The VGA cursor (row, column) when the machine has the CRTC device and the cursor is shown."""
    crtc = machine.built.get("vga")
    return crtc.cursor() if crtc is not None else None
