"""ACPI tables pykvm generates for every guest: RSDP, XSDT/RSDT, FADT, FACS, DSDT, MADT, and SRAT/SLIT with vNUMA."""

from .layout import AcpiTables, build_tables, write_tables
from .topology import (InterruptOverride, Node, Platform, Topology, default_topology, platform_for_irqchip,
                       validate)

__all__ = ["AcpiTables", "InterruptOverride", "Node", "Platform", "Topology", "build_tables",
           "default_topology", "platform_for_irqchip", "validate", "write_tables"]
