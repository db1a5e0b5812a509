"""Guest memory: memfd-backed regions, the guest-physical layout, page-table walks, sparse scans."""

from .guest import GIB, MIB, GuestMemory, plan_ram
from .region import PAGE_SIZE, GuestMemoryError, MemoryRegion

__all__ = ["GIB", "MIB", "PAGE_SIZE", "GuestMemory", "GuestMemoryError", "MemoryRegion", "plan_ram"]
