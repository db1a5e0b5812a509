"""The MC146818 CMOS real-time clock at 0x70/0x71: host wall time, update-ended, alarm and periodic interrupts on IRQ 8.

Index port 0x70 (bit 7 is the NMI mask, ignored), data port 0x71. Registers 0-9 read the host's
UTC time in BCD or binary (register B's DM bit) and 12- or 24-hour form; 0x32 is the century.
Writes to time registers are kept as an offset from host time. Register A's UIP bit is set in
the last UIP_WINDOW of each second so guests can synchronise to an update; register C's flags
(IRQF, PF, AF, UF) clear on read, which also lowers IRQ 8. A thread ticks once per second (alarm
and update-ended checks) and at the periodic rate register A selects while PIE is on (at most MAX_PERIODIC_HZ, as the PIT's
rate is bounded). Interrupts leave the thread through a ThreadGuard, so a failure there never stops it.
"""

from __future__ import annotations

import calendar
import threading
import time

from .device import Device
from .threadguard import ThreadGuard

INDEX_PORT = 0x70
RAM_SIZE = 128
SEC, SEC_ALARM, MIN, MIN_ALARM, HOUR, HOUR_ALARM, WDAY, MDAY, MONTH, YEAR = range(10)
REG_A, REG_B, REG_C, REG_D = 10, 11, 12, 13
CENTURY = 0x32
UIP = 0x80
B_SET, B_PIE, B_AIE, B_UIE, B_DM, B_24H = 0x80, 0x40, 0x20, 0x10, 0x04, 0x02
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80
DONT_CARE = 0xC0
UIP_WINDOW = 0.01             # seconds; a real RTC holds UIP 244 us, which a trapped guest may never see
IRQ = 8
BASE_HZ = 32768
MAX_PERIODIC_HZ = 2000.0      # faster rates (up to 8192 Hz) are stretched, as the PIT's: a Python thread cannot keep up
MAX_YEAR = 10099              # writes reach year 10000 at most (century 99, then a day past 9999)


def periodic_hz(reg_a: int) -> float:
    """The periodic interrupt rate register A's rate bits select (0: off)."""
    rate = reg_a & 0x0F
    if rate == 0:
        return 0.0
    if rate <= 2:
        rate += 7                 # rates 1 and 2 alias 8 and 9 with the 32.768 kHz divider
    return BASE_HZ / (1 << (rate - 1))


def to_bcd(v: int) -> int:
    """Binary 0..99 as packed BCD."""
    return ((v // 10) << 4) | (v % 10)


def from_bcd(v: int) -> int:
    """Packed BCD as binary (nibbles above 9 are taken as they are, like hardware)."""
    return (v >> 4) * 10 + (v & 0x0F)


class CmosRtc(Device):
    """CMOS RAM and clock; `irq(level)` drives IRQ 8, `on_alarm()` reports alarms as wake events."""

    name = "rtc"

    def __init__(self, irq=None, on_alarm=None, clock=time.time):
        super().__init__()
        self.ports = [(INDEX_PORT, 2)]
        self.irq = irq
        self.on_alarm = on_alarm
        self.clock = clock
        self.lock = threading.Lock()
        self.ram = bytearray(RAM_SIZE)
        self.ram[REG_A] = 0x26                    # 32.768 kHz divider, 1024 Hz periodic rate
        self.ram[REG_B] = B_24H
        self.ram[REG_D] = D_VRT
        self.index = 0
        self.offset = 0.0                         # guest-set time minus host time, in seconds
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = None
        self.interrupts = 0
        self.guard = ThreadGuard(self.name)        # IRQ 8 and wake-ups are raised from the ticking thread

    # ---------------------------------------------------------------- time
    def _now(self) -> float:
        return self.clock() + self.offset

    def _encode(self, v: int) -> int:
        return v if self.ram[REG_B] & B_DM else to_bcd(v)

    def _decode(self, v: int) -> int:
        return v if self.ram[REG_B] & B_DM else from_bcd(v)

    def _time_reg(self, reg: int) -> int:
        t = time.gmtime(int(self._now()))
        if reg == SEC:
            return self._encode(t.tm_sec)
        if reg == MIN:
            return self._encode(t.tm_min)
        if reg == HOUR:
            if self.ram[REG_B] & B_24H:
                return self._encode(t.tm_hour)
            h = t.tm_hour % 12 or 12
            return self._encode(h) | (0x80 if t.tm_hour >= 12 else 0)
        if reg == WDAY:
            return self._encode((t.tm_wday + 1) % 7 + 1)   # 1 = Sunday
        if reg == MDAY:
            return self._encode(t.tm_mday)
        if reg == MONTH:
            return self._encode(t.tm_mon)
        if reg == YEAR:
            return self._encode(t.tm_year % 100)
        return self._encode(t.tm_year // 100)          # CENTURY

    def _set_time_reg(self, reg: int, value: int) -> None:
        t = list(time.gmtime(int(self._now())))
        v = self._decode(value & 0x7F if reg == HOUR else value)
        if reg == HOUR and not self.ram[REG_B] & B_24H:
            v = v % 12 + (12 if value & 0x80 else 0)
        field = {SEC: 5, MIN: 4, HOUR: 3, MDAY: 2, MONTH: 1}.get(reg)
        if reg == YEAR:
            t[0] = t[0] // 100 * 100 + v % 100
        elif reg == CENTURY:
            t[0] = v * 100 + t[0] % 100
        elif field is not None:
            t[field] = v
        else:
            return
        try:
            wanted = calendar.timegm(tuple(t))
        except (ValueError, OverflowError):
            return
        self.offset = wanted - int(self.clock())

    # ---------------------------------------------------------------- ports
    def io_read(self, offset: int, size: int) -> int:
        """0x70 reads back the index; 0x71 reads the selected register (C clears its flags)."""
        if offset == 0:
            return self.index
        with self.lock:
            reg = self.index
            if reg in (SEC, MIN, HOUR, WDAY, MDAY, MONTH, YEAR, CENTURY):
                return self._time_reg(reg)
            if reg == REG_A:
                frac = self._now() % 1.0
                return (self.ram[REG_A] & 0x7F) | (UIP if frac >= 1.0 - UIP_WINDOW else 0)
            if reg == REG_C:
                v = self.ram[REG_C]
                self.ram[REG_C] = 0
                if v and self.irq is not None:
                    self.irq(0)
                return v
            return self.ram[reg]

    def io_write(self, offset: int, size: int, value: int) -> None:
        """0x70 selects a register (NMI mask bit ignored); 0x71 writes it."""
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F
            return
        with self.lock:
            reg = self.index
            if reg in (SEC, MIN, HOUR, MDAY, MONTH, YEAR, CENTURY):
                self._set_time_reg(reg, value)
            elif reg in (REG_C, REG_D):
                return                                    # read-only
            elif reg == REG_A:
                self.ram[REG_A] = value & 0x7F
            else:
                self.ram[reg] = value
        self._kick.set()                                  # rate or enables may have changed

    # ---------------------------------------------------------------- the ticking thread
    def io_start(self) -> None:
        """Start ticking."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="rtc", daemon=True)
            self._thread.start()

    def io_suspend(self) -> None:
        """Stop ticking."""
        t, self._thread = self._thread, None
        if t is not None:
            self._stop.set()
            self._kick.set()
            t.join(2.0)

    def _run(self) -> None:
        next_periodic = None
        last_second = int(self._now())
        while not self._stop.is_set():
            now = self._now()
            hz = min(periodic_hz(self.ram[REG_A]), MAX_PERIODIC_HZ) if self.ram[REG_B] & B_PIE else 0.0
            if hz and next_periodic is None:
                next_periodic = now + 1.0 / hz
            elif not hz:
                next_periodic = None
            due = int(now) + 1.0
            if next_periodic is not None:
                due = min(due, next_periodic)
            self._kick.wait(max(0.0, due - now))
            self._kick.clear()
            now = self._now()
            flags = 0
            if next_periodic is not None and now >= next_periodic:
                flags |= C_PF
                next_periodic = max(next_periodic + 1.0 / hz, now) if hz else None
            if int(now) != last_second:
                last_second = int(now)
                flags |= C_UF | (C_AF if self._alarm_matches() else 0)
            if flags:
                self.tick(flags)

    def _alarm_matches(self) -> bool:
        for reg, alarm in ((SEC, SEC_ALARM), (MIN, MIN_ALARM), (HOUR, HOUR_ALARM)):
            a = self.ram[alarm]
            if a & DONT_CARE != DONT_CARE and a != self._time_reg(reg):
                return False
        return True

    def tick(self, flags: int) -> None:
        """Latch flags into register C and raise IRQ 8 for the enabled ones (the alarm also wakes)."""
        with self.lock:
            self.ram[REG_C] |= flags
            enabled = self.ram[REG_C] & (self.ram[REG_B] & (B_PIE | B_AIE | B_UIE))
            if enabled:
                self.ram[REG_C] |= C_IRQF
        if enabled:
            self.interrupts += 1
            # each call-out on its own: a failed interrupt must not cost the alarm its wake-up
            if self.irq is not None:
                self.guard.call(self.irq, 1)
            if enabled & C_AF and self.on_alarm is not None:
                self.guard.call(self.on_alarm)

    def get_state(self) -> dict:
        """CMOS RAM, index and the guest's time offset."""
        with self.lock:
            return {"ram": self.ram.hex(), "index": self.index, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        """Reload what get_state saved (ValueError for a time offset no guest write could have made)."""
        offset = float(state.get("offset", 0.0))
        try:
            year = time.gmtime(int(self.clock() + offset)).tm_year
        except (ValueError, OverflowError, OSError):
            year = -1
        if not 0 <= year <= MAX_YEAR:       # every clock read would raise, or encode past a byte
            raise ValueError(f"RTC time offset {offset} is outside years 0..{MAX_YEAR}")
        with self.lock:
            ram = bytes.fromhex(state.get("ram", ""))[:RAM_SIZE]
            self.ram[:len(ram)] = ram
            self.index = int(state.get("index", 0)) & 0x7F
            self.offset = offset
