"""The in-memory structures of Intel VT-d (legacy mode) as the guest writes them, parsed and checked.

Layouts follow the VT-d specification (learned from it and QEMU's model; own code): root and
context entries, second-level page-table entries, interrupt-remapping table entries (IRTE),
remappable-format MSI addresses and queued-invalidation descriptors. Every function here takes the
raw 64-bit words the guest left in its RAM and either returns a small frozen record or raises
VtdFault with the specification's fault reason, so nothing the guest writes reaches the model
unchecked. Nothing here touches guest memory: `walk` reads table entries through a callable.
"""

from __future__ import annotations

from ..record import record
from typing import Callable

PAGE = 0x1000
HAW = 39                       # host address width the model advertises (MGAW too)
ADDR_MASK = ((1 << HAW) - 1) & ~(PAGE - 1)
LEVELS = 3                     # 39-bit second-level tables: the only SAGAW advertised
AW_39 = 1                      # context entry AW encoding of a 3-level table

# fault reasons (VT-d spec, "Fault Reasons" table)
FR_ROOT_ENTRY_P = 0x1
FR_CONTEXT_ENTRY_P = 0x2
FR_CONTEXT_ENTRY_INV = 0x3
FR_ADDR_BEYOND_MGAW = 0x4
FR_WRITE = 0x5
FR_READ = 0x6
FR_PAGING_ENTRY_INV = 0x7      # a next-level table address that is not RAM
FR_ROOT_TABLE_INV = 0x8
FR_CONTEXT_TABLE_INV = 0x9
FR_ROOT_ENTRY_RSVD = 0xA
FR_CONTEXT_ENTRY_RSVD = 0xB
FR_PAGING_ENTRY_RSVD = 0xC
FR_CONTEXT_ENTRY_TT = 0xD
FR_IR_REQ_RSVD = 0x20
FR_IR_INDEX_OVER = 0x21
FR_IR_ENTRY_P = 0x22
FR_IR_ROOT_INVAL = 0x23
FR_IR_IRTE_RSVD = 0x24
FR_IR_REQ_COMPAT = 0x25
FR_IR_SID_ERR = 0x26

TT_UNTRANSLATED, TT_DEV_IOTLB, TT_PASS_THROUGH = 0, 1, 2
PTE_R, PTE_W, PTE_PS = 1 << 0, 1 << 1, 1 << 7
U64 = (1 << 64) - 1


class VtdFault(Exception):
    """A translation or remapping the hardware would refuse: `reason` is the spec's fault reason."""

    def __init__(self, reason: int, address: int = 0, fpd: bool = False):
        super().__init__(f"VT-d fault {reason:#x} at {address:#x}")
        self.reason = reason
        self.address = address
        self.fpd = fpd             # the context entry or IRTE asked for the fault not to be recorded


def _u64(v: int) -> int:
    if not isinstance(v, int) or not 0 <= v <= U64:
        raise ValueError(f"{v!r} is not a 64-bit word")
    return v


@record(frozen=True)
class RootEntry:
    """A legacy-mode root entry: the context table of one bus."""

    context_table: int

    @classmethod
    def parse(cls, lo: int, hi: int) -> "RootEntry":
        """Check present and reserved bits (the upper quadword is reserved in legacy mode)."""
        lo, hi = _u64(lo), _u64(hi)
        if not lo & 1:
            raise VtdFault(FR_ROOT_ENTRY_P)
        if lo & 0xFFE or lo & ~((1 << HAW) - 1) or hi:
            raise VtdFault(FR_ROOT_ENTRY_RSVD)
        return cls(lo & ADDR_MASK)


@record(frozen=True)
class ContextEntry:
    """A legacy-mode context entry: how one device function's DMA is translated."""

    fpd: bool
    translation: int               # TT_*
    slptptr: int
    address_width: int
    domain: int

    @classmethod
    def parse(cls, lo: int, hi: int, pass_through: bool = True) -> "ContextEntry":
        """Check present, reserved bits, translation type and address width."""
        lo, hi = _u64(lo), _u64(hi)
        fpd = bool(lo & 2)
        if not lo & 1:
            raise VtdFault(FR_CONTEXT_ENTRY_P, fpd=fpd)
        if lo & 0xFF0 or lo & ~((1 << HAW) - 1) or hi & (1 << 7) or hi >> 24:
            raise VtdFault(FR_CONTEXT_ENTRY_RSVD, fpd=fpd)
        tt = (lo >> 2) & 3
        if tt == TT_DEV_IOTLB or tt == 3 or (tt == TT_PASS_THROUGH and not pass_through):
            raise VtdFault(FR_CONTEXT_ENTRY_TT, fpd=fpd)   # no device-TLB support (ECAP.DT = 0)
        aw = hi & 7
        if tt != TT_PASS_THROUGH and aw != AW_39:
            raise VtdFault(FR_CONTEXT_ENTRY_INV, fpd=fpd)  # only the 39-bit width is in SAGAW
        return cls(fpd, tt, lo & ADDR_MASK, aw, (hi >> 8) & 0xFFFF)


def walk(read_u64: Callable[[int], int | None], table: int, iova: int, write: bool, fpd: bool = False) -> tuple[int, int]:
    """(guest-physical address, page size) of `iova` through a 3-level second-level table at `table`.

    `read_u64(gpa)` returns the entry at gpa or None when gpa is not RAM. Every level must grant
    the access (R for reads, W for writes); 2 MiB and 1 GiB leaves are allowed (CAP.SLLPS).
    """
    if not 0 <= iova < (1 << HAW):
        raise VtdFault(FR_ADDR_BEYOND_MGAW, iova, fpd)
    need = PTE_W if write else PTE_R
    for level in range(LEVELS, 0, -1):
        shift = 12 + 9 * (level - 1)
        entry = read_u64(table + ((iova >> shift) & 0x1FF) * 8)
        if entry is None:
            raise VtdFault(FR_PAGING_ENTRY_INV, iova, fpd)
        entry = _u64(entry)
        if not entry & (PTE_R | PTE_W) or not entry & need:
            raise VtdFault(FR_WRITE if write else FR_READ, iova, fpd)
        if entry & ~((1 << HAW) - 1) & ((1 << 52) - 1):
            raise VtdFault(FR_PAGING_ENTRY_RSVD, iova, fpd)
        leaf = level == 1 or entry & PTE_PS
        if leaf:
            size = 1 << shift
            base = entry & ADDR_MASK
            if base & (size - 1):
                raise VtdFault(FR_PAGING_ENTRY_RSVD, iova, fpd)   # a large page's low address bits are reserved
            return base | (iova & (size - 1)), size
        table = entry & ADDR_MASK
    raise AssertionError("unreachable: level 1 is always a leaf")


@record(frozen=True)
class Irte:
    """An interrupt-remapping table entry in remapped (not posted) mode, xAPIC destination."""

    fpd: bool
    dest_mode: int
    redir_hint: int
    trigger: int
    delivery: int
    vector: int
    dest: int
    sid: int
    sq: int
    svt: int

    @classmethod
    def parse(cls, lo: int, hi: int, eim: bool = False) -> "Irte":
        """Check present, reserved bits and mode (posted interrupts are not offered)."""
        lo, hi = _u64(lo), _u64(hi)
        fpd = bool(lo & 2)
        if not lo & 1:
            raise VtdFault(FR_IR_ENTRY_P, fpd=fpd)
        dst = lo >> 32
        dst_rsvd = 0 if eim else dst & ~0xFF00       # xAPIC mode: the APIC ID sits in DST[15:8]
        if lo & 0x7000 or lo & (1 << 15) or (lo >> 24) & 0xFF or dst_rsvd or hi >> 20:
            raise VtdFault(FR_IR_IRTE_RSVD, fpd=fpd)
        svt = (hi >> 18) & 3
        if svt == 3:
            raise VtdFault(FR_IR_IRTE_RSVD, fpd=fpd)
        return cls(fpd, (lo >> 2) & 1, (lo >> 3) & 1, (lo >> 4) & 1, (lo >> 5) & 7, (lo >> 16) & 0xFF,
                   dst if eim else (dst >> 8) & 0xFF, hi & 0xFFFF, (hi >> 16) & 3, svt)

    def verify(self, sid: int | None) -> None:
        """Source-ID check of the request; None (an IOAPIC, no requester ID) is not checked."""
        if sid is None or self.svt == 0:
            return
        if self.svt == 1:
            mask = (0xFFFF, 0xFFFB, 0xFFF9, 0xFFF8)[self.sq]    # SQ: function bits left out
            if (sid ^ self.sid) & mask:
                raise VtdFault(FR_IR_SID_ERR, fpd=self.fpd)
        elif not (self.sid >> 8) <= (sid >> 8) <= (self.sid & 0xFF):
            raise VtdFault(FR_IR_SID_ERR, fpd=self.fpd)        # SVT 2: the requester's bus in a range

    def message(self) -> tuple[int, int]:
        """The compatibility-format MSI (address, data) this entry sends to the local APICs."""
        address = 0xFEE00000 | ((self.dest & 0xFF) << 12) | (self.redir_hint << 3) | (self.dest_mode << 2)
        data = self.vector | (self.delivery << 8) | (self.trigger << 15)
        if self.trigger:
            data |= 1 << 14                  # a level interrupt is sent asserted
        return address, data


def msi_index(address: int, data: int) -> int | None:
    """The IRTE index a remappable-format MSI names, None for a compatibility-format one."""
    if not 0 <= address <= U64 or not 0 <= data <= 0xFFFFFFFF:
        raise VtdFault(FR_IR_REQ_RSVD)
    if not address & (1 << 4):
        return None
    if address >> 32 or (address >> 20) != 0xFEE:
        raise VtdFault(FR_IR_REQ_RSVD)
    index = ((address >> 5) & 0x7FFF) | (((address >> 2) & 1) << 15)
    if address & (1 << 3):                           # SHV: the data's low 16 bits add a subhandle
        index = (index + (data & 0xFFFF)) & 0xFFFF
    # without SHV the data is not looked at: an IOAPIC's request carries its entry's vector there
    return index


# queued-invalidation descriptor types (128-bit descriptors)
INV_CONTEXT, INV_IOTLB, INV_DEVICE_IOTLB, INV_IEC, INV_WAIT = 1, 2, 3, 4, 5
WAIT_IF, WAIT_SW, WAIT_FN = 1 << 4, 1 << 5, 1 << 6


@record(frozen=True)
class InvDescriptor:
    """One invalidation descriptor; for a wait descriptor, what to do on completion."""

    kind: int
    interrupt: bool = False
    status_write: bool = False
    status_data: int = 0
    status_address: int = 0

    @classmethod
    def parse(cls, lo: int, hi: int) -> "InvDescriptor":
        """Check type and reserved bits; raises ValueError for what the hardware reports as IQE."""
        lo, hi = _u64(lo), _u64(hi)
        kind = lo & 0xF
        if lo & 0xE00:
            raise ValueError(f"descriptor type {(lo >> 5) & 0x70 | kind:#x} is not a legacy type")
        if kind in (INV_CONTEXT, INV_IOTLB, INV_IEC):
            return cls(kind)                 # the model caches nothing: these complete at once
        if kind == INV_WAIT:
            if lo & 0xFFFFFF80 or hi & 3:
                raise ValueError("wait descriptor with reserved bits set")
            return cls(kind, bool(lo & WAIT_IF), bool(lo & WAIT_SW), lo >> 32, hi & ~3)
        raise ValueError(f"descriptor type {kind:#x} not supported")
