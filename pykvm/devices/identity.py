"""The identity device: a register block served from memory, the "memory-backed device substitute".

Three pages at PYKVM_IDENT_BASE (layout in guests/include/pykvm_abi.h, access rules in identity.toml):

  page 0, window "ident"   vendor/device ids, version, capability bits, a serial-number string,
                           CONTROL, CONFIG_GEN and a 16-word CONFIG block the guest may write
  page 1, window "status"  TICK (microseconds the device has been running, written by a host
                           worker thread every TICK_PERIOD), STATUS bits, TRAPPED_READS,
                           LOG_COUNT and LOG_HASH
  page 2 (plain MMIO)      LOG, a write-only register whose writes KVM queues in the coalesced
                           ring (no exit); reading FLUSH exits, which applies queued writes
                           first, and returns LOG_COUNT

Both windows are "backed": KVM serves guest reads from the images with no exit; writes trap
here and update the image. Writing CONTROL switches a window to "trapped" mode (its memslot
is removed, every read exits to mmio_read) and back. Trapped reads of the status block have a
side effect, counted in TRAPPED_READS: the reason a real device would need trapped mode.
"""

from __future__ import annotations

import struct
import threading
import time

from .. import abi
from . import memwindow
from .device import Device, Window

BASE = abi.PYKVM_IDENT_BASE
PAGE = 0x1000
STATUS = abi.PYKVM_IDENT_STATUS_PAGE
CONFIG_END = abi.PYKVM_IDENT_CONFIG + 4 * abi.PYKVM_IDENT_CONFIG_WORDS
CAPS = (abi.PYKVM_IDENT_CAP_BACKED | abi.PYKVM_IDENT_CAP_TRAPPED | abi.PYKVM_IDENT_CAP_COALESCED_LOG
        | abi.PYKVM_IDENT_CAP_TICK)
_U64 = struct.Struct("Q")    # native: one 8-byte store, so a guest never sees a torn TICK
_U32 = struct.Struct("I")
TICK_PERIOD = 0.01
MASK32 = 0xFFFFFFFF


def log_hash(values, h: int = abi.PYKVM_IDENT_HASH_INIT) -> int:
    """LOG_HASH after `values` were written to LOG in this order (FNV-1a over 32-bit words)."""
    for v in values:
        h = ((h ^ (v & MASK32)) * abi.PYKVM_IDENT_HASH_PRIME) & MASK32
    return h


class Identity(Device):
    """Identity/config window, polled status block, mode-switch control and a coalesced log register."""

    name = "identity"

    def __init__(self, base: int = BASE, serial: str = "PYKVM-IDENT-0001", name: str = "identity"):
        super().__init__(base=base, serial=serial, name=name)
        if base % PAGE:
            raise ValueError(f"identity device base {base:#x} must be page aligned")
        raw = serial.encode()
        if len(raw) >= abi.PYKVM_IDENT_SERIAL_LEN:
            raise ValueError(f"serial number {serial!r} is longer than {abi.PYKVM_IDENT_SERIAL_LEN - 1} bytes")
        self.name = name
        self.base = base
        self.serial = raw
        self.mmio = [(base, abi.PYKVM_IDENT_SIZE)]
        self.ident = Window("ident", base, PAGE)
        self.status = Window("status", base + STATUS, PAGE)
        self.windows = [self.ident, self.status]
        self.coalesced = [(base + abi.PYKVM_IDENT_LOG, 4)]
        # guest-visible state (get_state/set_state); the images render it
        self.config_words = [0] * abi.PYKVM_IDENT_CONFIG_WORDS
        self.config_gen = 0
        self.control = 0
        self.trapped_reads = 0
        self.log_count = 0
        self.log_hash = abi.PYKVM_IDENT_HASH_INIT
        self.log_tail: list[int] = []          # the last values written to LOG (host-side view)
        self.ignored_writes = 0
        self.tick_base = 0                      # TICK carried over from an earlier instance, in µs
        self._started_at: float | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._running = False

    # ------------------------------------------------------------ lifecycle
    def prepare_hardware(self) -> None:
        """Allocate the two window images (memfds) and render the register state into them."""
        memwindow.attach_image(self.ident)
        memwindow.attach_image(self.status)
        self._render()

    def release_hardware(self) -> None:
        """Give back the images (they become plain copies, so get_state/tests still see the last bytes)."""
        self._stop_worker()
        memwindow.release_image(self.ident)
        memwindow.release_image(self.status)

    def d0_entry(self, previous) -> None:
        self._render()

    def io_start(self) -> None:
        """Start the TICK worker."""
        self._running = True
        self._started_at = time.monotonic()
        self._stop.clear()
        self._worker = threading.Thread(target=self._tick_loop, name=f"{self.name}-tick", daemon=True)
        self._worker.start()
        self._put_status()

    def io_suspend(self) -> None:
        """Stop the TICK worker; TICK keeps its value."""
        self._stop_worker()

    def _stop_worker(self) -> None:
        if self._worker is None:
            return
        self.tick_base = self._tick_now()
        self._stop.set()
        self._worker.join(2)
        self._worker = None
        self._running = False
        self._started_at = None
        self._put_tick(self.tick_base)
        self._put_status()

    # ------------------------------------------------------------ the image
    def _tick_now(self) -> int:
        if self._started_at is None:
            return self.tick_base
        return self.tick_base + int((time.monotonic() - self._started_at) * 1e6)

    def _tick_loop(self) -> None:
        while not self._stop.wait(TICK_PERIOD):
            self._put_tick(self._tick_now())

    def _put_tick(self, value: int) -> None:
        img = self.status.image
        if img is not None:
            _U64.pack_into(img, abi.PYKVM_IDENT_TICK - STATUS, value)

    def _status_bits(self) -> int:
        bits = abi.PYKVM_IDENT_ST_RUNNING if self._running else 0
        if self.status.mode == "trapped":
            bits |= abi.PYKVM_IDENT_ST_STATUS_TRAPPED
        if self.ident.mode == "trapped":
            bits |= abi.PYKVM_IDENT_ST_IDENT_TRAPPED
        return bits

    def _put_status(self) -> None:
        img = self.status.image
        if img is None:
            return
        for off, value in ((abi.PYKVM_IDENT_STATUS, self._status_bits()),
                           (abi.PYKVM_IDENT_TRAPPED_READS, self.trapped_reads),
                           (abi.PYKVM_IDENT_LOG_COUNT, self.log_count),
                           (abi.PYKVM_IDENT_LOG_HASH, self.log_hash)):
            _U32.pack_into(img, off - STATUS, value & MASK32)

    def _render(self) -> None:
        """Write every register into the images from the model's state."""
        img = self.ident.image
        if img is not None:
            for off, value in ((abi.PYKVM_IDENT_VENDOR_ID, abi.PYKVM_IDENT_VENDOR),
                               (abi.PYKVM_IDENT_DEVICE_ID, abi.PYKVM_IDENT_DEVICE),
                               (abi.PYKVM_IDENT_VERSION, abi.PYKVM_IDENT_VERSION_VALUE),
                               (abi.PYKVM_IDENT_CAPS, CAPS),
                               (abi.PYKVM_IDENT_CONTROL, self.control),
                               (abi.PYKVM_IDENT_CONFIG_GEN, self.config_gen)):
                _U32.pack_into(img, off, value & MASK32)
            serial = self.serial.ljust(abi.PYKVM_IDENT_SERIAL_LEN, b"\0")
            img[abi.PYKVM_IDENT_SERIAL:abi.PYKVM_IDENT_SERIAL + len(serial)] = serial
            for i, v in enumerate(self.config_words):
                _U32.pack_into(img, abi.PYKVM_IDENT_CONFIG + 4 * i, v)
        self._put_tick(self._tick_now())
        self._put_status()

    # ------------------------------------------------------------ state
    def get_state(self) -> dict:
        """Everything the guest can see besides the constant ids: config, control, counters, TICK."""
        return {"config": list(self.config_words), "config_gen": self.config_gen, "control": self.control,
                "trapped_reads": self.trapped_reads, "log_count": self.log_count, "log_hash": self.log_hash,
                "tick": self._tick_now()}

    def set_state(self, state: dict) -> None:
        """Load an earlier instance's state (validated: it may come from a file)."""
        words = state.get("config", [])
        if (not isinstance(words, list) or len(words) != abi.PYKVM_IDENT_CONFIG_WORDS
                or not all(isinstance(v, int) and 0 <= v <= MASK32 for v in words)):
            raise ValueError(f"identity state: config must be {abi.PYKVM_IDENT_CONFIG_WORDS} 32-bit values")
        ints = {}
        for key in ("config_gen", "control", "trapped_reads", "log_count", "log_hash", "tick"):
            v = state.get(key, 0)
            if not isinstance(v, int) or v < 0 or v >= (1 << 64):
                raise ValueError(f"identity state: {key} must be an unsigned integer")
            ints[key] = v
        self.config_words = list(words)
        self.config_gen = ints["config_gen"] & MASK32
        self.log_count = ints["log_count"] & MASK32
        self.log_hash = ints["log_hash"] & MASK32
        self.trapped_reads = ints["trapped_reads"] & MASK32
        self.tick_base = ints["tick"]
        if self._started_at is not None:
            self._started_at = time.monotonic()
        self._set_control(ints["control"])
        self._render()

    def check(self) -> None:
        if len(self.config_words) != abi.PYKVM_IDENT_CONFIG_WORDS:
            raise ValueError("identity config block has the wrong size")

    # ------------------------------------------------------------ registers
    def _set_control(self, value: int) -> None:
        self.control = value & (abi.PYKVM_IDENT_CTL_TRAP_STATUS | abi.PYKVM_IDENT_CTL_TRAP_IDENT)
        memwindow.set_mode(self, self.status,
                           "trapped" if self.control & abi.PYKVM_IDENT_CTL_TRAP_STATUS else "backed")
        memwindow.set_mode(self, self.ident,
                           "trapped" if self.control & abi.PYKVM_IDENT_CTL_TRAP_IDENT else "backed")
        if self.ident.image is not None:
            _U32.pack_into(self.ident.image, abi.PYKVM_IDENT_CONTROL, self.control)
        self._put_status()

    def mmio_read(self, offset: int, size: int) -> int:
        """Reads that exit: a trapped window, a host without read-only memslots, or page 2."""
        if offset < PAGE:
            return memwindow.read_reg(self.ident, offset, size)
        if offset < STATUS + PAGE:
            value = memwindow.read_reg(self.status, offset - STATUS, size)
            if self.status.mode == "trapped":
                self.trapped_reads = (self.trapped_reads + 1) & MASK32   # the read side effect
                _U32.pack_into(self.status.image, abi.PYKVM_IDENT_TRAPPED_READS - STATUS, self.trapped_reads)
            return value
        if offset == abi.PYKVM_IDENT_FLUSH:
            return self.log_count
        if offset == abi.PYKVM_IDENT_LOG:
            return 0   # write-only
        return (1 << (8 * size)) - 1

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """CONTROL, the CONFIG block and LOG are writable; writes anywhere else are ignored (counted)."""
        if offset == abi.PYKVM_IDENT_LOG and size == 4:
            self._log(value)
        elif offset == abi.PYKVM_IDENT_CONTROL and size == 4:
            self._set_control(value)
        elif abi.PYKVM_IDENT_CONFIG <= offset and offset + size <= CONFIG_END:
            memwindow.write_reg(self.ident, offset, size, value)
            base = abi.PYKVM_IDENT_CONFIG
            for i in range((offset - base) // 4, (offset + size - 1 - base) // 4 + 1):
                self.config_words[i] = _U32.unpack_from(self.ident.image, base + 4 * i)[0]
            self.config_gen = (self.config_gen + 1) & MASK32
            _U32.pack_into(self.ident.image, abi.PYKVM_IDENT_CONFIG_GEN, self.config_gen)
        else:
            self.ignored_writes += 1

    def _log(self, value: int) -> None:
        value &= MASK32
        self.log_count = (self.log_count + 1) & MASK32
        self.log_hash = ((self.log_hash ^ value) * abi.PYKVM_IDENT_HASH_PRIME) & MASK32
        self.log_tail.append(value)
        if len(self.log_tail) > 8192:
            del self.log_tail[:-4096]
        img = self.status.image
        if img is not None:
            _U32.pack_into(img, abi.PYKVM_IDENT_LOG_COUNT - STATUS, self.log_count)
            _U32.pack_into(img, abi.PYKVM_IDENT_LOG_HASH - STATUS, self.log_hash)
