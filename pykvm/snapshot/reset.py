"""Snapshots held in memory, and putting a VM back to one by restoring only what changed since.

take(machine) records, with every vCPU paused: each vCPU's registers, FPU and XSAVE area, XCRs,
MSRs, LAPIC, pending events and MP state (snapshot/state.py's per-vCPU capture), the kvmclock,
every device's state and window images, the access policy's shadow registers, and a pristine
copy of guest RAM (only the parts of each memfd that hold data; the rest reads as zeros).

restore(machine, snap) puts all of that back. RAM is restored page by page, only where it may
differ: the pages KVM's dirty log says the guest wrote (every RAM memslot is re-registered with
KVM_MEM_LOG_DIRTY_PAGES when the first snapshot is taken), plus every range the host handed out
through GuestMemory.view() (device DMA, the API's write_phys, a fuzz input): KVM does not log
writes the VMM itself makes. Views of RAM held across runs (partition bus rings) are not
tracked, which is why channels must be closed at the snapshot; the bus's host side (connection,
GPADLs, offers) is recorded by BusHost.rewind_point() and put back after RAM by BusHost.rewind().

Several snapshots of one machine may coexist: each keeps the set of pages changed since it was
taken, fed by every collection of the dirty log.

What a reset costs, and what it leaves out only where that is provable (the in-process fuzzer
resets between every two inputs; each vCPU ioctl is a system call, dear on a nested host):
  - dirty log: one KVM_GET_DIRTY_LOG per memslot. With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 a page
    written in two collections running (a run's stack, globals, input) is left writable
    (HOT_PAGES per machine): KVM then reports it dirty every time and it is restored every time,
    which costs less than the write fault every run would take on it; other pages are
    write-protected again with one KVM_CLEAR_DIRTY_LOG, only when there are any.
  - regs, sregs and events go into kvm_run's sync area (KVM_CAP_SYNC_REGS), which the next KVM_RUN
    loads: no ioctl (a vCPU ioctl before that run loads them by ioctl first: Vcpu.stage_sync).
  - the TLB flush (a KVM_SET_SREGS with CR3's write-through bit flipped) happens when the run
    wrote a page of the paging structures the snapshot's CR3 reaches, or they could not be
    tracked (see _load_vcpu for why nothing else can be stale).
  - XCR0 is not loaded when the vCPU's CPUID has no XSAVE (the guest cannot change it); the MP
    state is not loaded when the caller knows the vCPU was running (restore(ran=True)) and the
    snapshot's is runnable too; a device is reloaded only when its state differs.
  - XSAVE, MSRs, LAPIC and the TSC deadline go as one prebuilt ioctl sequence; the kvmclock is set.
"""

from __future__ import annotations

import json
import mmap
import struct
import weakref

from ..devices import State, memwindow
from ..kvm import KvmError
from ..kvm import constants as C
from ..kvm.abi import ffi
from ..memory.region import PAGE_SIZE
from .state import EVENTS_VALID, MSR_TSC_DEADLINE, capture_vcpu_structs

CR3_PWT = 1 << 3
_NONZERO = bytes.maketrans(bytes(range(256)), b"\0" + b"\1" * 255)
_BITS = [tuple(i for i in range(8) if v >> i & 1) for v in range(256)]     # set bits of each byte value
TABLE_PAGES_MAX = 4096             # paging-structure pages a snapshot tracks per vCPU (else: flush always)
CR4_PGE, CR4_PCIDE = 1 << 7, 1 << 17
CPUID_1_ECX_XSAVE = 26
_ENTRY = struct.Struct("<Q")
_NONE: frozenset = frozenset()
HOT_RELEARN = 4096                 # collections after which the hot pages are protected again
HOT_PAGES = 32                     # pages per machine left writable under manual dirty-log protection
APIC_TPR = 0x80                    # the task-priority register's offset in struct kvm_lapic_state


class ResetRefused(RuntimeError):
    """The VM cannot be snapshotted or reset to this snapshot (layout or device set changed, VM ending)."""


class _Slot:
    """One RAM region under dirty logging: its memslot and a reusable bitmap buffer."""

    def __init__(self, region, slot: int, vm):
        self.region = region
        self.slot = slot
        self.pages = region.size // PAGE_SIZE
        self.words = (self.pages + 63) // 64
        self.bitmap = ffi.new("uint64_t[]", self.words)
        self.buffer = ffi.buffer(self.bitmap)
        self.log = vm.dirty_log_request(slot, self.bitmap)
        self.clear = ffi.new("uint64_t[]", self.words)     # pages to write-protect again (manual protect)
        self.hot: set[int] = set()         # pages left writable: reported dirty, and restored, every time
        self.last: set[int] = set()        # the pages of the previous collection
        self.collections = 0


class Tracker:
    """A machine's dirty-page tracking: KVM's log for guest writes, GuestMemory's list for the host's."""

    def __init__(self, machine):
        self.machine = machine
        self.slots: list[_Slot] = []
        self.snapshots: weakref.WeakSet = weakref.WeakSet()
        machine.memory.host_writes = []
        machine.memory.host_writes_overflow = False
        # with manual protection a page written in two collections running stays writable from then
        # on (a run's stack, globals, input): restoring it every time costs less than the write fault
        # the guest would take on it every run (the fault is what dominates a short run)
        # (KVM_ENABLE_CAP is set-up only: a VM sandboxed before its first snapshot keeps automatic protection)
        from .. import sandbox

        self.manual = not sandbox.active() and machine.vm.manual_dirty_protect()
        self.hot_room = HOT_PAGES if self.manual else 0
        for region in machine.memory.regions:
            slot = getattr(region, "slot", None)
            if slot is None:
                raise ResetRefused(f"RAM region {region.name} has no memslot number")
            machine.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_addr,
                                              C.KVM_MEM_LOG_DIRTY_PAGES)
            self.slots.append(_Slot(region, slot, machine.vm))

    def layout(self) -> list[tuple[int, int]]:
        """(gpa, size) of every tracked region."""
        return [(s.region.gpa, s.region.size) for s in self.slots]

    def collect(self) -> tuple[list, bool]:
        """Per region, the page indices written since the last collection (a list); True when
        the host's list overflowed."""
        fetch = self.machine.vm.fetch_dirty_log
        out = []
        for s in self.slots:
            fetch(s.log)
            raw = s.buffer[:]
            flags = raw.translate(_NONZERO)        # 1 where the bitmap byte is not 0: found with find()
            pages: list = []
            at = flags.find(1)
            while at >= 0:
                base = at * 8
                for bit in _BITS[raw[at]]:
                    pages.append(base + bit)
                at = flags.find(1, at + 1)
            if self.manual:
                self._protect_again(s, pages)
            out.append(pages)
        mem = self.machine.memory
        if mem.host_writes or mem.host_writes_overflow or mem.held_maps:
            writes, mem.host_writes = mem.host_writes, []
            overflow, mem.host_writes_overflow = mem.host_writes_overflow, False
            for ranges in mem.held_maps.values():        # written at any time: every collection
                writes.extend(ranges)
            for gpa, length in writes:
                for i, s in enumerate(self.slots):
                    r = s.region
                    lo, hi = max(gpa, r.gpa), min(gpa + length, r.end)
                    if lo < hi:
                        out[i].extend(range((lo - r.gpa) // PAGE_SIZE, (hi - r.gpa + PAGE_SIZE - 1) // PAGE_SIZE))
        else:
            overflow = False
        return out, overflow

    def _protect_again(self, s: _Slot, pages: list) -> None:
        """Write-protect this collection's pages again (KVM_CLEAR_DIRTY_LOG), except hot ones; a page
        dirty in the previous collection too becomes hot while there is room."""
        hot, last = s.hot, s.last
        s.collections += 1
        if s.collections % HOT_RELEARN == 0 and hot:
            # hot pages are restored every time whether written or not: now and then protect them
            # again, so pages the inputs no longer write stop costing a copy per reset
            self.hot_room += len(hot)
            s.hot = hot = set()
            s.last = last = _NONE
        elif hot.issuperset(pages):                 # the usual run: it wrote only what every run writes
            s.last = _NONE
            return
        clear = s.clear
        words = []
        for page in pages:
            if page in hot:
                continue
            if page in last and self.hot_room:
                hot.add(page)
                self.hot_room -= 1
                continue
            w = page >> 6
            if not clear[w]:
                words.append(w)
            clear[w] |= 1 << (page & 63)
        s.last = set(pages)
        if words:
            self.machine.vm.clear_dirty_log(s.slot, 0, s.pages, clear)
            for w in words:
                clear[w] = 0

    def feed(self) -> None:
        """Collect, and add what changed to every live snapshot's set."""
        pages, overflow = self.collect()
        snaps = self.snapshots
        for snap in (snaps if len(snaps) == 1 else list(snaps)):
            snap._add(pages, overflow)


def tracker_of(machine) -> Tracker:
    """The machine's tracker, starting dirty logging on first use."""
    t = machine.reset_tracker
    if t is None:
        t = machine.reset_tracker = Tracker(machine)
    return t


class Snapshot:
    """A VM's state at one point, held in this process (see the module docstring)."""

    def __init__(self, machine, tracker: Tracker):
        self._machine = weakref.ref(machine)
        self.tracker = tracker
        self.layout = tracker.layout()
        self.vcpus: list[dict] = []
        self.clock = None
        self.pristine: list[mmap.mmap] = []
        self.devices: list[tuple] = []
        self.policy: dict | None = None
        self.bus = None                     # BusHost.rewind_point(): connection, GPADLs and offers
        self.changed: list[set] = [set() for _ in tracker.slots]
        self.compare_all = False
        self.extents: list[list] = []      # per region, (offset, length) the pristine copy holds data in
        self.resets = 0
        self.regions: tuple = ()            # objects last checked against the layout and device set
        self.device_objects: tuple = ()

    def _add(self, pages: list, overflow: bool) -> None:
        for mine, new in zip(self.changed, pages):
            mine.update(new)
        self.compare_all = self.compare_all or overflow

    def close(self) -> None:
        """Release the pristine copy of RAM (the snapshot cannot be used after)."""
        for p in self.pristine:
            p.close()
        self.pristine = []

    @property
    def ram_bytes(self) -> int:
        """Bytes of RAM the pristine copy holds data for."""
        return self._ram_bytes


def take(machine) -> Snapshot:
    """Snapshot a paused (or not yet started) machine."""
    _check(machine)
    bus = None
    if machine.bus is not None:
        try:
            bus = machine.bus.rewind_point()
        except ValueError as e:
            raise ResetRefused(str(e)) from None
    tracker = tracker_of(machine)
    tracker.feed()       # what was written before now belongs to the snapshot, not to a later reset
    snap = Snapshot(machine, tracker)
    snap.bus = bus
    msr_indices = machine.kvm.msr_index_list()
    for vcpu in machine.vcpus:
        st = capture_vcpu_structs(vcpu, msr_indices)
        flush = ffi.new("struct kvm_sregs *")
        ffi.memmove(flush, st["sregs"], ffi.sizeof("struct kvm_sregs"))
        flush.cr3 ^= CR3_PWT
        st["sregs_flush"] = flush
        st["events"].flags |= EVENTS_VALID
        # sregs' CR8 loaded after the LAPIC (staged: at KVM_RUN) keeps the TPR only when its low nibble is 0
        if vcpu.sync_fields and not ffi.buffer(st["lapic"])[APIC_TPR][0] & 0x0F:
            sync = st["sync"] = ffi.new("struct kvm_sync_regs *")
            sync.regs, sync.sregs, sync.events = st["regs"][0], st["sregs"][0], st["events"][0]
        else:
            st["sync"] = None
        # XCR0 changes only by XSETBV, which faults unless CR4.OSXSAVE is set, which KVM refuses unless
        # the vCPU's CPUID has XSAVE: without it a run cannot change XCR0 and a reset need not load it
        st["xcr0_fixed"] = vcpu.cpuid_bit(1, 0, "ecx", CPUID_1_ECX_XSAVE) is False
        st["tables"] = _table_pages(tracker, st["sregs"])
        st["flushes"] = 0                    # resets that had to flush this vCPU's TLB
        try:
            st["xsave"] = vcpu.get_xsave()
        except KvmError:
            st["xsave"] = None
        snap.vcpus.append(st)
    try:
        snap.clock = machine.vm.get_clock().clock
    except KvmError:
        snap.clock = None
    held = 0
    try:
        for s in tracker.slots:
            r = s.region
            copy = mmap.mmap(-1, r.size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            snap.pristine.append(copy)
            extents = list(r.data_extents())
            snap.extents.append(extents)
            for off, length in extents:
                copy[off:off + length] = r.view[off:off + length]
                held += length
    except BaseException:
        snap.close()
        raise
    snap._ram_bytes = held
    machine.serial.flush()
    for dev in machine.devices.devices:
        if dev.state is not State.D0:
            snap.close()
            raise ResetRefused(f"device {dev.name} is {dev.state.value}, not D0")
        windows = [(w.name, w.mode, memwindow.image_bytes(w)) for w in dev.windows]
        state = json.dumps(dev.get_state())
        snap.devices.append((dev.name, type(dev), state, dev.generation, windows, json.loads(state)))
    policy = getattr(machine, "policy", None)
    if policy is not None and hasattr(policy, "get_state"):
        snap.policy = policy.get_state()
    tracker.snapshots.add(snap)
    return snap


def _table_pages(tracker: Tracker, sregs) -> list[set] | None:
    """Per tracked region, the pages holding the paging structures the snapshot's CR3 reaches; None when
    a reset cannot rely on them (not 4-level paging, global pages or PCIDs on, a table outside RAM,
    more than TABLE_PAGES_MAX tables): then every reset flushes the vCPU's TLB."""
    from ..memory.pagewalk import ADDR_MASK, PTE_P, PTE_PS, paging_mode

    if paging_mode(sregs.cr0, sregs.cr4, sregs.efer) != "4level" or sregs.cr4 & (CR4_PGE | CR4_PCIDE):
        return None
    slots = tracker.slots
    out: list[set] = [set() for _ in slots]
    seen = 0
    todo = [(sregs.cr3 & ADDR_MASK, 4)]
    while todo:
        addr, level = todo.pop()
        for i, s in enumerate(slots):
            r = s.region
            if r.gpa <= addr < r.end:
                break
        else:
            return None
        page = (addr - r.gpa) // PAGE_SIZE
        if page in out[i]:
            continue
        out[i].add(page)
        seen += 1
        if seen > TABLE_PAGES_MAX:
            return None
        if level == 1:
            continue
        off = page * PAGE_SIZE        # read through the region: GuestMemory.view() would log a host write
        for (e,) in _ENTRY.iter_unpack(r.view[off:off + PAGE_SIZE]):
            if e & PTE_P and not (e & PTE_PS and level <= 3):
                todo.append((e & ADDR_MASK, level - 1))
    return out


def _check(machine) -> None:
    if machine.outcome is not None or machine.stopping:
        raise ResetRefused("the VM has ended")
    if machine.config.irqchip != "split":
        raise ResetRefused(f"--irqchip {machine.config.irqchip}: the in-kernel PIC/IOAPIC/PIT state is not "
                           "captured (use --irqchip split)")


def restore(machine, snap: Snapshot, ran: bool = False) -> int:
    """Put a paused (or not yet started) machine back to `snap`; returns how many pages were copied.

    ran: the caller knows every vCPU last left KVM_RUN on an exit it handled while executing guest
    code (and KVM completed it), so each is runnable: the MP state needs no load when the snapshot's
    is runnable too."""
    _check(machine)                          # first: an ended VM has no bus left either
    bus = machine.bus
    if bus is None or snap.bus is None:
        if bus is not None or snap.bus is not None:
            raise ResetRefused("the partition bus came or went since the snapshot")
        return _restore(machine, snap, ran)
    # the bus's host side goes back with guest RAM (the management rings live there), under its lock
    # so that no doorbell is served between the two
    with bus.lock:
        try:
            bus.check_rewind(snap.bus)
        except ValueError as e:
            raise ResetRefused(str(e)) from None
        copied = _restore(machine, snap, ran)
        bus.rewind(snap.bus)
    return copied


def _restore(machine, snap: Snapshot, ran: bool) -> int:
    if snap._machine() is not machine:
        raise ResetRefused("this snapshot was taken of another VM")
    if not snap.pristine:
        raise ResetRefused("this snapshot was closed")
    tracker = snap.tracker
    regions = tuple(machine.memory.regions)
    if regions != snap.regions:      # the same region objects as last time: the layout cannot differ
        if tracker.layout() != [(r.gpa, r.size) for r in regions]:
            raise ResetRefused("guest RAM was hot-added since the snapshot; reset cannot take it away")
        snap.regions = regions
    devices = machine.devices.devices
    if tuple(devices) != snap.device_objects:
        if [(d.name, type(d)) for d in devices] != [(n, t) for n, t, *_ in snap.devices]:
            raise ResetRefused("the device set changed since the snapshot (hot-plug or recovery)")
        snap.device_objects = tuple(devices)
    tracker.feed()
    tables_written = [st["tables"] is None or snap.compare_all
                      or any(not t.isdisjoint(c) for t, c in zip(st["tables"], snap.changed))
                      for st in snap.vcpus]
    copied = _restore_ram(snap)
    if len(tracker.snapshots) > 1:
        for other in list(tracker.snapshots):   # what this reset rewrote changed under every other snapshot
            if other is not snap:
                other._add(snap.changed, False)
    snap.changed = [set() for _ in tracker.slots]
    snap.compare_all = False
    _restore_devices(machine, snap, devices)
    for vcpu, st, written in zip(machine.vcpus, snap.vcpus, tables_written):
        refused = _load_vcpu(vcpu, st, ran, written)
        if st.get("msr_block") is None or refused:    # learnt once: later resets load one prebuilt array
            for index in refused:
                st["msrs"].pop(index, None)
            st["msr_block"] = vcpu.msr_block({i: v for i, v in st["msrs"].items() if i != MSR_TSC_DEADLINE})
            st["plan"] = None
        if st.get("plan") is None:
            _plan(vcpu, st)
    if snap.clock is not None:
        try:
            machine.vm.set_clock(snap.clock)
        except KvmError:
            pass
    snap.resets += 1
    return copied


def _load_vcpu(vcpu, st: dict, ran: bool, tables_written: bool) -> list[int]:
    """One vCPU back to its snapshot (state.load_vcpu_structs' order, fewer ioctls); the MSRs KVM refused."""
    # KVM resets a vCPU's MMU context (and flushes its guest TLB) only when CR0/CR3/CR4/EFER
    # change: a run that rewrote page tables may leave translations the snapshot never had,
    # so CR3 is set once with its write-through bit flipped (this also brings back all else sregs
    # holds, the APIC base among it, before the LAPIC), then for real: by the next KVM_RUN from
    # kvm_run's sync area, with regs and events (no ioctl for those), or by ioctls.
    # The flush is left out only when provably nothing is stale: the run wrote none of the paging
    # structures the snapshot's CR3 reaches (where neither global pages nor PCIDs are on:
    # _table_pages). If the run ends with CR0/CR3/CR4/EFER as at the snapshot, every translation
    # the TLB may hold came from those unchanged tables after the run's last CR3 load or CR4 change
    # (each flushes every non-global entry); if not, loading the snapshot's sregs resets the MMU.
    vcpu.load_staged()                       # a reset before it without a run: KVM holds that one
    sregs = st["sregs"]
    sync = st["sync"]
    if tables_written:
        vcpu.set_sregs(st["sregs_flush"])
        st["flushes"] += 1
    elif sync is not None and vcpu.sregs_now().apic_base != sregs.apic_base:
        vcpu.set_sregs(sregs)                # the APIC base goes back before the LAPIC, as with the flush
    plan = st.get("plan")
    if plan is not None and ran:
        # the rest as one prebuilt sequence (_plan): XCRs, XSAVE, MSRs, LAPIC, TSC deadline
        results = vcpu.ioctl_plan(plan)
        if all(results[i] == n for i, n in st["plan_counts"]):
            vcpu.stage_sync(sync)
            return []
        # KVM refused an MSR it took before: load the long way, which learns what it refuses now
    if sync is None:
        vcpu.set_sregs(st["sregs"])
        vcpu.set_regs(st["regs"])
    if st["xcrs"] is not None and not st["xcr0_fixed"]:
        vcpu.set_xcrs(st["xcrs"])
    if st["xsave"] is not None:
        vcpu.set_xsave(st["xsave"])
    else:
        vcpu.set_fpu(st["fpu"])
    msrs = st["msrs"]
    block = st.get("msr_block")
    if block is not None and vcpu.set_msr_block(block) == block.nmsrs:
        refused = []
    else:
        refused = vcpu.set_msrs({i: v for i, v in msrs.items() if i != MSR_TSC_DEADLINE}, skip_refused=True)
    if not (ran and st["mp_state"] == C.KVM_MP_STATE_RUNNABLE):
        vcpu.set_mp_state(int(st["mp_state"]))
    vcpu.set_lapic(st["lapic"])
    if sync is None:
        vcpu.set_vcpu_events(st["events"])
    deadline = msrs.get(MSR_TSC_DEADLINE)
    if deadline:  # after the LAPIC, whose timer mode it depends on (KVM_SET_LAPIC already disarmed it)
        refused += vcpu.set_msrs({MSR_TSC_DEADLINE: deadline}, skip_refused=True)
    if sync is not None:
        vcpu.stage_sync(sync)     # last: any vCPU ioctl after it would load the staged state by ioctl
    return refused


def _plan(vcpu, st: dict) -> None:
    """Prebuild the ioctls _load_vcpu issues after a run that left the vCPU runnable, when it can: staged
    regs, a runnable snapshot (no MP state load), an MSR block KVM took whole."""
    from ..kvm import ioctls

    st["plan"] = None
    if st["sync"] is None or st["mp_state"] != C.KVM_MP_STATE_RUNNABLE or st.get("msr_block") is None:
        return
    plan, counts = [], []
    if st["xcrs"] is not None and not st["xcr0_fixed"]:
        plan.append((ioctls.KVM_SET_XCRS, st["xcrs"], "KVM_SET_XCRS"))
    if st["xsave"] is not None:
        plan.append((ioctls.KVM_SET_XSAVE, st["xsave"], "KVM_SET_XSAVE"))
    else:
        plan.append((ioctls.KVM_SET_FPU, st["fpu"], "KVM_SET_FPU"))
    block = st["msr_block"]
    counts.append((len(plan), block.nmsrs))
    plan.append((ioctls.KVM_SET_MSRS, block, "KVM_SET_MSRS"))
    plan.append((ioctls.KVM_SET_LAPIC, st["lapic"], "KVM_SET_LAPIC"))
    deadline = st["msrs"].get(MSR_TSC_DEADLINE)
    if deadline:
        counts.append((len(plan), 1))
        plan.append((ioctls.KVM_SET_MSRS, vcpu.msr_block({MSR_TSC_DEADLINE: deadline}), "KVM_SET_MSRS"))
    st["plan"], st["plan_counts"] = plan, counts


def _restore_ram(snap: Snapshot) -> int:
    copied = 0
    for s, pristine, pages, extents in zip(snap.tracker.slots, snap.pristine, snap.changed, snap.extents):
        view = s.region.view
        if snap.compare_all:
            pages = _differing_pages(view, pristine, extents + list(s.region.data_extents()))
        run_start = run_end = -1
        for page in sorted(pages):
            if page == run_end:
                run_end += 1
                continue
            if run_start >= 0:
                copied += _copy(view, pristine, run_start, run_end)
            run_start, run_end = page, page + 1
        if run_start >= 0:
            copied += _copy(view, pristine, run_start, run_end)
    return copied


def _copy(view, pristine, first: int, end: int) -> int:
    a, b = first * PAGE_SIZE, end * PAGE_SIZE
    view[a:b] = pristine[a:b]
    return end - first


def _differing_pages(view, pristine, extents) -> set[int]:
    """Pages of a region whose bytes differ from the pristine copy (the host's list overflowed); only
    `extents` can differ: elsewhere both the memfd and the copy hold no data and read as zeros."""
    out = set()
    step = 256 * PAGE_SIZE
    for off, length in extents:
        for at in range(off - off % PAGE_SIZE, off + length, step):
            end = min(at + step, off + length, len(view))
            cur, old = bytes(view[at:end]), pristine[at:end]
            if cur == old:
                continue
            for p in range(0, len(cur), PAGE_SIZE):
                if cur[p:p + PAGE_SIZE] != old[p:p + PAGE_SIZE]:
                    out.add((at + p) // PAGE_SIZE)
    return out


def _restore_devices(machine, snap: Snapshot, devices) -> None:
    for dev, (name, _cls, state, generation, windows, parsed) in zip(devices, snap.devices):
        if dev.state is not State.D0:
            raise ResetRefused(f"device {name} is {dev.state.value}, not D0")
        if dev.get_state() != parsed:      # most runs touch no device: reading is cheaper than loading
            dev.set_state(json.loads(state))
        dev.generation = generation
        for w, (wname, mode, image) in zip(dev.windows, windows):
            memwindow.set_mode(dev, w, mode)
            memwindow.load_image(w, image)
    policy = getattr(machine, "policy", None)
    if snap.policy is not None and policy is not None:
        policy.set_state(snap.policy)
