"""Memory-backed register windows and the coalesced-MMIO ring, from the device model's side.

A window's image is a memfd-backed MemoryRegion: the machine maps it into the guest as a
read-only memslot (KVM_MEM_READONLY), so guest reads cost no exit, while the device model
writes registers straight into the same pages. Guest writes to a mapped window still trap
(KVM reports them as MMIO writes) and reach the model's mmio_write, which updates the image.

Device models never issue ioctls. They ask for a mode change with `set_mode`, which goes
through `DeviceManager.window_hook(device, live)`, a callable the machine installs: it
re-syncs every window of the device with its current mode (map "backed" windows, unmap
"trapped" ones) and registers or drops the device's coalesced write-only registers
(`Device.coalesced`: [(gpa, length)]). A device without a machine (unit tests) simply keeps
serving reads from its image through mmio_read.

The coalesced ring (`drain_ring`) lives in memory KVM shares with the VMM, so nothing in it is
trusted: indices are bounded by the ring size, lengths by 8, and each entry's address must lie
in a zone the VMM registered, else the entry is dropped and counted.
"""

from __future__ import annotations

import struct

from ..memory.region import PAGE_SIZE, MemoryRegion
from ..record import field, record
from .device import Device, State, Window

MODES = ("backed", "trapped")


# ------------------------------------------------------------------ images
def attach_image(window: Window, initial: bytes = b"") -> MemoryRegion:
    """Give `window` a memfd-backed image (zero-filled, then `initial` copied in); returns its region.

    `window.image` becomes a writable memoryview over the mapping; `window.backing` the region.
    """
    if window.size <= 0 or window.size % PAGE_SIZE or window.gpa % PAGE_SIZE:
        raise ValueError(f"window {window.name}: address {window.gpa:#x} and size {window.size:#x} "
                         f"must be page aligned page multiples")
    if len(initial) > window.size:
        raise ValueError(f"window {window.name}: initial image of {len(initial)} bytes exceeds {window.size}")
    old = getattr(window, "backing", None)
    if old is not None:
        return old
    region = MemoryRegion(window.gpa, window.size, name=f"window-{window.name}")
    if initial:
        region.view[:len(initial)] = initial
    window.backing = region
    window.image = region.view
    return region


def ensure_image(window: Window) -> MemoryRegion:
    """The window's memfd region, creating one (holding the current `image` bytes, if any) when missing."""
    region = getattr(window, "backing", None)
    if region is not None and region.fd >= 0:
        return region
    window.backing = None
    data = bytes(window.image) if window.image is not None else b""
    return attach_image(window, data[:window.size])


def release_image(window: Window) -> None:
    """Unmap and close the window's image; afterwards `image` is a plain copy of the last contents."""
    region = getattr(window, "backing", None)
    if region is None:
        return
    last = bytearray(region.view) if region.fd >= 0 else bytearray(window.size)
    window.image = last
    window.backing = None
    _close_later.append(region)
    _close_pending()


_close_later: list[MemoryRegion] = []


def _close_pending() -> None:
    """Close released images; one a racing access still holds a view of is retried on the next release."""
    for region in list(_close_later):
        try:
            region.close()
        except BufferError:
            continue
        _close_later.remove(region)


def image_bytes(window: Window) -> bytes:
    """A copy of the window's current contents (zeros when it has no image)."""
    if window.image is None:
        return bytes(window.size)
    return bytes(window.image[:window.size])


def load_image(window: Window, data: bytes) -> None:
    """Overwrite the whole image with `data` (exactly window.size bytes)."""
    if len(data) != window.size:
        raise ValueError(f"window {window.name}: image of {len(data)} bytes, expected {window.size}")
    ensure_image(window)
    window.image[:window.size] = data


def read_reg(window: Window, offset: int, size: int) -> int:
    """Little-endian read of `size` bytes at `offset` in the image; bytes past the window read as ones."""
    img = window.image
    end = min(offset + size, window.size)
    raw = bytes(img[offset:end]) if img is not None and 0 <= offset < end else b""
    return int.from_bytes(raw + b"\xff" * (size - len(raw)), "little")


def write_reg(window: Window, offset: int, size: int, value: int) -> None:
    """Little-endian write of `size` bytes at `offset` (clipped to the window)."""
    if window.image is None or offset < 0 or offset >= window.size:
        return
    n = min(size, window.size - offset)
    window.image[offset:offset + n] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[:n]


def set_mode(device: Device, window: Window, mode: str) -> None:
    """Switch a window between "backed" (reads from memory, no exit) and "trapped" (every access exits).

    Takes effect at once when the device is live (the machine maps or unmaps the memslot);
    otherwise when it next enters D0.
    """
    if mode not in MODES:
        raise ValueError(f"window mode must be one of {', '.join(MODES)}, not {mode!r}")
    if window.mode == mode:
        return
    window.mode = mode
    mgr = device.manager
    hook = getattr(mgr, "window_hook", None)
    if hook is None or device.state is not State.D0:
        return
    hit = mgr.mmio_lookup(window.gpa)
    if hit is not None and hit[0] is device:
        hook(device, True)


# ------------------------------------------------------------------ coalesced MMIO ring
RING_HEADER = struct.Struct("<II")         # struct kvm_coalesced_mmio_ring: first, last
RING_ENTRY = struct.Struct("<QII8s")       # struct kvm_coalesced_mmio: phys_addr, len, pad/pio, data[8]
RING_MAX = (PAGE_SIZE - RING_HEADER.size) // RING_ENTRY.size   # KVM_COALESCED_MMIO_MAX (170)


@record
class RingStats:
    """What draining found: applied writes and everything dropped as malformed."""

    applied: int = 0
    bad_index: int = 0       # first/last outside the ring: the ring was reset
    bad_length: int = 0      # len 0 or > 8
    outside_zone: int = 0    # an address no registered zone covers
    pio: int = 0             # port entries (pykvm registers none)
    events: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"applied": self.applied, "bad_index": self.bad_index, "bad_length": self.bad_length,
                "outside_zone": self.outside_zone, "pio": self.pio}


def in_zones(zones, addr: int, length: int) -> bool:
    """True when [addr, addr+length) lies inside one (gpa, size) zone."""
    for base, size in zones:
        if base <= addr and addr + length <= base + size:
            return True
    return False


def drain_ring(buf, offset: int, zones, apply, stats: RingStats, limit: int = RING_MAX) -> int:
    """Apply queued coalesced writes in order; returns how many were applied.

    `buf` is the vCPU mmap (or any writable buffer) and `offset` where the ring page starts.
    `apply(addr, length, value)` performs one write. At most `limit` entries are consumed per
    call (a ring can never hold more), `first` is advanced before each write is applied, so a
    write that re-enters draining (through a device model) never sees an entry twice.
    """
    if offset < 0 or offset + PAGE_SIZE > len(buf):
        return 0
    done = 0
    for _ in range(limit):
        first, last = RING_HEADER.unpack_from(buf, offset)
        if first >= RING_MAX or last >= RING_MAX:
            # garbage indices: drop everything queued (resynchronise on KVM's `last` when it is sane)
            stats.bad_index += 1
            struct.pack_into("<I", buf, offset, last if last < RING_MAX else 0)
            break
        if first == last:
            break
        addr, length, pio, data = RING_ENTRY.unpack_from(buf, offset + RING_HEADER.size + first * RING_ENTRY.size)
        struct.pack_into("<I", buf, offset, (first + 1) % RING_MAX)
        if pio:
            stats.pio += 1
            continue
        if not 1 <= length <= 8:
            stats.bad_length += 1
            continue
        if not in_zones(zones, addr, length):
            stats.outside_zone += 1
            continue
        apply(addr, length, int.from_bytes(data[:length], "little"))
        stats.applied += 1
        done += 1
    return done
