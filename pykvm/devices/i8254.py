"""The PC's 8254 programmable interval timer at 0x40: three 16-bit counters at 1.193182 MHz; counter 0 drives IRQ 0.

Ports: 0x40-0x42 are the counters' data ports, 0x43 the control word (select a counter, its access
mode -- low byte, high byte or both -- and its mode; counter latch; read-back). Counts are computed
from the host's monotonic clock when read, never ticked. Counter 0's output interrupts are made by a
timer thread: modes 2 and 3 (rate generator, square wave) pulse IRQ 0 every count ticks, mode 0
once at terminal count; other modes count but raise nothing. Counter 2's gate and speaker (port
0x61) are not modelled: counter 2 counts as if gated on.

Periods shorter than MIN_PERIOD are stretched to it: a Python VMM cannot deliver 100 kHz of
interrupts, and a guest asking for it would only starve the other vCPUs.
"""

from __future__ import annotations

import threading
import time

from .device import Device
from .threadguard import ThreadGuard

BASE = 0x40
PIT_HZ = 1_193_182
CONTROL = 3
MIN_PERIOD = 0.0005                     # seconds between IRQ 0 pulses at most 2 kHz
ACCESS_LATCH, ACCESS_LOW, ACCESS_HIGH, ACCESS_WORD = 0, 1, 2, 3


def ticks(ns: int) -> int:
    """Input clock ticks in `ns` nanoseconds."""
    return ns * PIT_HZ // 1_000_000_000


class Counter:
    """One counter's programming and read/write byte sequencing."""

    def __init__(self):
        self.mode = 0
        self.access = ACCESS_WORD
        self.bcd = False
        self.reload = 0x10000           # a count of 0 means 65536
        self.start_ns: int | None = None  # when the count was loaded; None until it is
        self.write_high = False         # the next byte of a word write is the high byte
        self.read_high = False
        self.low_byte = 0
        self.latched: int | None = None  # a latched count, read out in the access mode's bytes
        self.status: int | None = None   # a latched status byte (read-back), read first

    def value(self, now_ns: int) -> int:
        """The current count (modes 2/3 reload periodically; mode 0 and the rest wrap through 0xffff)."""
        if self.start_ns is None:
            return 0
        t = ticks(max(0, now_ns - self.start_ns))
        if self.mode in (2, 3):
            return self.reload - (t % self.reload) if self.mode == 2 else (self.reload - 2 * t % self.reload) & ~1
        return (self.reload - t) & 0xFFFF

    def out(self, now_ns: int) -> int:
        """The OUT pin for the read-back status: high after terminal count in mode 0, high for half the period in 3."""
        if self.start_ns is None:
            return 0
        t = ticks(max(0, now_ns - self.start_ns))
        if self.mode == 0:
            return 1 if t >= self.reload else 0
        if self.mode == 3:
            return 1 if (t % self.reload) < (self.reload + 1) // 2 else 0
        return 0 if self.mode == 2 and t % self.reload == self.reload - 1 else 1

    def status_byte(self, now_ns: int) -> int:
        """Read-back status: OUT, null count, access, mode, BCD."""
        null = 1 if self.start_ns is None else 0
        return (self.out(now_ns) << 7) | (null << 6) | (self.access << 4) | (self.mode << 1) | int(self.bcd)


class Pit(Device):
    """Ports 0x40-0x43; `irq(level)` drives ISA IRQ 0 (the machine routes it to the PIC and IOAPIC pin 2)."""

    name = "pit"

    def __init__(self, irq=None, clock=time.monotonic_ns, base: int = BASE):
        super().__init__(base=base)
        self.ports = [(base, 4)]
        self.irq = irq
        self.clock = clock
        self.counters = [Counter() for _ in range(3)]
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None
        self.stopped = False
        self.generation = 0             # bumped whenever counter 0 is reprogrammed: the thread restarts its schedule
        self.pulses = 0
        self.guard = ThreadGuard(self.name)    # IRQ 0 is raised from the timer thread: a failure must not stop it

    # ---------------------------------------------------------------- ports
    def io_read(self, offset: int, size: int) -> int:
        """A counter's status, latch or live count, a byte at a time; the control port reads 0xff."""
        if not 0 <= offset < CONTROL:
            return 0xFF
        with self.lock:
            c = self.counters[offset]
            if c.status is not None:
                v, c.status = c.status, None
                return v
            value = c.latched if c.latched is not None else c.value(self.clock())
            if c.access == ACCESS_LOW:
                byte, done = value & 0xFF, True
            elif c.access == ACCESS_HIGH:
                byte, done = (value >> 8) & 0xFF, True
            else:
                byte = (value >> 8) & 0xFF if c.read_high else value & 0xFF
                c.read_high = not c.read_high
                done = not c.read_high
            if done:
                c.latched = None
            return byte

    def io_write(self, offset: int, size: int, value: int) -> None:
        """The control word at +3, count bytes at +0..+2 (the low byte of a wider write)."""
        value &= 0xFF
        with self.lock:
            if offset == CONTROL:
                self._control(value)
            elif 0 <= offset < CONTROL:
                self._count_byte(offset, value)

    def _control(self, value: int) -> None:
        sel = value >> 6
        if sel == 3:                                  # read-back: bits 1-3 pick counters
            now = self.clock()
            for i, c in enumerate(self.counters):
                if value & (2 << i):
                    if not value & 0x10 and c.status is None:
                        c.status = c.status_byte(now)
                    if not value & 0x20 and c.latched is None:
                        c.latched = c.value(now)
            return
        c = self.counters[sel]
        access = (value >> 4) & 3
        if access == ACCESS_LATCH:
            if c.latched is None:
                c.latched = c.value(self.clock())
            return
        mode = (value >> 1) & 7
        c.mode = mode & 3 if mode >= 6 else mode      # 6 and 7 are aliases of 2 and 3
        c.access, c.bcd = access, bool(value & 1)
        c.write_high = c.read_high = False
        c.latched = c.status = None
        c.start_ns = None                             # a new mode waits for its count
        if sel == 0:
            self._reschedule()

    def _count_byte(self, n: int, byte: int) -> None:
        c = self.counters[n]
        if c.access == ACCESS_LOW:
            count = byte
        elif c.access == ACCESS_HIGH:
            count = byte << 8
        elif not c.write_high:
            c.low_byte, c.write_high = byte, True
            return
        else:
            count, c.write_high = c.low_byte | (byte << 8), False
        c.reload = count or 0x10000
        c.start_ns = self.clock()
        if n == 0:
            self._reschedule()

    # ---------------------------------------------------------------- IRQ 0
    def period(self) -> float | None:
        """Seconds between counter 0's interrupts (periodic modes), its delay (mode 0), or None when it raises none."""
        c = self.counters[0]
        if c.start_ns is None or c.mode not in (0, 2, 3) or self.irq is None:
            return None
        return max(MIN_PERIOD, c.reload / PIT_HZ)

    def _reschedule(self) -> None:
        self.generation += 1
        if self.period() is not None and self.thread is None and not self.stopped:
            self.thread = threading.Thread(target=self._run, name="pit", daemon=True)
            self.thread.start()
        self.wake.notify_all()

    def _run(self) -> None:
        with self.lock:
            fired = None                              # the generation whose mode-0 shot has gone off
            while not self.stopped:
                period, gen = self.period(), self.generation
                if period is None or fired == gen:
                    self.wake.wait()
                    continue
                deadline = time.monotonic() + period
                while not self.stopped and gen == self.generation:
                    now = time.monotonic()
                    if deadline > now:
                        self.wake.wait(deadline - now)
                        continue
                    self._pulse()
                    if self.counters[0].mode == 0:
                        fired = gen
                        break
                    # a host that fell behind drops ticks rather than bursting them
                    deadline = max(deadline + period, now)

    def _pulse(self) -> None:
        self.pulses += 1
        # each edge on its own: a rise that failed must still fall, or an edge-triggered pin never fires again
        self.guard.call(self.irq, 1)
        self.guard.call(self.irq, 0)

    def release_hardware(self) -> None:
        """Stop the interrupt thread."""
        with self.lock:
            self.stopped = True
            self.wake.notify_all()

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict:
        """Each counter's mode, access, reload and elapsed ticks (the clock is not saved, only positions)."""
        now = self.clock()
        with self.lock:
            return {"counters": [{"mode": c.mode, "access": c.access, "bcd": c.bcd, "reload": c.reload,
                                  "elapsed_ns": None if c.start_ns is None else now - c.start_ns}
                                 for c in self.counters]}

    def set_state(self, state: dict) -> None:
        """Reload counters from get_state (fields bounded to their ranges)."""
        now = self.clock()
        with self.lock:
            for c, st in zip(self.counters, list(state.get("counters", []))[:3]):
                c.mode = int(st.get("mode", 0)) % 6
                c.access = int(st.get("access", ACCESS_WORD)) & 3 or ACCESS_WORD
                c.bcd = bool(st.get("bcd", False))
                c.reload = min(max(int(st.get("reload", 0x10000)), 1), 0x10000)
                el = st.get("elapsed_ns")
                c.start_ns = None if el is None else now - max(0, int(el))
            self._reschedule()
