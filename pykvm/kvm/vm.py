"""A KVM virtual machine file descriptor: memory slots, interrupt plumbing, vCPU creation."""

import errno
import os

from . import constants as C
from . import ioctls
from ._sys import FdOwner, ioctl
from .abi import ffi
from .errors import KvmError
from .routing import as_route
from .vcpu import SYNC_ALL, Vcpu


class Vm(FdOwner):
    """A VM file descriptor; ``kvm`` is the Kvm it was created from."""

    def __init__(self, kvm, fd):
        self.kvm = kvm
        self.fd = fd
        self.vcpus = []
        self.irqchip = None          # "full" or "split" once an in-kernel irqchip exists
        self._routing = None

    @property
    def gsi_routing(self):
        """This VM's GsiRouting table (routing.py), seeded with KVM's defaults for its irqchip."""
        if self._routing is None:
            from .routing import GsiRouting, default_routes

            self._routing = GsiRouting(self, default_routes(self.irqchip or ""))
        return self._routing

    def close(self):
        """Close every vCPU created through this VM, then the VM fd (idempotent)."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self):
        return f"<Vm fd={self.fd} vcpus={len(self.vcpus)}>"

    # ---- capabilities ----
    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the VM fd (answers can differ from the system fd's)."""
        return ioctl(self.fd, ioctls.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap, *args, flags=0):
        """KVM_ENABLE_CAP on the VM with up to four 64-bit arguments."""
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        req = ffi.new("struct kvm_enable_cap *", {"cap": cap, "flags": flags, "args": list(args)})
        return ioctl(self.fd, ioctls.KVM_ENABLE_CAP, req,
                     f"KVM_ENABLE_CAP({C.capability_name(cap)})")

    # ---- memory ----
    def set_user_memory_region(self, slot, gpa, size, host_addr, flags=0):
        """KVM_SET_USER_MEMORY_REGION: map ``size`` bytes at host_addr to guest-physical gpa.

        A size of 0 deletes the slot. ``flags``: KVM_MEM_READONLY, KVM_MEM_LOG_DIRTY_PAGES.
        """
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": host_addr})
        ioctl(self.fd, ioctls.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def dirty_log_request(self, slot, bitmap):
        """A prebuilt 'struct kvm_dirty_log *' for fetch_dirty_log: ``bitmap`` (a cdata array, one bit per
        page of the slot, which needs KVM_MEM_LOG_DIRTY_PAGES) receives the pages written since the last
        fetch."""
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot})
        log.dirty_bitmap = ffi.cast("void *", bitmap)
        return log

    def fetch_dirty_log(self, log):
        """KVM_GET_DIRTY_LOG of a dirty_log_request()."""
        ioctl(self.fd, ioctls.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")

    def manual_dirty_protect(self) -> bool:
        """Enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (fetch_dirty_log then neither clears nor write-protects:
        clear_dirty_log does, for the pages it names); False where KVM lacks it (nothing changes)."""
        try:
            if not self.check_extension(C.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
                return False
            self.enable_cap(C.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, C.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        except KvmError:
            return False
        return True

    def clear_dirty_log(self, slot, first_page, num_pages, bitmap):
        """KVM_CLEAR_DIRTY_LOG: clear the dirty bits `bitmap` sets (one per page from first_page, a
        multiple of 64) and write-protect those pages, so the next write to them is logged again."""
        log = ffi.new("struct kvm_clear_dirty_log *", {"slot": slot, "first_page": first_page,
                                                       "num_pages": num_pages})
        log.dirty_bitmap = ffi.cast("void *", bitmap)
        ioctl(self.fd, ioctls.KVM_CLEAR_DIRTY_LOG, log, "KVM_CLEAR_DIRTY_LOG")

    def set_tss_addr(self, addr):
        """KVM_SET_TSS_ADDR: three guest pages Intel VMX needs for real-mode emulation."""
        ioctl(self.fd, ioctls.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr):
        """KVM_SET_IDENTITY_MAP_ADDR: one guest page for the VMX identity page table."""
        ioctl(self.fd, ioctls.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr),
              "KVM_SET_IDENTITY_MAP_ADDR")

    def register_coalesced_mmio(self, addr, size, pio=False):
        """KVM_REGISTER_COALESCED_MMIO: buffer writes to a zone in the ring instead of exiting."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *",
                       {"addr": addr, "size": size, "pio": int(pio)})
        ioctl(self.fd, ioctls.KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def unregister_coalesced_mmio(self, addr, size, pio=False):
        """KVM_UNREGISTER_COALESCED_MMIO for a zone registered with the same arguments."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *",
                       {"addr": addr, "size": size, "pio": int(pio)})
        ioctl(self.fd, ioctls.KVM_UNREGISTER_COALESCED_MMIO, zone,
              "KVM_UNREGISTER_COALESCED_MMIO")

    # ---- interrupt controllers and timers ----
    def create_irqchip(self):
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs (before any vCPU)."""
        ioctl(self.fd, ioctls.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self.irqchip = "full"

    def enable_split_irqchip(self, nr_ioapic_pins=C.KVM_IOAPIC_NUM_PINS):
        """Local APICs in the kernel, PIC/IOAPIC in userspace (KVM_CAP_SPLIT_IRQCHIP)."""
        self.enable_cap(C.KVM_CAP_SPLIT_IRQCHIP, nr_ioapic_pins)
        self.irqchip = "split"

    def create_pit2(self, flags=0):
        """KVM_CREATE_PIT2: in-kernel i8254; flags may hold KVM_PIT_SPEAKER_DUMMY."""
        config = ffi.new("struct kvm_pit_config *", {"flags": flags})
        ioctl(self.fd, ioctls.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq, level):
        """KVM_IRQ_LINE: drive an in-kernel irqchip input (GSI) high (1) or low (0)."""
        req = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        ioctl(self.fd, ioctls.KVM_IRQ_LINE, req, "KVM_IRQ_LINE")

    def signal_msi(self, address, data, devid=None):
        """KVM_SIGNAL_MSI: inject one MSI; >0 if delivered, 0 if no local APIC took it (dropped, as on hardware).

        KVM answers -1 (errno EPERM) when no LAPIC matches the destination -- a lowest-priority
        or logical message while every LAPIC is software-disabled or has another logical ID
        (kvm_irq_delivery_to_apic in arch/x86/kvm/irq_comm.c) -- and 0 when the matching LAPICs
        refused it. The guest chose that destination: a bus drops such a message, so do we.
        """
        msi = ffi.new("struct kvm_msi *", {
            "address_lo": address & 0xFFFFFFFF, "address_hi": (address >> 32) & 0xFFFFFFFF,
            "data": data & 0xFFFFFFFF,
            "flags": 0 if devid is None else C.KVM_MSI_VALID_DEVID, "devid": devid or 0})
        try:
            return ioctl(self.fd, ioctls.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")
        except KvmError as e:
            if e.errno == errno.EPERM:
                return 0
            raise

    def set_gsi_routing(self, entries):
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table.

        Each entry is a dict made by routing.irqchip_route()/msi_route(), or a tuple
        ``("irqchip", gsi, irqchip, pin)`` / ``("msi", gsi, address, data[, devid])``.
        """
        routes = [as_route(e) for e in entries]
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for slot, route in zip(table.entries, routes):
            slot.gsi = route["gsi"]
            if route["type"] == "irqchip":
                slot.type = C.KVM_IRQ_ROUTING_IRQCHIP
                slot.u.irqchip.irqchip = route["irqchip"]
                slot.u.irqchip.pin = route["pin"]
            elif route["type"] == "msi":
                slot.type = C.KVM_IRQ_ROUTING_MSI
                slot.u.msi.address_lo = route["address"] & 0xFFFFFFFF
                slot.u.msi.address_hi = route["address"] >> 32
                slot.u.msi.data = route["data"]
                if route.get("devid") is not None:
                    slot.flags = C.KVM_MSI_VALID_DEVID
                    slot.u.msi.devid = route["devid"]
            else:
                raise ValueError(f"unknown GSI route type {route['type']!r}")
        ioctl(self.fd, ioctls.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    # ---- eventfds: data paths that need no exit to the VMM ----
    def ioeventfd(self, eventfd, addr, length, datamatch=None, pio=False, deassign=False):
        """KVM_IOEVENTFD: a guest write of ``length`` bytes at addr signals ``eventfd``.

        With ``datamatch`` only writes of that value signal; ``pio`` selects the port space.
        ``deassign`` removes a registration made with the same arguments.
        """
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length {length}: must be 0 (any), 1, 2, 4 or 8")
        if datamatch is not None and not 0 <= datamatch < 1 << (8 * (length or 8)):
            raise ValueError(f"ioeventfd datamatch {datamatch:#x} does not fit in {length} bytes")
        flags = 0
        if datamatch is not None:
            flags |= C.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= C.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= C.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length,
            "fd": eventfd, "flags": flags})
        ioctl(self.fd, ioctls.KVM_IOEVENTFD, req, "KVM_IOEVENTFD")

    def irqfd(self, eventfd, gsi, resample_fd=None, deassign=False):
        """KVM_IRQFD: writing ``eventfd`` raises ``gsi``; resample_fd makes it level-triggered.

        ``deassign`` detaches ``eventfd`` from ``gsi`` again (resample needs the full irqchip).
        """
        flags = 0
        if resample_fd is not None:
            flags |= C.KVM_IRQFD_FLAG_RESAMPLE
        if deassign:
            flags |= C.KVM_IRQFD_FLAG_DEASSIGN
        req = ffi.new("struct kvm_irqfd *", {
            "fd": eventfd, "gsi": gsi, "flags": flags, "resamplefd": resample_fd or 0})
        ioctl(self.fd, ioctls.KVM_IRQFD, req, "KVM_IRQFD")

    # ---- clock ----
    def get_clock(self):
        """KVM_GET_CLOCK: a 'struct kvm_clock_data *' (clock in ns, flags, realtime, host_tsc)."""
        data = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, ioctls.KVM_GET_CLOCK, data, "KVM_GET_CLOCK")
        return data

    def set_clock(self, clock_ns, flags=0):
        """KVM_SET_CLOCK: set the kvmclock value in nanoseconds."""
        data = ffi.new("struct kvm_clock_data *", {"clock": clock_ns, "flags": flags})
        ioctl(self.fd, ioctls.KVM_SET_CLOCK, data, "KVM_SET_CLOCK")

    # ---- vCPUs ----
    def _sync_fields(self) -> int:
        """The kvm_run sync-area fields KVM_RUN loads (KVM_CAP_SYNC_REGS: regs, sregs, events), 0 if none."""
        want = SYNC_ALL
        try:
            have = self.check_extension(C.KVM_CAP_SYNC_REGS)
        except KvmError:
            return 0
        return want if have & want == want else 0

    def create_vcpu(self, index):
        """KVM_CREATE_VCPU: a new vCPU with APIC id ``index``, its kvm_run area mapped."""
        fd = ioctl(self.fd, ioctls.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            vcpu = Vcpu(self, fd, index, self.kvm.vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        vcpu.sync_fields = self._sync_fields()
        self.vcpus.append(vcpu)
        return vcpu
