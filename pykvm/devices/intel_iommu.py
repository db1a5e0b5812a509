"""An Intel VT-d IOMMU (legacy mode) at 0xfed90000: DMA remapping, interrupt remapping, queued invalidation.

What it offers is what QEMU's `intel-iommu,intremap=on,eim=off` advertises (version 1.0; 39-bit
second-level tables with 2 MiB/1 GiB pages; queued invalidation, interrupt remapping, pass-through;
no caching mode, no device TLB, no x2APIC mode), learned from the VT-d specification and QEMU's
model; the code is our own.

The model keeps no translation caches: every DMA walks the guest's root, context and page tables
(vtd_tables.py parses and checks each entry) and every remappable MSI reads its IRTE. So the
invalidation commands (register-based or queued) have nothing to drop and complete at once; the
invalidation wait descriptor still writes its status and raises its completion interrupt, since
that is how a driver learns the queue moved.

Guest memory is reached only through `memory` (GuestMemory): an address outside RAM is a fault,
never a host access. Interrupts leave through `deliver(address, data)` (KVM_SIGNAL_MSI).
"""

from __future__ import annotations

import struct
import sys
import threading

from . import vtd_tables as T
from .device import Device

BASE = 0xFED90000
SIZE = 0x1000

VERSION = 0x10                                     # major 1, minor 0
FRO = 0x220                                        # fault-recording registers
IRO = 0xF0                                         # IOTLB registers (IVA, IOTLB)
CAP = (6                                           # ND: 64K domains
       | (0x2 << 8)                                # SAGAW: 39-bit (3-level) tables
       | ((T.HAW - 1) << 16)                       # MGAW
       | ((FRO // 16) << 24)
       | (3 << 34)                                 # SLLPS: 2 MiB and 1 GiB pages
       | (1 << 39)                                 # PSI: page-selective invalidation
       | (18 << 48)                                # MAMV
       | (1 << 54) | (1 << 55))                    # DWD, DRD: write/read draining
ECAP_QI, ECAP_IR, ECAP_PT = 1 << 1, 1 << 3, 1 << 6
ECAP_BASE = ECAP_QI | ECAP_PT | ((IRO // 16) << 8) | (15 << 20)   # MHMV 15

# register offsets
VER, CAP_REG, ECAP_REG, GCMD, GSTS, RTADDR, CCMD = 0x00, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x28
FSTS, FECTL, FEDATA, FEADDR, FEUADDR = 0x34, 0x38, 0x3C, 0x40, 0x44
IQH, IQT, IQA, ICS, IECTL, IEDATA, IEADDR, IEUADDR, IRTA = 0x80, 0x88, 0x90, 0x9C, 0xA0, 0xA4, 0xA8, 0xAC, 0xB8
IVA, IOTLB = IRO, IRO + 8

# global command / status bits (GSTS uses the same positions)
TE, SRTP, SFL, EAFL, WBF, QIE, IRE, SIRTP, CFI = (1 << b for b in (31, 30, 29, 28, 27, 26, 25, 24, 23))
# fault status bits
PFO, PPF, IQE, ICE, ITE = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 6
IM, IP = 1 << 31, 1 << 30                          # event control: interrupt mask, pending
IWC = 1 << 0

U64 = (1 << 64) - 1
LOGGED_FAULTS = 8


class IntelIommu(Device):
    """VT-d remapping hardware unit; `translate`/`dma_read`/`dma_write` for DMA, `interrupt` for MSIs."""

    name = "intel-iommu"

    def __init__(self, memory=None, deliver=None, base: int = BASE, intremap: bool = True, eim: bool = False):
        super().__init__(base=base, intremap=intremap, eim=eim)
        if eim:
            raise ValueError("eim=on (x2APIC interrupt remapping) is not offered; use eim=off")
        self.mmio = [(base, SIZE)]
        self.memory = memory
        self.deliver = deliver or (lambda address, data: None)
        self.intremap = intremap
        self.ecap = ECAP_BASE | (ECAP_IR if intremap else 0)
        self.lock = threading.RLock()
        self.regs = bytearray(SIZE)
        self.wmask = bytearray(SIZE)
        self.w1cmask = bytearray(SIZE)
        self._define()
        self.root_table = None           # latched by SRTP
        self.ir_table = None             # (base, entries) latched by SIRTP
        self.faults = 0                  # host-side account: faults seen (recorded or not)
        self.translations = 0
        self.remapped = 0
        self.lost_events = 0             # fault/completion events whose address is not an interrupt

    # ---------------------------------------------------------------- register file
    def _set(self, off: int, value: int, size: int = 8, wmask: int = 0, w1c: int = 0) -> None:
        self.regs[off:off + size] = value.to_bytes(size, "little")
        self.wmask[off:off + size] = wmask.to_bytes(size, "little")
        self.w1cmask[off:off + size] = w1c.to_bytes(size, "little")

    def _get(self, off: int, size: int = 8) -> int:
        return int.from_bytes(self.regs[off:off + size], "little")

    def _put(self, off: int, value: int, size: int = 8) -> None:
        self.regs[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _define(self) -> None:
        self._set(VER, VERSION, 4)
        self._set(CAP_REG, CAP)
        self._set(ECAP_REG, self.ecap)
        self._set(GCMD, 0, 4, 0xFF800000)                 # write-only commands (reads 0, see mmio_write)
        self._set(GSTS, 0, 4)
        self._set(RTADDR, 0, 8, T.ADDR_MASK)               # legacy root table (TTM 00)
        self._set(CCMD, 0, 8, 0xE0000003FFFFFFFF)          # ICC, CIRG, FM, SID, DID
        self._set(FSTS, 0, 4, 0, PFO | IQE | ICE | ITE)
        self._set(FECTL, IM, 4, IM)
        self._set(FEDATA, 0, 4, 0xFFFF)
        self._set(FEADDR, 0, 4, 0xFFFFFFFC)
        self._set(FEUADDR, 0, 4, 0xFFFFFFFF)
        self._set(IQH, 0, 8)
        self._set(IQT, 0, 8, 0x7FFF0)
        self._set(IQA, 0, 8, T.ADDR_MASK | 7)
        self._set(ICS, 0, 4, 0, IWC)
        self._set(IECTL, IM, 4, IM)
        self._set(IEDATA, 0, 4, 0xFFFF)
        self._set(IEADDR, 0, 4, 0xFFFFFFFC)
        self._set(IEUADDR, 0, 4, 0xFFFFFFFF)
        self._set(IRTA, 0, 8, T.ADDR_MASK | 0xF if self.intremap else 0)
        self._set(IVA, 0, 8, T.ADDR_MASK | 0x7F)
        self._set(IOTLB, 0, 8, 0xB003FFFF00000000)        # IVT, IIRG, DR, DW, DID
        self._set(FRO, 0, 8)                               # the one fault record (NFR = 0)
        self._set(FRO + 8, 0, 8, 0, 1 << 63)               # its F bit is write-1-to-clear

    def mmio_read(self, offset: int, size: int) -> int:
        """Any register, little-endian; GCMD reads 0, undefined offsets read 0."""
        if not 0 <= offset <= SIZE - size:
            return 0
        with self.lock:
            return self._get(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Store the writable bits, clear write-1-to-clear bits, then run the register's command."""
        if not 0 <= offset <= SIZE - size:
            return
        with self.lock:
            for i in range(size):
                b = (value >> (8 * i)) & 0xFF
                o = offset + i
                wm, w1c = self.wmask[o], self.w1cmask[o]
                self.regs[o] = ((self.regs[o] & ~wm) | (b & wm)) & ~(b & w1c) & 0xFF
            end = offset + size
            for reg, handler in ((GCMD, self._gcmd), (CCMD + 4, self._ccmd), (FSTS, self._fsts),
                                 (FECTL, self._fectl), (IQT, self._iqt), (ICS, self._ics), (IECTL, self._iectl),
                                 (IOTLB + 4, self._iotlb), (FRO + 12, self._fsts)):
                if offset < reg + 4 and reg < end:      # the write touched the dword holding the command bits
                    handler()

    # ---------------------------------------------------------------- commands
    def _gcmd(self) -> None:
        cmd = self._get(GCMD, 4)
        self._put(GCMD, 0, 4)
        sts = self._get(GSTS, 4)
        if cmd & SRTP:
            self.root_table = self._get(RTADDR) & T.ADDR_MASK
            sts |= SRTP
        if cmd & SIRTP and self.intremap:
            irta = self._get(IRTA)
            self.ir_table = (irta & T.ADDR_MASK, 1 << ((irta & 0xF) + 1))
            sts |= SIRTP
        for bit in (TE, QIE, IRE, CFI):
            if bit in (IRE, CFI) and not self.intremap:
                continue                                   # intremap=off: no remapping to enable
            if cmd & bit and not sts & bit:
                if bit == QIE:
                    self._put(IQH, 0)                      # enabling the queue starts it at its head
                sts |= bit
            elif not cmd & bit and sts & bit:
                sts &= ~bit
        self._put(GSTS, sts, 4)

    def _ccmd(self) -> None:
        v = self._get(CCMD)
        if v & (1 << 63):                                  # ICC: nothing cached, done at once
            granularity = (v >> 61) & 3
            self._put(CCMD, (v & ~((1 << 63) | (3 << 59))) | (granularity << 59))

    def _iotlb(self) -> None:
        v = self._get(IOTLB)
        if v & (1 << 63):                                  # IVT: nothing cached, done at once
            granularity = (v >> 60) & 3
            self._put(IOTLB, (v & ~((1 << 63) | (3 << 57))) | (granularity << 57))

    def _fsts(self) -> None:
        # PPF mirrors the fault record's F bit; a cleared record makes room again
        fsts = self._get(FSTS, 4) & ~(PPF | 0xFF00)
        if self._get(FRO + 8) >> 63:
            fsts |= PPF
        self._put(FSTS, fsts, 4)

    def _fectl(self) -> None:
        ctl = self._get(FECTL, 4)
        if not ctl & IM and ctl & IP:
            self._put(FECTL, ctl & ~IP, 4)
            self._event(FEADDR, FEDATA)

    def _ics(self) -> None:
        if not self._get(ICS, 4) & IWC:
            self._put(IECTL, self._get(IECTL, 4) & ~IP, 4)   # the pending completion event is gone with IWC

    def _iectl(self) -> None:
        ctl = self._get(IECTL, 4)
        if not ctl & IM and ctl & IP:
            self._put(IECTL, ctl & ~IP, 4)
            self._event(IEADDR, IEDATA)

    def _event(self, addr_reg: int, data_reg: int) -> None:
        address = self._get(addr_reg, 4)
        if address >> 20 != 0xFEE:
            # the event registers must name the interrupt window (no EIM: FEUADDR/IEUADDR are not used);
            # anything else reaches no LAPIC, and the hardware's message goes nowhere
            self.lost_events += 1
            return
        self.deliver(address, self._get(data_reg, 4))

    # ---------------------------------------------------------------- queued invalidation
    def _iqt(self) -> None:
        """Run the descriptors between head and tail, stopping at the first bad one (IQE)."""
        if not self._get(GSTS, 4) & QIE or self._get(FSTS, 4) & IQE:
            return
        iqa = self._get(IQA)
        base, entries = iqa & T.ADDR_MASK, 256 << (iqa & 7)
        tail = (self._get(IQT) >> 4) & 0x7FFF
        head = (self._get(IQH) >> 4) & 0x7FFF
        if tail >= entries:
            self._queue_error()
            return
        for _ in range(entries):
            if head == tail:
                break
            raw = self._guest_read(base + head * 16, 16)
            try:
                if raw is None:
                    raise ValueError("descriptor outside RAM")
                desc = T.InvDescriptor.parse(*struct.unpack("<QQ", raw))
                if desc.kind == T.INV_WAIT:
                    self._wait(desc)
            except ValueError:
                self._put(IQH, head << 4)
                self._queue_error()
                return
            head = (head + 1) % entries
        self._put(IQH, head << 4)

    def _wait(self, desc: T.InvDescriptor) -> None:
        if desc.status_write:
            if self._guest_read(desc.status_address, 4) is None:
                raise ValueError("wait status address outside RAM")
            self.memory.write(desc.status_address, desc.status_data.to_bytes(4, "little"))
        if desc.interrupt:
            self._put(ICS, self._get(ICS, 4) | IWC, 4)
            ctl = self._get(IECTL, 4)
            if ctl & IM:
                self._put(IECTL, ctl | IP, 4)
            else:
                self._event(IEADDR, IEDATA)

    def _queue_error(self) -> None:
        self._put(FSTS, self._get(FSTS, 4) | IQE, 4)
        self._fault_event()

    # ---------------------------------------------------------------- faults
    def _record(self, fault: T.VtdFault, sid: int, write: bool, info: int) -> None:
        """Log a primary fault in the one fault record (unless the entry disabled reporting)."""
        self.faults += 1
        if self.faults <= LOGGED_FAULTS:        # the guest decides how many faults there are: bounded
            more = "; later faults are counted, not logged" if self.faults == LOGGED_FAULTS else ""
            print(f"pykvm: intel-iommu: fault {fault.reason:#x} from {sid:04x} at {info:#x}{more}", file=sys.stderr)
        if fault.fpd:
            return
        with self.lock:
            if self._get(FRO + 8) >> 63:
                self._put(FSTS, self._get(FSTS, 4) | PFO, 4)    # the record is full: overflow
                return
            self._put(FRO, info & ~0xFFF & U64)
            self._put(FRO + 8, (sid & 0xFFFF) | (fault.reason << 32) | ((0 if write else 1) << 62) | (1 << 63))
            self._fsts()
            self._fault_event()

    def _fault_event(self) -> None:
        ctl = self._get(FECTL, 4)
        if ctl & IM:
            self._put(FECTL, ctl | IP, 4)
        else:
            self._event(FEADDR, FEDATA)

    # ---------------------------------------------------------------- DMA remapping
    def _guest_read(self, gpa: int, n: int) -> bytes | None:
        mem = self.memory
        if mem is None or not 0 <= gpa or mem.region_of(gpa, n) is None:
            return None
        return mem.read(gpa, n)

    def _read_u64(self, gpa: int) -> int | None:
        raw = self._guest_read(gpa, 8)
        return None if raw is None else int.from_bytes(raw, "little")

    def _entry(self, gpa: int, reason: int) -> tuple[int, int]:
        raw = self._guest_read(gpa, 16)
        if raw is None:
            raise T.VtdFault(reason)
        return struct.unpack("<QQ", raw)

    def translate(self, sid: int, iova: int, write: bool) -> tuple[int, int]:
        """(guest-physical address, bytes to the end of its page) of a device's DMA address; VtdFault if refused."""
        with self.lock:
            if not self._get(GSTS, 4) & TE:
                return iova, T.PAGE - (iova & (T.PAGE - 1))
            root = self.root_table
        self.translations += 1
        if root is None:
            raise T.VtdFault(T.FR_ROOT_TABLE_INV, iova)
        bus, devfn = (sid >> 8) & 0xFF, sid & 0xFF
        re = T.RootEntry.parse(*self._entry(root + bus * 16, T.FR_ROOT_TABLE_INV))
        ce = T.ContextEntry.parse(*self._entry(re.context_table + devfn * 16, T.FR_CONTEXT_TABLE_INV),
                                  pass_through=bool(self.ecap & ECAP_PT))
        if ce.translation == T.TT_PASS_THROUGH:
            return iova, T.PAGE - (iova & (T.PAGE - 1))
        gpa, size = T.walk(self._read_u64, ce.slptptr, iova, write, ce.fpd)
        return gpa, size - (iova & (size - 1))

    def dma(self, sid: int, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        """The guest-physical (address, length) pieces of a DMA, each wholly RAM; VtdFault (recorded) if refused."""
        pieces = []
        addr, left = iova, length
        try:
            while left > 0:
                gpa, room = self.translate(sid, addr, write)
                n = min(left, room)
                if self.memory is None or self.memory.region_of(gpa, n) is None:
                    raise T.VtdFault(T.FR_WRITE if write else T.FR_READ, addr)
                pieces.append((gpa, n))
                addr += n
                left -= n
        except T.VtdFault as f:
            self._record(f, sid, write, f.address or addr)
            raise
        return pieces

    # ---------------------------------------------------------------- interrupt remapping
    def remap(self, address: int, data: int, sid: int | None) -> tuple[int, int]:
        """The MSI (address, data) the LAPICs get for an interrupt request; VtdFault if it is blocked."""
        with self.lock:
            sts = self._get(GSTS, 4)
            table = self.ir_table
        if not sts & IRE:
            return address, data
        index = T.msi_index(address, data)
        if index is None:
            if sts & CFI:
                return address, data                    # compatibility format passes through (CFIS)
            raise T.VtdFault(T.FR_IR_REQ_COMPAT)
        if table is None:
            raise T.VtdFault(T.FR_IR_ROOT_INVAL)
        base, entries = table
        if index >= entries:
            raise T.VtdFault(T.FR_IR_INDEX_OVER, index << 48)
        raw = self._guest_read(base + index * 16, 16)
        if raw is None:
            raise T.VtdFault(T.FR_IR_ROOT_INVAL, index << 48)
        try:
            irte = T.Irte.parse(*struct.unpack("<QQ", raw))
            irte.verify(sid)
        except T.VtdFault as f:
            f.address = index << 48
            raise
        return irte.message()

    def interrupt(self, address: int, data: int, sid: int | None) -> bool:
        """Remap and deliver one interrupt request; a blocked one is recorded as a fault and dropped."""
        try:
            address, data = self.remap(address, data, sid)
        except T.VtdFault as f:
            self._record(f, 0 if sid is None else sid, True, f.address)
            return False
        self.remapped += 1
        self.deliver(address, data)
        return True

    # ---------------------------------------------------------------- state
    def get_state(self) -> dict:
        """The register file and the latched table pointers."""
        with self.lock:
            return {"regs": self.regs.hex(), "root_table": self.root_table, "ir_table": self.ir_table}

    def set_state(self, state: dict) -> None:
        """Reload what get_state saved (the latched pointers are recomputed from the registers)."""
        regs = bytes.fromhex(state.get("regs", ""))
        if len(regs) != SIZE:
            raise ValueError("intel-iommu state: the register file must be 4 KiB")
        with self.lock:
            self.regs[:] = regs
            self._set(CAP_REG, CAP, 8)
            self._set(ECAP_REG, self.ecap, 8)
            sts = self._get(GSTS, 4)
            self.root_table = self._get(RTADDR) & T.ADDR_MASK if sts & SRTP else None
            irta = self._get(IRTA)
            self.ir_table = (irta & T.ADDR_MASK, 1 << ((irta & 0xF) + 1)) if sts & SIRTP and self.intremap else None
