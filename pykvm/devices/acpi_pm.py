"""ACPI fixed-hardware power management as the FADT describes it: PM1a event and control blocks and the PM timer.

One 12-port block at 0x600 (QEMU's layout, so 0x604 is the same power-off port as before):

  +0  PM1a_STS  (16 bits, write 1 to clear): TMR_STS 0, PWRBTN_STS 8, RTC_STS 10, WAK_STS 15
  +2  PM1a_EN   (16 bits): TMR_EN 0, PWRBTN_EN 8, RTC_EN 10
  +4  PM1a_CNT  (16 bits): SCI_EN 0 (always on: the FADT has no SMI command port), SLP_TYP 10-12,
                SLP_EN 13 (write-only). SLP_TYP 0 is S5 (power off), 1 is S3 (the DSDT's \\_S5/\\_S3)
  +8  PM_TMR    (32 bits, read-only): a 3.579545 MHz counter (the FADT sets TMR_VAL_EXT)

The SCI (IRQ 9, level) is raised while any status bit is set and enabled. A wake event (an RTC
alarm with RTC_EN set) during S3 sets WAK_STS and lets the machine resume the guest.
"""

from __future__ import annotations

import threading
import time

from .device import Device
from .events import GuestExit, SleepRequest

BASE = 0x600
LENGTH = 12
PM_TIMER_HZ = 3579545
TMR_MASK = 0xFFFFFFFF
STS, EN, CNT, TMR = 0, 2, 4, 8
TMR_STS, PWRBTN_STS, RTC_STS, WAK_STS = 1 << 0, 1 << 8, 1 << 10, 1 << 15
EN_BITS = TMR_STS | PWRBTN_STS | RTC_STS
SCI_EN = 1 << 0
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 7
SLP_EN = 1 << 13
SLP_TYP_S5, SLP_TYP_S3 = 0, 1
SCI_IRQ = 9


def pm_ticks(ns: int) -> int:
    """The PM timer value `ns` nanoseconds after it started (32 bits, wraps)."""
    return (ns * PM_TIMER_HZ // 1_000_000_000) & TMR_MASK


class WakeSignal:
    """Wake events shared between the devices that cause them (RTC alarm) and the PM block that reports them."""

    def __init__(self):
        self.event = threading.Event()
        self.sources = 0                 # PM1 status bits of the wake events seen
        self.listeners = []              # callables (bits) the PM block registers

    def rtc_alarm(self) -> None:
        """The RTC alarm fired (wakes only when the guest enabled RTC_EN)."""
        self.raise_bits(RTC_STS)

    def raise_bits(self, bits: int) -> None:
        """Record status bits and tell the PM block."""
        self.sources |= bits
        for fn in list(self.listeners):
            fn(bits)


class AcpiPm(Device):
    """PM1a_STS/EN/CNT and PM_TMR; `sci(level)` drives IRQ 9."""

    name = "acpi-pm"

    def __init__(self, base: int = BASE, sci=None, wake: WakeSignal | None = None, clock=time.monotonic_ns):
        super().__init__(base=base)
        self.base = base
        self.ports = [(base, LENGTH)]
        self.sci = sci
        self.wake = wake or WakeSignal()
        self.clock = clock
        self.t0 = clock()
        self.lock = threading.Lock()
        self.sts = 0
        self.en = 0
        self.slp_typ = 0
        self.sleeping = False
        self.wake.listeners.append(self._wake_bits)

    def _wake_bits(self, bits: int) -> None:
        with self.lock:
            self.sts |= bits
            if self.sleeping and bits & self.en:
                self.sts |= WAK_STS
                self.sleeping = False
                self.wake.event.set()
            self._update_sci()

    def _update_sci(self) -> None:
        if self.sci is not None:
            self.sci(1 if self.sts & self.en & EN_BITS else 0)

    def io_read(self, offset: int, size: int) -> int:
        """Status, enable, control (SCI_EN always set) or the timer, by offset (narrow reads take their bytes)."""
        reg, shift = (offset & ~1, 8 * (offset & 1)) if offset < TMR else (TMR, 8 * (offset - TMR))
        if reg == STS:
            v = self.sts
        elif reg == EN:
            v = self.en
        elif reg == CNT:
            v = SCI_EN | (self.slp_typ << SLP_TYP_SHIFT)
        elif reg == TMR:
            v = pm_ticks(self.clock() - self.t0)
        else:
            v = 0
        return v >> shift

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Clear status bits, set enables, or sleep through SLP_EN (S5 ends the run, S3 suspends)."""
        if offset & 1 or offset >= TMR:
            return                                    # PM registers are written whole; the timer is read-only
        value &= 0xFFFF
        with self.lock:
            if offset == STS:
                self.sts &= ~value
            elif offset == EN:
                self.en = value & EN_BITS
            elif offset == CNT:
                self.slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
                if value & SLP_EN:
                    self._sleep(self.slp_typ)
            self._update_sci()

    def _sleep(self, typ: int) -> None:
        if typ == SLP_TYP_S5:
            raise GuestExit(0, "power-off")
        if typ == SLP_TYP_S3:
            self.sts &= ~WAK_STS
            self.sleeping = True
            self.wake.event.clear()
            raise SleepRequest(3, self.wake.event)

    def get_state(self) -> dict:
        """Status, enables and the sleep type."""
        return {"sts": self.sts, "en": self.en, "slp_typ": self.slp_typ}

    def set_state(self, state: dict) -> None:
        """Reload what get_state saved."""
        self.sts = int(state.get("sts", 0)) & 0xFFFF
        self.en = int(state.get("en", 0)) & EN_BITS
        self.slp_typ = int(state.get("slp_typ", 0)) & SLP_TYP_MASK
