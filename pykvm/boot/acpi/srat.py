"""NUMA tables: the SRAT (which node each vCPU and memory range belongs to) and the SLIT (distances)."""

from __future__ import annotations

import struct

from .sdt import sdt
from .topology import Topology

SRAT_REVISION = 3
SLIT_REVISION = 1
ENABLED = 1 << 0
HOT_PLUGGABLE = 1 << 1
XAPIC_ID_MAX = 0xFE

CPU_AFFINITY = struct.Struct("<BBBBIB3sI")       # type 0, 16 bytes
MEMORY_AFFINITY = struct.Struct("<BBIHQQIIQ")    # type 1, 40 bytes
X2APIC_AFFINITY = struct.Struct("<BBHIIII4x")    # type 2, 24 bytes


def srat(topo: Topology) -> bytes:
    """The SRAT: proximity domain n is node n; hot-add ranges are enabled and hot-pluggable."""
    body = bytearray(struct.pack("<IQ", 1, 0))   # the first reserved field must be 1 for old OSes
    domain_of = {cpu: n for n, node in enumerate(topo.nodes) for cpu in node.cpus}
    for cpu, apic_id in enumerate(topo.apic_ids):
        dom = domain_of[cpu]
        if apic_id <= XAPIC_ID_MAX:
            body += CPU_AFFINITY.pack(0, CPU_AFFINITY.size, dom & 0xFF, apic_id, ENABLED, 0,
                                      (dom >> 8).to_bytes(3, "little"), 0)
        else:
            body += X2APIC_AFFINITY.pack(2, X2APIC_AFFINITY.size, 0, dom, apic_id, ENABLED, 0)
    for dom, node in enumerate(topo.nodes):
        for spans, flags in ((node.memory, ENABLED), (node.hotplug, ENABLED | HOT_PLUGGABLE)):
            for base, length in spans:
                body += MEMORY_AFFINITY.pack(1, MEMORY_AFFINITY.size, dom, 0, base, length, 0, flags, 0)
    return sdt(b"SRAT", SRAT_REVISION, bytes(body))


def slit(topo: Topology) -> bytes:
    """The SLIT: the node distance matrix, row by row, indexed by proximity domain."""
    matrix = topo.distance_matrix()
    return sdt(b"SLIT", SLIT_REVISION, struct.pack("<Q", len(matrix)) + bytes(d for row in matrix for d in row))
