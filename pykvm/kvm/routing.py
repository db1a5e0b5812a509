"""The VM's GSI routing table kept in Python, because KVM only takes it whole.

KVM_SET_GSI_ROUTING replaces every route at once, so whoever adds one route must resend
all the others; this object holds them so independent users (MSI interrupts of the bus,
the in-kernel PIC/IOAPIC pins) can add and remove their own without knowing each other.
"""

from __future__ import annotations

import threading

from . import constants as C


def irqchip_route(gsi, irqchip, pin):
    """A GSI routing entry sending ``gsi`` to ``pin`` of an in-kernel irqchip."""
    return {"gsi": gsi, "type": "irqchip", "irqchip": irqchip, "pin": pin}


def msi_route(gsi, address, data, devid=None):
    """A GSI routing entry turning ``gsi`` into an MSI write of ``data`` to ``address``."""
    return {"gsi": gsi, "type": "msi", "address": address, "data": data, "devid": devid}


def as_route(entry):
    """A route entry as a dict (tuples are accepted: see Vm.set_gsi_routing)."""
    # Tuples are a terse spelling: ("irqchip", gsi, chip, pin) or ("msi", gsi, addr, data[, devid]).
    if isinstance(entry, dict):
        return entry
    kind, *rest = entry
    if kind == "irqchip":
        return irqchip_route(*rest)
    if kind == "msi":
        return msi_route(*rest)
    raise ValueError(f"unknown GSI route kind {kind!r} (expected 'irqchip' or 'msi')")


# KVM_MAX_IRQ_ROUTES (include/linux/kvm_host.h on x86, not in the uapi headers): GSIs
# and the table length must stay below it.
MAX_IRQ_ROUTES = 4096
# The in-kernel irqchip's default table: GSIs 0-15 reach both the PIC and the IOAPIC,
# 16-23 the IOAPIC only (as kvm_setup_default_irq_routing builds it).
PIC_GSIS = 16


def default_routes(irqchip: str) -> list[dict]:
    """The routes KVM starts with: PIC + IOAPIC pins for "full", none for "split"."""
    if irqchip != "full":
        return []
    routes = []
    for gsi in range(C.KVM_IOAPIC_NUM_PINS):
        if gsi < PIC_GSIS:
            chip = C.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else C.KVM_IRQCHIP_PIC_SLAVE
            routes.append(irqchip_route(gsi, chip, gsi % 8))
        routes.append(irqchip_route(gsi, C.KVM_IRQCHIP_IOAPIC, gsi))
    return routes


def msi_address(apic_id: int) -> int:
    """The MSI address of a fixed, physical-destination interrupt to ``apic_id``."""
    if not 0 <= apic_id <= 0xFF:
        raise ValueError(f"APIC id {apic_id} is not 0..255 (extended destination ids are not supported)")
    return 0xFEE00000 | (apic_id << 12)


class GsiRouting:
    """The routes of one VM by GSI; ``apply()`` sends the whole table to KVM.

    A GSI may carry several routes (the PIC and the IOAPIC both see GSIs 0-15).
    Methods are safe to call from several threads.
    """

    def __init__(self, vm, routes=()):
        self.vm = vm
        self._routes: dict[int, list[dict]] = {}
        self._lock = threading.Lock()
        for route in routes:
            self._routes.setdefault(route["gsi"], []).append(route)

    def __len__(self):
        return sum(len(r) for r in self._routes.values())

    def __contains__(self, gsi):
        return gsi in self._routes

    def entries(self) -> list[dict]:
        """Every route, ordered by GSI (a copy)."""
        with self._lock:
            return [r for gsi in sorted(self._routes) for r in self._routes[gsi]]

    def add_msi(self, gsi: int, address: int, data: int, devid=None, apply: bool = True) -> None:
        """Route ``gsi`` to an MSI write of ``data`` at ``address`` (replacing its routes)."""
        _check_msi(address, data)
        self._set(gsi, [msi_route(gsi, address, data, devid)], apply)

    def add_irqchip(self, gsi: int, irqchip: int, pin: int, apply: bool = True) -> None:
        """Add a route from ``gsi`` to ``pin`` of an in-kernel irqchip (kept beside others)."""
        self._check_gsi(gsi)
        with self._lock:
            self._routes.setdefault(gsi, []).append(irqchip_route(gsi, irqchip, pin))
        if apply:
            self.apply()

    def remove(self, gsi: int, apply: bool = True) -> None:
        """Drop every route of ``gsi`` (no error when it has none)."""
        with self._lock:
            self._routes.pop(gsi, None)
        if apply:
            self.apply()

    def allocate_msi(self, address: int, data: int, first: int = 0, devid=None) -> int | None:
        """Route the lowest free GSI >= ``first`` as an MSI and apply; that GSI, or None if full."""
        _check_msi(address, data)
        with self._lock:
            gsi = next((g for g in range(first, MAX_IRQ_ROUTES) if g not in self._routes), None)
            if gsi is None:
                return None
            self._routes[gsi] = [msi_route(gsi, address, data, devid)]
        try:
            self.apply()
        except BaseException:
            self.remove(gsi, apply=False)
            raise
        return gsi

    def apply(self) -> None:
        """KVM_SET_GSI_ROUTING with the whole table."""
        with self._lock:
            entries = [r for gsi in sorted(self._routes) for r in self._routes[gsi]]
            if len(entries) > MAX_IRQ_ROUTES:
                raise ValueError(f"{len(entries)} GSI routes: KVM takes at most {MAX_IRQ_ROUTES}")
            self.vm.set_gsi_routing(entries)

    def _set(self, gsi, routes, apply):
        self._check_gsi(gsi)
        with self._lock:
            self._routes[gsi] = routes
        if apply:
            self.apply()

    @staticmethod
    def _check_gsi(gsi):
        if not 0 <= gsi < MAX_IRQ_ROUTES:
            raise ValueError(f"GSI {gsi} is not 0..{MAX_IRQ_ROUTES - 1}")


def _check_msi(address, data):
    if not 0 <= address < 1 << 64 or not 0 <= data < 1 << 32:
        raise ValueError(f"MSI address {address:#x} / data {data:#x} out of range")
