"""The MADT ("APIC"): every LAPIC by APIC id, the IOAPIC when there is one, overrides and LINT1 NMI."""

from __future__ import annotations

import struct

from ... import abi
from .sdt import sdt
from .topology import Platform, Topology

REVISION = 4                  # ACPI 6.0-6.2
PCAT_COMPAT = 1 << 0          # dual 8259s present
ENABLED = 1 << 0
ALL_PROCESSORS_UID = 0xFF
ALL_PROCESSORS_UID32 = 0xFFFFFFFF
XAPIC_ID_MAX = 0xFE           # 0xff is the xAPIC broadcast id: larger ids need x2APIC entries
NMI_LINT = 1                  # LINT1 carries NMI on PCs and in KVM's LAPIC
NMI_FLAGS = 0                 # conforming polarity and trigger

LOCAL_APIC = struct.Struct("<BBBBI")          # type 0, 8 bytes
IO_APIC = struct.Struct("<BBBBII")            # type 1, 12 bytes
OVERRIDE = struct.Struct("<BBBBIH")           # type 2, 10 bytes
LOCAL_APIC_NMI = struct.Struct("<BBBHB")      # type 4, 6 bytes
LOCAL_X2APIC = struct.Struct("<BBHIII")       # type 9, 16 bytes
LOCAL_X2APIC_NMI = struct.Struct("<BBHIB3x")  # type 10, 12 bytes


def madt(topo: Topology, platform: Platform) -> bytes:
    """The MADT; vCPU i has processor UID i."""
    body = bytearray(struct.pack("<II", abi.PYKVM_LAPIC_BASE, PCAT_COMPAT if platform.pic else 0))
    x2apic = False
    for uid, apic_id in enumerate(topo.apic_ids):
        if apic_id <= XAPIC_ID_MAX:
            body += LOCAL_APIC.pack(0, LOCAL_APIC.size, uid, apic_id, ENABLED)
        else:
            body += LOCAL_X2APIC.pack(9, LOCAL_X2APIC.size, 0, apic_id, ENABLED, uid)
            x2apic = True
    if platform.ioapic:
        body += IO_APIC.pack(1, IO_APIC.size, platform.ioapic_id, 0, platform.ioapic_addr, 0)
    for o in platform.overrides:
        body += OVERRIDE.pack(2, OVERRIDE.size, 0, o.source, o.gsi, o.polarity | (o.trigger << 2))
    body += LOCAL_APIC_NMI.pack(4, LOCAL_APIC_NMI.size, ALL_PROCESSORS_UID, NMI_FLAGS, NMI_LINT)
    if x2apic:
        body += LOCAL_X2APIC_NMI.pack(10, LOCAL_X2APIC_NMI.size, NMI_FLAGS, ALL_PROCESSORS_UID32, NMI_LINT)
    return sdt(b"APIC", REVISION, bytes(body))
