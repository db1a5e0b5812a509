"""Finishes the userspace IOAPIC's level-triggered EOIs that the host's KVM never reported.

Under the split irqchip KVM tells userspace about the EOI of a level-triggered IOAPIC vector with
KVM_EXIT_IOAPIC_EOI, but only the next time the vCPU enters the guest. A host that emulates a run of
guest instructions at once (PVM does, up to pvm_emul_batch of them) can take the EOI and then a HLT
in one run: the vCPU blocks with the exit still queued, Remote IRR stays set, and a line that is
still high never fires again (kvm-unit-tests' ioapic "retriggered level interrupts" hangs that way,
under QEMU too). So while a level interrupt stays in service, this thread looks, with doubling
waits, at every vCPU's LAPIC (the vCPUs briefly paused); a vector found in no IRR and no ISR was
EOI'd, and the IOAPIC ends that delivery itself. The late exit, when it comes, finds the line's
next interrupt still pending in the IRR and merges with it.
"""

from __future__ import annotations

import threading

from .. import errors
from ..kvm.abi import ffi
from .outcome import Outcome

FIRST_LOOK = 0.02     # seconds a level interrupt stays in service before the LAPICs are looked at
LONGEST_WAIT = 1.0    # the doubling waits stop growing here
APIC_ISR, APIC_IRR = 0x100, 0x200


def lapic_vectors(regs: bytes, base: int) -> set[int]:
    """The vectors set in one 256-bit LAPIC register (eight 32-bit words 16 bytes apart) at `base`."""
    out = set()
    for word in range(8):
        bits = int.from_bytes(regs[base + 16 * word:base + 16 * word + 4], "little")
        out.update(32 * word + i for i in range(32) if bits >> i & 1)
    return out


class EoiWatch:
    """The watchdog thread for one machine's userspace IOAPIC; `notify()` is its on_level_sent hook."""

    def __init__(self, machine):
        self.machine = machine
        self.ioapic = None            # set once the IOAPIC model exists (it needs notify first)
        self.probes = 0               # times the LAPICs were looked at
        self._sent = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def notify(self) -> None:
        """A level-triggered interrupt went out (called under the IOAPIC's lock: only sets an event)."""
        self._sent.set()

    def start(self) -> None:
        """Start the thread (before the sandbox, which forbids creating threads)."""
        if self.ioapic is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="eoi-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the thread."""
        self._stop.set()
        self._sent.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def _run(self) -> None:
        m = self.machine
        try:
            self._watch()
        except Exception as e:
            if not m.stopping:     # a KVM call failing on a live VM is pykvm's bug: end the VM as such
                import traceback   # here, not at the top: only a failure needs it (held under the sandbox)

                m.finish(Outcome(errors.EXIT_VMM_ERROR, "vmm-error", f"internal error in the EOI watch: "
                                 f"{type(e).__name__}: {e}", trigger="vmm-error",
                                 details={"traceback": traceback.format_exc()}))

    def _watch(self) -> None:
        m = self.machine
        wait = FIRST_LOOK
        while not self._stop.is_set() and not m.stopping:
            before = self.ioapic.outstanding()
            if not before:
                self._sent.wait()
                self._sent.clear()
                wait = FIRST_LOOK
                continue
            if self._stop.wait(wait):
                return
            now = self.ioapic.outstanding()
            stale = {pin: n for pin, n in now.items() if before.get(pin) == n}
            if not stale:
                wait = FIRST_LOOK
                continue
            try:
                ended = m.call(lambda: self._probe(stale), timeout=10.0)
            except TimeoutError:
                ended = []
            wait = FIRST_LOOK if ended else min(2 * wait, LONGEST_WAIT)

    def _probe(self, stale: dict[int, int]) -> list[int]:
        """On the main thread: pause, collect every LAPIC's IRR and ISR, let the IOAPIC end what no one holds."""
        m = self.machine
        if m.stopping or m.debugger is not None or m.pauser.pausing:
            return []   # a debugger or another pause owns the vCPUs; look again later
        self.probes += 1
        try:
            if not m.pause(1.0):
                return []
            held: set[int] = set()
            for vcpu in m.vcpus:
                regs = bytes(ffi.buffer(vcpu.get_lapic().regs))
                held |= lapic_vectors(regs, APIC_ISR) | lapic_vectors(regs, APIC_IRR)
            return self.ioapic.recover(stale, held)
        finally:
            m.resume()
