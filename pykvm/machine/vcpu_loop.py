"""The vCPU thread: KVM_RUN, inline port I/O to devices in D0, and every other exit reason."""

from __future__ import annotations

import errno
import struct
import time

from .. import errors
from ..devices import GuestCrash, VmEvent
from ..devices.supervisor import DeviceHung
from ..kvm import KvmError
from ..kvm import constants as C
from ..kvm import exits
from .outcome import Outcome

# kvm_run decoded with the layouts kvm/exits.py derives from the kernel header: exit_reason plus
# io.{direction,size,port,count,data_offset}; io alone; mmio.{phys_addr,data,len,is_write}
_exit_hdr, _EXIT_AT = exits.EXIT_IO, exits.EXIT_AT
_io_hdr, _IO_AT = exits.IO, exits.IO_AT
_mmio_hdr, _MMIO_AT = exits.MMIO, exits.MMIO_AT
_MMIO_DATA = slice(exits.MMIO_DATA, exits.MMIO_DATA + 8)
_SIZED = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


def _bad_port_size(*_args):
    raise GuestCrash("internal-error", "KVM reported port I/O of a size other than 1, 2 or 4 bytes")


# Indexed by kvm_run.io.size (a byte): sizes a port access cannot have stop the VM cleanly.
_UNPACK = [_SIZED[n].unpack_from if n in (1, 2, 4) else _bad_port_size for n in range(256)]
_PACK = [_SIZED[n].pack_into if n in (1, 2, 4) else _bad_port_size for n in range(256)]
_MASK = [(1 << (8 * n)) - 1 for n in range(256)]


def split_access(addr: int, length: int) -> list[tuple[int, int]]:
    """(offset, size) pieces of an access: each 1, 2 or 4 bytes, naturally aligned, covering it in order."""
    pieces = []
    off = 0
    while off < length:
        at = addr + off
        size = 4
        while size > 1 and (size > length - off or at % size):
            size //= 2
        pieces.append((off, size))
        off += size
    return pieces


class VcpuLoop:
    """Runs one machine's vCPUs; one instance serves every vCPU thread."""

    def __init__(self, machine):
        self.machine = machine

    def thread(self, vcpu) -> None:
        """A vCPU thread's body: run until the VM stops; a VMM bug ends the VM as such, never hangs it."""
        m = self.machine
        try:
            self._loop(vcpu)
        except Exception as e:
            import traceback   # here, not at the top: only a failure needs it (held under the sandbox)

            m.finish(Outcome(errors.EXIT_VMM_ERROR, "vmm-error",
                             f"internal error on vCPU {vcpu.index}: {type(e).__name__}: {e}",
                             vcpu=vcpu.index, trigger="vmm-error", details={"traceback": traceback.format_exc()}))

    def _loop(self, vcpu) -> None:
        m = self.machine
        while not m.stopping:
            try:
                self._run_fast(vcpu)
            except VmEvent as ev:
                m.handle_event(vcpu, ev)
            except DeviceHung:
                self._complete_failed_access(vcpu)  # the supervisor already took the device out
            except Exception as e:
                dev = self._device_of_exit(vcpu)
                if dev is None or not m.supervisor.report_failure(dev, f"{type(e).__name__}: {e}"):
                    raise
                self._complete_failed_access(vcpu)

    def _device_of_exit(self, vcpu):
        """The device the vCPU's current I/O exit is addressed to, or None."""
        devices = self.machine.devices
        mm = vcpu.run_mmap
        reason, _d, _s, port, _c, _o = _exit_hdr.unpack_from(mm, _EXIT_AT)
        if reason == C.KVM_EXIT_IO:
            ent = devices.port_map.get(port)
            return ent[0] if ent else None
        if reason == C.KVM_EXIT_MMIO:
            hit = devices.mmio_lookup(_mmio_hdr.unpack_from(mm, _MMIO_AT)[0])
            return hit[0] if hit else None
        return None

    def _complete_failed_access(self, vcpu) -> None:
        """Answer the access that hit a failing model like an absent device: reads get all ones."""
        mm = vcpu.run_mmap
        reason, direction, size, _port, count, off = _exit_hdr.unpack_from(mm, _EXIT_AT)
        if reason == C.KVM_EXIT_IO and not direction and size in (1, 2, 4) and off + size * count <= len(mm):
            mm[off:off + size * count] = b"\xff" * (size * count)
        elif reason == C.KVM_EXIT_MMIO and not _mmio_hdr.unpack_from(mm, _MMIO_AT)[3]:
            mm[_MMIO_DATA] = b"\xff" * 8

    def _run_fast(self, vcpu) -> None:
        """The hot loop: single port I/O to a D0 device is handled inline, all else goes slow."""
        m = self.machine
        run = vcpu.run
        mm = vcpu.run_mmap
        header = _exit_hdr.unpack_from
        exit_at = _EXIT_AT
        unpack = _UNPACK
        pack = _PACK
        masks = _MASK
        reads = m.devices.live_port_reads
        writes = m.devices.live_port_writes
        hot = m.hot_io_exits[vcpu.index]   # [n]: exits this loop handles inline (the slow path counts its own)
        EXIT_IO = C.KVM_EXIT_IO
        extint = m.extint if vcpu.index == 0 else None   # the 8259 pair feeds the BSP's LINT0 only
        while True:
            if extint is not None and extint.output:
                self._offer_extint(vcpu, extint)
            if run():
                if m.stopping:  # EINTR/EAGAIN from a kick
                    return
                if m.pauser.pausing:
                    m.pauser.park(vcpu)
                continue
            reason, direction, size, port, count, off = header(mm, exit_at)
            if reason == EXIT_IO and count == 1:
                if direction:
                    h = writes.get(port)
                    if h is not None:
                        hot[0] += 1
                        h[0](port - h[1], size, unpack[size](mm, off)[0])
                        continue
                else:
                    h = reads.get(port)
                    if h is not None:
                        hot[0] += 1
                        pack[size](mm, off, h[0](port - h[1], size) & masks[size])
                        continue
            self._exit_slow(vcpu, mm, reason)

    def _offer_extint(self, vcpu, pic) -> None:
        """Hand the PIC's vector to KVM once the guest can take it; until then ask KVM for an interrupt-window exit."""
        run = vcpu.run_ptr
        if run.ready_for_interrupt_injection and run.if_flag:
            try:
                vcpu.interrupt(pic.ack())      # acknowledged only now, as INTA happens when the CPU takes it
            except KvmError as e:
                # EEXIST (KVM still holds a vector) cannot follow ready_for_interrupt_injection; anything else is ours
                if e.errno != errno.EEXIST:
                    raise
        if pic.output:
            run.request_interrupt_window = 1          # cleared by the KVM_EXIT_IRQ_WINDOW_OPEN it brings

    def _exit_slow(self, vcpu, mm, reason: int) -> None:
        """Exits the hot loop does not take: string, unclaimed or inactive I/O, MMIO, and the rest."""
        m = self.machine
        counts = m.exit_counts[vcpu.index]
        counts[reason] = counts.get(reason, 0) + 1
        if m.windows.zone_list:
            m.windows.drain(on_vcpu=True)  # writes queued before this exit happened before it
        if reason == C.KVM_EXIT_IO:
            direction, size, port, count, off = _io_hdr.unpack_from(mm, _IO_AT)
            self._io_slow(mm, direction, size, port, count, off)
        elif reason == C.KVM_EXIT_MMIO:
            addr, data, length, is_write = _mmio_hdr.unpack_from(mm, _MMIO_AT)
            self._mmio(mm, addr, data, length, is_write)
        else:
            self._other_exit(vcpu, reason)

    def _io_slow(self, mm, direction, size, port, count, off) -> None:
        """Port I/O through the device manager, one element at a time (string I/O has count > 1)."""
        if size not in (1, 2, 4) or count > 4096 or off + size * count > len(mm):
            raise GuestCrash("internal-error", f"KVM reported malformed port I/O (port {port:#x} size {size} count {count})")
        s = _SIZED[size]
        access = self.machine.devices.port_access
        for i in range(count):
            at = off + i * size
            if direction:
                access(port, size, True, s.unpack_from(mm, at)[0])
            else:
                s.pack_into(mm, at, access(port, size, False))

    def _mmio(self, mm, addr, data, length, is_write) -> None:
        """One MMIO exit. Lengths 1, 2, 4 and 8 reach the device as one access; any other length 1-7 is
        KVM's fragment of a guest access that crossed a page or the end of RAM, split here into
        naturally aligned pieces in address order (see split_access)."""
        devices = self.machine.devices
        s = _SIZED.get(length)
        if s is not None:
            if is_write:
                devices.mmio_access(addr, length, True, s.unpack_from(data)[0])
            else:
                buf = bytearray(8)
                s.pack_into(buf, 0, devices.mmio_access(addr, length, False))
                mm[_MMIO_DATA] = buf
            return
        if not 1 <= length <= 8:
            raise GuestCrash("internal-error", f"KVM reported an MMIO access of {length} bytes at {addr:#x}")
        buf = bytearray(data) if is_write else bytearray(8)
        for off, size in split_access(addr, length):
            piece = _SIZED[size]
            if is_write:
                devices.mmio_access(addr + off, size, True, piece.unpack_from(buf, off)[0])
            else:
                piece.pack_into(buf, off, devices.mmio_access(addr + off, size, False))
        if not is_write:
            mm[_MMIO_DATA] = bytes(buf)

    def _other_exit(self, vcpu, reason: int) -> None:
        """Every exit reason besides port and MMIO I/O."""
        m = self.machine
        run = vcpu.run_ptr
        if reason == C.KVM_EXIT_HLT:
            time.sleep(0.001)  # only without an in-kernel LAPIC, which pykvm always creates
        elif reason == C.KVM_EXIT_IOAPIC_EOI:
            if m.eoi_handler is not None:
                m.eoi_handler(run.eoi.vector)
        elif reason == C.KVM_EXIT_IRQ_WINDOW_OPEN:
            run.request_interrupt_window = 0          # the loop asks again if the PIC still has a vector
        elif reason == C.KVM_EXIT_INTR:
            pass
        elif reason == C.KVM_EXIT_SHUTDOWN:
            m.faults.crash(vcpu, "triple-fault", "triple fault (KVM_EXIT_SHUTDOWN): the guest faulted while "
                           "handling a fault, with no usable IDT or stack")
        elif reason == C.KVM_EXIT_FAIL_ENTRY:
            why = run.fail_entry.hardware_entry_failure_reason
            m.faults.crash(vcpu, "fail-entry", f"VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {why:#x}): "
                           "the guest's CPU state is invalid")
        elif reason == C.KVM_EXIT_INTERNAL_ERROR:
            sub = run.internal.suberror
            name = C.INTERNAL_ERROR_NAMES.get(sub, f"suberror {sub}")
            hint = (" — this host's KVM could not emulate the instruction (nested or software-assisted "
                    "KVM cannot emulate e.g. int3, movbe, xrstor, lock cmpxchg16b)"
                    if sub == C.KVM_INTERNAL_ERROR_EMULATION else "")
            m.faults.crash(vcpu, "internal-error", f"KVM internal error ({name}){hint}")
        elif reason == C.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == C.KVM_SYSTEM_EVENT_CRASH:
                m.faults.crash(vcpu, "system-event-crash", "the host reported a guest crash (KVM_SYSTEM_EVENT_CRASH)")
            elif kind == C.KVM_SYSTEM_EVENT_RESET:
                m.finish(Outcome(errors.EXIT_OK, "reset", "guest requested a reset; pykvm stops instead of rebooting",
                                 vcpu=vcpu.index))
            else:
                m.finish(Outcome(errors.EXIT_OK, "poweroff", "guest powered off", vcpu=vcpu.index))
        elif reason == C.KVM_EXIT_DEBUG and m.debugger is not None:
            m.debugger.debug_exit(vcpu)   # only a gdb stub enables guest debugging
        else:
            name = C.EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
            m.faults.crash(vcpu, "unhandled-exit", f"unhandled exit {name} ({reason})")
