"""Memory-backed device windows (read-only memslots) and the coalesced-MMIO ring, kept in step with KVM."""

from __future__ import annotations

import sys
import threading

from .. import errors
from ..devices import VmEvent, memwindow
from ..kvm import KvmError
from ..kvm import constants as C
from .outcome import Outcome

WINDOW_SLOT_BASE = 64          # memslots of device windows; RAM (and vNUMA nodes) use 0..63
COALESCED_DRAIN_PERIOD = 0.01  # how often queued coalesced writes are applied when nothing else exits


class WindowSync:
    """Maps devices' windows and coalesced zones into KVM as they enter and leave D0."""

    def __init__(self, machine):
        self.machine = machine
        self._lock = threading.RLock()
        self._slots: dict[int, tuple] = {}          # id(window) -> (slot, window, device name)
        self._zones: dict[int, tuple] = {}          # id(device) -> (device, [(gpa, length)])
        self.zone_list: list[tuple[int, int]] = []  # hot: the vCPU loop drains only when non-empty
        self._ring_lock = threading.RLock()
        self.ring_page = 0                          # KVM_COALESCED_MMIO_PAGE_OFFSET, 0 = unsupported
        self.readonly_mem = False
        self._warned_ro = False
        self._drainer: threading.Thread | None = None
        self.ring_stats = memwindow.RingStats()
        # one applier per (on a vCPU thread, strict) so draining builds no closure per call
        self._appliers = {(on_vcpu, strict): (lambda a, n, v, o=on_vcpu, st=strict: self._apply(a, n, v, o, st))
                          for on_vcpu in (False, True) for strict in (False, True)}
        self.pending_images: dict[tuple[str, str], bytes] = {}   # (device, window) -> bytes, from a restore

    def probe(self, vm) -> None:
        """Learn what this KVM offers (read-only memslots, a coalesced ring)."""
        self.readonly_mem = bool(vm.check_extension(C.KVM_CAP_READONLY_MEM))
        self.ring_page = vm.check_extension(C.KVM_CAP_COALESCED_MMIO)

    def hook(self, dev, live: bool) -> None:
        """DeviceManager.window_hook: make KVM match `dev`'s windows and coalesced registers.

        live: map each "backed" window as a read-only memslot over its image (so reads cost no exit)
        and unmap "trapped" ones (every access exits to the model); register the device's coalesced
        zones. Not live (the device is leaving D0): apply what is queued, drop the zones, unmap all.
        """
        if self.machine.vm is None:
            return
        if not live:
            self.drain(strict=False)
        with self._lock:
            if live and dev.windows and not self.readonly_mem and not self._warned_ro:
                self._warned_ro = True
                print("pykvm: warning: this KVM lacks KVM_CAP_READONLY_MEM: memory-backed device windows "
                      "fall back to trapped mode (every read exits)", file=sys.stderr)
            for w in dev.windows:
                self._sync_window(dev, w, live)
            dropped = self._sync_zones(dev, live)
        if dropped:
            self.drain(strict=False)  # writes queued while the zones were being dropped
            with self._lock:
                self.zone_list = [z for _d, zs in self._zones.values() for z in zs]

    def _sync_window(self, dev, w, live: bool) -> None:
        vm = self.machine.vm
        key = id(w)
        cur = self._slots.get(key)
        if live:
            pending = self.pending_images.pop((dev.name, w.name), None)
            if pending is not None:
                memwindow.load_image(w, pending)
        want = live and w.mode == "backed" and self.readonly_mem
        if want and cur is None:
            region = memwindow.ensure_image(w)
            used = {slot for slot, *_ in self._slots.values()}
            slot = next(n for n in range(WINDOW_SLOT_BASE, WINDOW_SLOT_BASE + len(used) + 1) if n not in used)
            try:
                vm.set_user_memory_region(slot, w.gpa, w.size, region.host_addr, C.KVM_MEM_READONLY)
            except KvmError as e:
                print(f"pykvm: warning: {dev.name}: cannot map window {w.name} at {w.gpa:#x}: {e}; "
                      "its reads exit instead", file=sys.stderr)
                return
            self._slots[key] = (slot, w, dev.name)
        elif not want and cur is not None:
            del self._slots[key]
            vm.set_user_memory_region(cur[0], w.gpa, 0, 0)

    def _sync_zones(self, dev, live: bool) -> bool:
        """Register or unregister dev's coalesced zones; True when some were dropped (drain again)."""
        m = self.machine
        key = id(dev)
        cur = self._zones.get(key, (dev, []))[1]
        want = []
        if live and self.ring_page and m.vcpus:
            ring_end = (self.ring_page + 1) * 4096
            if len(m.vcpus[0].run_mmap) >= ring_end:
                for gpa, length in getattr(dev, "coalesced", ()):
                    if 1 <= length <= 8 and any(b <= gpa and gpa + length <= b + n for b, n in dev.mmio):
                        want.append((gpa, length))
        for gpa, length in cur:
            if (gpa, length) not in want:
                m.vm.unregister_coalesced_mmio(gpa, length)
        for gpa, length in list(want):
            if (gpa, length) not in cur:
                try:
                    m.vm.register_coalesced_mmio(gpa, length)
                except KvmError as e:  # e.g. out of zones: the writes simply exit
                    want.remove((gpa, length))
                    print(f"pykvm: warning: {dev.name}: cannot coalesce writes at {gpa:#x}: {e}", file=sys.stderr)
        if want:
            self._zones[key] = (dev, want)
        else:
            self._zones.pop(key, None)
        dropped = any(z not in want for z in cur)
        if not dropped:
            self.zone_list = [z for _d, zs in self._zones.values() for z in zs]
        if self.zone_list and self._drainer is None:  # only VMs with coalesced zones pay for the drainer
            self._drainer = threading.Thread(target=self._drain_loop, name="coalesced-drain", daemon=True)
            self._drainer.start()
        return dropped

    def info(self) -> list[dict]:
        """Mapped windows (memslot numbers) and coalesced zones, for stats and tests."""
        with self._lock:
            out = [{"device": name, "window": w.name, "gpa": w.gpa, "size": w.size, "slot": slot}
                   for slot, w, name in sorted(self._slots.values(), key=lambda e: e[0])]
            out += [{"device": d.name, "coalesced": gpa, "size": n} for d, zs in self._zones.values() for gpa, n in zs]
        return out

    def drain(self, on_vcpu: bool = False, strict: bool = True) -> int:
        """Apply the writes KVM queued in the coalesced-MMIO ring, in order; returns how many.

        Called before any slow exit is handled, when all vCPUs are paused (save, dump), when a
        device with coalesced registers leaves D0, and every COALESCED_DRAIN_PERIOD from a thread.
        """
        m = self.machine
        if not self.zone_list or not m.vcpus or not self.ring_page:
            return 0
        mm = m.vcpus[0].run_mmap
        if mm.closed:
            return 0
        with self._ring_lock:
            return memwindow.drain_ring(mm, self.ring_page * 4096, self.zone_list,
                                        self._appliers[on_vcpu, strict], self.ring_stats)

    def _apply(self, addr: int, length: int, value: int, on_vcpu: bool, strict: bool) -> None:
        m = self.machine
        try:
            m.devices.mmio_access(addr, length, True, value)
        except VmEvent as ev:
            if on_vcpu:
                raise  # handled by the vCPU loop with this vCPU's context
            m.handle_event(None, ev)
        except Exception as e:
            hit = m.devices.mmio_lookup(addr)
            dev = hit[0] if hit else None
            why = f"{type(e).__name__}: {e}"
            if not strict:  # the device is leaving D0 already
                print(f"pykvm: {dev.name if dev else 'device'}: coalesced write at {addr:#x} failed: {why}",
                      file=sys.stderr)
            elif dev is None or not m.supervisor.report_failure(dev, why):
                m.finish(Outcome(errors.EXIT_VMM_ERROR, "vmm-error",
                                 f"internal error applying a coalesced write at {addr:#x}"
                                 f"{' to ' + dev.name if dev else ''}: {why}", trigger="vmm-error"))

    def _drain_loop(self) -> None:
        m = self.machine
        while not m.done.wait(COALESCED_DRAIN_PERIOD) and m.vm is not None:
            if m.vcpus:
                try:
                    self.drain()
                except Exception as e:  # never let the drainer die silently
                    m.finish(Outcome(errors.EXIT_VMM_ERROR, "vmm-error",
                                     f"internal error draining coalesced MMIO: {type(e).__name__}: {e}",
                                     trigger="vmm-error"))
                    return
