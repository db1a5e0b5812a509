"""Where the tables go: the RSDP in the BIOS scan area, the rest packed into pykvm's ACPI area."""

from __future__ import annotations

from ... import abi
from ...errors import ImageDoesNotFitError
from ...record import record
from . import aml, fadt, madt, sdt, srat
from .topology import Platform, Topology, validate

TABLE_ALIGN = 16


@record(frozen=True)
class AcpiTables:
    """The built tables: (guest-physical address, signature, bytes) each, RSDP first."""

    rsdp_addr: int
    tables: tuple[tuple[int, bytes, bytes], ...]

    def by_signature(self, sig: bytes) -> bytes:
        """The bytes of the table with this signature (b"RSD PTR " for the RSDP)."""
        for _, s, data in self.tables:
            if s == sig:
                return data
        raise KeyError(sig)


class _Packer:
    def __init__(self, base: int, limit: int):
        self.next, self.limit = base, limit
        self.placed: list[tuple[int, bytes, bytes]] = []

    def place(self, sig: bytes, data: bytes, align: int = TABLE_ALIGN) -> int:
        addr = (self.next + align - 1) & -align
        if addr + len(data) > self.limit:
            raise ImageDoesNotFitError(f"ACPI tables need more than the {self.limit - self.next:#x} bytes left "
                                       f"below {self.limit:#x} (too many vCPUs, nodes or memory ranges)")
        self.placed.append((addr, sig, data))
        self.next = addr + len(data)
        return addr


def build_tables(topo: Topology, platform: Platform, rsdp_addr: int = abi.PYKVM_ACPI_RSDP_ADDR,
                 base: int = abi.PYKVM_ACPI_TABLES_ADDR, limit: int = abi.PYKVM_ACPI_END) -> AcpiTables:
    """Validate the inputs, build every table and give each its address; same inputs, same bytes.

    SRAT and SLIT appear only when the topology has nodes: without vNUMA a guest reads no
    NUMA tables and treats all memory as one node, exactly as on a non-NUMA PC.
    """
    validate(topo, platform)
    p = _Packer(base, limit)
    facs_addr = p.place(b"FACS", fadt.facs(), fadt.FACS_ALIGN)
    dsdt_addr = p.place(b"DSDT", aml.dsdt(platform))
    listed = [p.place(b"FACP", fadt.fadt(platform, facs_addr, dsdt_addr)),
              p.place(b"APIC", madt.madt(topo, platform))]
    if topo.nodes:
        listed += [p.place(b"SRAT", srat.srat(topo)), p.place(b"SLIT", srat.slit(topo))]
    xsdt_addr = p.place(b"XSDT", sdt.xsdt(listed))
    rsdt_addr = p.place(b"RSDT", sdt.rsdt(listed))
    root = (rsdp_addr, sdt.RSDP_SIGNATURE, sdt.rsdp(rsdt_addr, xsdt_addr))
    return AcpiTables(rsdp_addr, (root, *p.placed))


def write_tables(mem, tables: AcpiTables) -> None:
    """Copy every table into guest memory (anything with `write(gpa, bytes)`)."""
    for addr, _, data in tables.tables:
        mem.write(addr, data)
