"""The pieces every ACPI table shares: the 36-byte header, checksums, generic addresses, and the root tables."""

from __future__ import annotations

import struct

OEM_ID = b"PYKVM "           # 6 bytes, in every header and the RSDP
OEM_TABLE_ID = b"PYKVM   "   # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"PYKV"
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")
HEADER_SIZE = HEADER.size    # 36
CHECKSUM_OFFSET = 9

RSDP_SIGNATURE = b"RSD PTR "
RSDP_V1_SIZE = 20
RSDP_SIZE = 36
RSDP = struct.Struct("<8sB6sBIIQB3x")

GAS = struct.Struct("<BBBBQ")   # generic address structure, 12 bytes
SPACE_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3


def checksum(data: bytes) -> int:
    """The byte that makes `data` plus it sum to zero modulo 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete system description table: header (with length and checksum) followed by `body`."""
    table = bytearray(HEADER.pack(signature, HEADER_SIZE + len(body), revision, 0, OEM_ID, OEM_TABLE_ID,
                                  OEM_REVISION, CREATOR_ID, CREATOR_REVISION) + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def gas_io(port: int, length: int, access: int) -> bytes:
    """A generic address naming `length` bytes of I/O ports at `port` (all zero when port is 0)."""
    if not port:
        return bytes(GAS.size)
    return GAS.pack(SPACE_IO, length * 8, 0, access, port)


def xsdt(addresses: list[int]) -> bytes:
    """The XSDT: 64-bit pointers to every table but the FACS and DSDT (the FADT points at those)."""
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


def rsdt(addresses: list[int]) -> bytes:
    """The RSDT, the XSDT's 32-bit twin for ACPI 1.0 parsers."""
    return sdt(b"RSDT", 1, b"".join(struct.pack("<I", a) for a in addresses))


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """The ACPI 2.0+ root pointer: checksum over its first 20 bytes and an extended one over all 36."""
    raw = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, 2, rsdt_addr, RSDP_SIZE, xsdt_addr, 0))
    raw[8] = checksum(raw[:RSDP_V1_SIZE])
    raw[32] = checksum(raw)
    return bytes(raw)
