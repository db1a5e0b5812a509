"""Bus doorbells (ioeventfd) and interrupts (MSI routes + irqfd): tables, bindings, a real guest."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from pykvm import abi
from pykvm.bus.doorbell import FIRST_MSI_GSI, Doorbells, Interrupts
from pykvm.kvm import GsiRouting, Kvm, KvmError, constants as C, msi_address
from pykvm.kvm.routing import MAX_IRQ_ROUTES, default_routes
from tests.helpers import guest

# The doorbell guest's channels (guests/doorbell/doorbell.c)
DATA_CHANNEL = 1
IRQ_CHANNEL = 2
GUEST_STATUS = (0x14 << 1) | 1


class FakeVm:
    """Records what the tables and helpers would send to KVM."""

    def __init__(self, irqchip="split"):
        self.fd = 99
        self.irqchip = irqchip
        self.tables = []
        self.ioeventfds = []
        self.gsi_routing = GsiRouting(self, default_routes(irqchip or ""))

    def set_gsi_routing(self, entries):
        self.tables.append(list(entries))

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        self.ioeventfds.append((addr, length, datamatch, pio, deassign))


def _open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def _wait_for(cond, seconds=10.0):
    # A wait for the bus thread to catch up, not a timing assertion: the value is checked after.
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)


# ---------------------------------------------------------------- routing table (no KVM)
def test_default_routes_match_kvms_full_irqchip_table():
    routes = default_routes("full")
    pic = [r for r in routes if r["irqchip"] in (C.KVM_IRQCHIP_PIC_MASTER, C.KVM_IRQCHIP_PIC_SLAVE)]
    ioapic = [r for r in routes if r["irqchip"] == C.KVM_IRQCHIP_IOAPIC]
    assert [(r["gsi"], r["pin"]) for r in ioapic] == [(g, g) for g in range(24)]
    assert [(r["gsi"], r["irqchip"], r["pin"]) for r in pic] == \
        [(g, C.KVM_IRQCHIP_PIC_MASTER if g < 8 else C.KVM_IRQCHIP_PIC_SLAVE, g % 8) for g in range(16)]
    assert default_routes("split") == []


def test_msi_address_and_bounds():
    assert msi_address(0) == 0xFEE00000
    assert msi_address(3) == 0xFEE03000
    for bad in (-1, 256):
        with pytest.raises(ValueError, match="APIC id"):
            msi_address(bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "retarget"]), st.integers(0, 7),
                          st.integers(32, 255)), max_size=30),
       st.sampled_from(["split", "full"]))
def test_every_change_resends_the_whole_table(ops, irqchip):
    vm = FakeVm(irqchip)
    table = GsiRouting(vm, default_routes(irqchip))
    base = default_routes(irqchip)
    model: dict[int, int] = {}              # gsi -> vector
    for op, pick, vector in ops:
        if op == "alloc":
            gsi = table.allocate_msi(msi_address(pick % 4), vector, first=FIRST_MSI_GSI)
            assert gsi == min(set(range(FIRST_MSI_GSI, FIRST_MSI_GSI + 64)) - set(model))
            model[gsi] = vector
        elif model:
            gsi = sorted(model)[pick % len(model)]
            if op == "free":
                table.remove(gsi)
                del model[gsi]
            else:
                table.add_msi(gsi, msi_address(1), vector)
                model[gsi] = vector
        else:
            continue
        sent = vm.tables[-1]
        assert sent[:len(base)] == base             # KVM's pins survive every resend
        msis = {r["gsi"]: r["data"] for r in sent[len(base):]}
        assert msis == model and all(r["type"] == "msi" for r in sent[len(base):])


def test_routing_rejects_out_of_range_values():
    table = GsiRouting(FakeVm())
    with pytest.raises(ValueError, match="GSI"):
        table.add_msi(MAX_IRQ_ROUTES, 0xFEE00000, 0x50)
    with pytest.raises(ValueError, match="MSI"):
        table.add_msi(30, 1 << 64, 0x50)
    assert table.vm.tables == []


def test_doorbells_validate_channel_ids_and_stop_their_thread():
    vm = FakeVm()
    before = threading.active_count()
    fds = _open_fds()
    bells = Doorbells(vm)
    for bad in (-1, 1 << 32, "1"):
        with pytest.raises(ValueError, match="channel id"):
            bells.add(bad, lambda c, n: None)
    bells.add(7, lambda c, n: None)
    with pytest.raises(ValueError, match="already registered"):
        bells.add(7, lambda c, n: None)
    assert vm.ioeventfds == [(abi.PYKVM_PORT_BUS_DOORBELL, 4, 7, True, False)]
    bells.close()
    bells.close()
    assert vm.ioeventfds[-1] == (abi.PYKVM_PORT_BUS_DOORBELL, 4, 7, True, True)
    assert threading.active_count() == before and _open_fds() == fds


def test_a_failing_callback_loses_its_channel_not_the_thread():
    vm = FakeVm()
    errors = []
    with Doorbells(vm, on_error=lambda ch, e: errors.append((ch, str(e)))) as bells:
        got = []
        bells.add(1, lambda c, n: 1 / 0)
        bells.add(2, lambda c, n: got.append(n))
        # Ring the eventfds by hand as KVM would.
        os.eventfd_write(bells._channels[1].fd, 1)
        _wait_for(lambda: errors)
        os.eventfd_write(bells._channels[2].fd, 3)
        _wait_for(lambda: got)
        assert errors == [(1, "division by zero")] and 1 not in bells and got == [3]
        assert bells.stats()["failures"] == [(1, "ZeroDivisionError: division by zero")]
        assert (abi.PYKVM_PORT_BUS_DOORBELL, 4, 1, True, True) in vm.ioeventfds


def test_interrupt_vectors_are_checked():
    irqs = Interrupts(FakeVm())
    for bad in (0, 31, 256):
        with pytest.raises(ValueError, match="vector"):
            irqs.allocate(bad)
    with pytest.raises(ValueError, match="irqchip"):
        Interrupts(FakeVm(irqchip=None))


# ---------------------------------------------------------------- bindings on a real VM
@pytest.fixture
def vm():
    with Kvm.open() as kvm:
        v = kvm.create_vm()
        try:
            yield v
        finally:
            v.close()


@pytest.mark.kvm
def test_ioeventfd_mmio_and_pio_with_and_without_datamatch(vm):
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        for kw in ({"pio": True}, {"pio": True, "datamatch": 5}, {}, {"datamatch": 0}):
            addr = 0x5D8 if kw.get("pio") else 0xD0001000
            vm.ioeventfd(fd, addr, 4, **kw)
            with pytest.raises(KvmError) as e:
                vm.ioeventfd(fd, addr, 4, **kw)
            assert e.value.errno == errno.EEXIST and e.value.ioctl == "KVM_IOEVENTFD"
            vm.ioeventfd(fd, addr, 4, deassign=True, **kw)
            with pytest.raises(KvmError):     # gone: deassigning again finds nothing
                vm.ioeventfd(fd, addr, 4, deassign=True, **kw)
        with pytest.raises(ValueError, match="length"):
            vm.ioeventfd(fd, 0x5D8, 3, pio=True)
        with pytest.raises(ValueError, match="datamatch"):
            vm.ioeventfd(fd, 0x5D8, 1, pio=True, datamatch=0x100)
    finally:
        os.close(fd)


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", ["split", "full"])
def test_routing_irqfd_and_signal_msi_on_a_real_vm(vm, irqchip):
    vm.enable_split_irqchip() if irqchip == "split" else vm.create_irqchip()
    table = vm.gsi_routing
    assert len(table) == (40 if irqchip == "full" else 0)
    gsi = table.allocate_msi(msi_address(0), abi.PYKVM_BUS_VECTOR, first=FIRST_MSI_GSI)
    assert gsi == FIRST_MSI_GSI and table.entries()[-1]["data"] == abi.PYKVM_BUS_VECTOR
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        vm.irqfd(fd, gsi)
        with pytest.raises(KvmError) as e:
            vm.irqfd(fd, gsi)
        assert e.value.errno == errno.EBUSY
        vm.irqfd(fd, gsi, deassign=True)
    finally:
        os.close(fd)
    table.remove(gsi)
    assert gsi not in table


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip", ["split", "full"])
def test_close_returns_fds_and_threads_to_baseline(vm, irqchip):
    vm.enable_split_irqchip() if irqchip == "split" else vm.create_irqchip()
    fds, threads = _open_fds(), threading.active_count()
    bells = Doorbells(vm)
    irqs = Interrupts(vm)
    for ch in range(3):
        bells.add(ch, lambda c, n: None)
    made = [irqs.allocate(0x50 + i, apic_id=0) for i in range(3)]
    assert [i.gsi for i in made] == [24, 25, 26] and threading.active_count() == threads + 1
    for irq in made:
        irq.signal()
    irqs.retarget(made[1], 0x60, 0)
    irqs.free(made[0])
    again = irqs.allocate(0x70)
    assert again.gsi == 24                                 # the freed GSI is reused
    assert len(_open_fds()) == len(fds) + 2 + 3 + 3        # epoll, wake fd, 3 doorbells, 3 irqfds
    bells.close()
    irqs.close()
    assert _open_fds() == fds and threading.active_count() == threads
    assert len(vm.gsi_routing) == (40 if irqchip == "full" else 0)
    # Everything was deassigned: the same registrations succeed again.
    with Doorbells(vm) as bells, Interrupts(vm) as irqs:
        bells.add(0, lambda c, n: None)
        assert irqs.allocate(0x50).gsi == 24
    assert _open_fds() == fds


# ---------------------------------------------------------------- a real guest
def _run_guest(tmp_path, irqchip, n, m, x2apic=False):
    from pykvm.machine import Machine, MachineConfig

    serial = tmp_path / "serial.out"
    out_fd = os.open(serial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    cmdline = f"n={n} m={m}" + (" x2apic" if x2apic else "")
    machine = Machine(MachineConfig(kernel=guest("doorbell"), cmdline=cmdline, irqchip=irqchip,
                                    serial_out=out_fd, timeout=120))
    fds, threads = _open_fds(), threading.active_count()
    try:
        irqs = Interrupts(machine.vm)
        irq = irqs.allocate(abi.PYKVM_BUS_VECTOR, apic_id=0)
        signals = []

        def on_request(channel, count):
            for _ in range(count):
                irq.signal()
            signals.append(count)

        bells = Doorbells(machine.vm)
        bells.add(DATA_CHANNEL, lambda c, k: None)
        bells.add(IRQ_CHANNEL, on_request)
        outcome = machine.run()
        _wait_for(lambda: bells.wakes(DATA_CHANNEL) >= n)
        result = {
            "outcome": outcome,
            "data_wakes": bells.wakes(DATA_CHANNEL),
            "irq_wakes": bells.wakes(IRQ_CHANNEL),
            "signals": sum(signals),
            "io_exits": machine.exit_counts[0].get(C.KVM_EXIT_IO, 0),
            "doorbell_exits": machine.devices.unclaimed[("port", abi.PYKVM_PORT_BUS_DOORBELL, "w")],
        }
        bells.close()
        irqs.close()
        result["leaked_fds"] = sorted(set(_open_fds()) - set(fds))
        result["threads"] = threading.active_count() - threads
    finally:
        machine.close()
        os.close(out_fd)
    result["serial"] = serial.read_text()
    return result


@pytest.mark.kvm
@pytest.mark.parametrize("irqchip,x2apic", [("split", False), ("split", True), ("full", False), ("full", True)])
def test_guest_doorbells_cost_no_exit_and_interrupts_arrive(tmp_path, irqchip, x2apic):
    n, m = 5000, 50
    r = _run_guest(tmp_path, irqchip, n, m, x2apic)
    apic = "x2apic" if x2apic else "xapic"
    assert r["serial"] == (f"doorbell: start n={n} m={m} apic={apic}\n"
                           f"doorbell: rang {n}\n"
                           "doorbell: unregistered rang\n"
                           f"irq: {m} of {m} hook={m}\n"
                           "doorbell: ok\n")
    assert r["outcome"].status == GUEST_STATUS, r["outcome"].reason
    # (a) every registered ring woke the bus thread, none of them exited to the VMM; the one
    # write of an unregistered channel id did exit (and only it: no other port I/O goes slow).
    assert r["data_wakes"] == n
    assert r["doorbell_exits"] == 1 and r["io_exits"] == 1
    # (b) one interrupt per request, each one counted by the guest's handler (serial above)
    assert r["irq_wakes"] == m and r["signals"] == m
    # (c) closing gave back every fd and the thread
    assert r["leaked_fds"] == [] and r["threads"] == 0


def test_the_bus_and_its_doorbells_share_one_lock_so_stats_never_deadlock_a_doorbell():
    """A doorbell callback takes the bus lock under the doorbell lock; stats took them the other way round."""
    import threading
    import time

    from pykvm.bus.doorbell import Doorbells
    from pykvm.bus.host import BusHost

    class NoInterrupts:
        def close(self):
            pass

    doorbells = Doorbells(vm=None)          # no channel is added, so the VM is never touched
    host = BusHost(None, doorbells, NoInterrupts(), [])
    done = []

    def doorbell_thread_like():
        with doorbells.lock:                # what the dispatch thread holds while a callback runs
            time.sleep(0.2)
            with host.lock:                 # what BusHost's callback then takes
                done.append("callback")

    t = threading.Thread(target=doorbell_thread_like, daemon=True)
    t.start()
    time.sleep(0.05)
    snap = threading.Thread(target=lambda: done.append(host.snapshot()["state"]), daemon=True)
    snap.start()                            # `ctl stats` on the machine's main thread
    t.join(5)
    snap.join(5)
    deadlocked = t.is_alive() or snap.is_alive()
    if not deadlocked:                      # a deadlocked pair would block close() too: leave it to die with the run
        doorbells.close()
    assert not deadlocked, "the bus and its doorbell thread deadlocked"
    assert sorted(map(str, done)) == ["callback", "idle"]
