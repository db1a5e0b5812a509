"""The EOI watchdog's LAPIC register decoding (the thread itself runs in the ioapic guest test)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pykvm.machine.eoi_watch import APIC_IRR, APIC_ISR, lapic_vectors


def _page(vectors_at: dict[int, set[int]]) -> bytes:
    regs = bytearray(1024)
    for base, vectors in vectors_at.items():
        for v in vectors:
            off = base + 16 * (v // 32)
            word = int.from_bytes(regs[off:off + 4], "little") | 1 << (v % 32)
            regs[off:off + 4] = word.to_bytes(4, "little")
    return bytes(regs)


def test_isr_and_irr_are_read_from_their_own_registers():
    regs = _page({APIC_ISR: {0x64}, APIC_IRR: {0x84, 0xFF}})
    assert lapic_vectors(regs, APIC_ISR) == {0x64}
    assert lapic_vectors(regs, APIC_IRR) == {0x84, 0xFF}


@given(st.sets(st.integers(0, 255)), st.sets(st.integers(0, 255)))
def test_any_vector_sets_round_trip(isr, irr):
    regs = bytearray(_page({APIC_ISR: isr, APIC_IRR: irr}))
    for word in range(8):                      # the 12 bytes after each word are reserved: noise there is ignored
        regs[APIC_ISR + 16 * word + 4:APIC_ISR + 16 * word + 16] = b"\xff" * 12
    assert lapic_vectors(bytes(regs), APIC_ISR) == isr
    assert lapic_vectors(bytes(regs), APIC_IRR) == irr


# ------------------------------------------------------------------ the thread, against a stand-in machine
class _Lapic:
    """A vCPU whose LAPIC holds `isr`/`irr` (what KVM_GET_LAPIC would return)."""

    def __init__(self, isr=(), irr=()):
        self.isr, self.irr = set(isr), set(irr)

    def get_lapic(self):
        from pykvm.kvm.abi import ffi

        st = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(st.regs)[:] = _page({APIC_ISR: self.isr, APIC_IRR: self.irr})
        return st


class _Pauser:
    pausing = False


class _Machine:
    def __init__(self, vcpus):
        self.vcpus = vcpus
        self.stopping = False
        self.debugger = None
        self.pauser = _Pauser()
        self.paused = 0
        self.outcome = None

    def call(self, fn, timeout):
        return fn()

    def pause(self, timeout):
        self.paused += 1
        return True

    def resume(self):
        self.paused -= 1

    def finish(self, outcome):
        self.outcome = outcome


def _watched(monkeypatch, vcpus):
    import pykvm.machine.eoi_watch as ew
    from pykvm.devices.ioapic import LEVEL, IoApic

    monkeypatch.setattr(ew, "FIRST_LOOK", 0.001)
    m = _Machine(vcpus)
    watch = ew.EoiWatch(m)
    sent = []
    io = IoApic(deliver=lambda a, d: sent.append(d & 0xFF), on_level_sent=watch.notify)
    watch.ioapic = io
    io.mmio_write(0, 4, 0x10 + 2 * 14)
    io.mmio_write(0x10, 4, 0x9A | LEVEL)
    return m, watch, io, sent


def _wait_for(cond, seconds=20.0):
    import time

    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.005)
    return cond()


def test_a_delivery_no_lapic_holds_is_ended_and_a_high_line_fires_again(monkeypatch):
    m, watch, io, sent = _watched(monkeypatch, [_Lapic(), _Lapic(irr={0x30})])
    watch.start()
    try:
        io.set_irq(14, 1)
        assert _wait_for(lambda: io.recovered >= 1)
        assert sent[:2] == [0x9A, 0x9A] and m.paused == 0 and m.outcome is None
    finally:
        watch.stop()


def test_a_delivery_still_in_an_isr_is_left_to_the_guest(monkeypatch):
    m, watch, io, sent = _watched(monkeypatch, [_Lapic(), _Lapic(isr={0x9A})])
    watch.start()
    try:
        io.set_irq(14, 1)
        assert _wait_for(lambda: watch.probes >= 2)
        assert io.recovered == 0 and sent == [0x9A] and io.outstanding()
    finally:
        watch.stop()


def test_nothing_is_looked_at_while_a_debugger_owns_the_vcpus(monkeypatch):
    m, watch, io, sent = _watched(monkeypatch, [_Lapic()])
    m.debugger = object()
    stale = {14: 1}
    io.set_irq(14, 1)
    assert watch._probe(stale) == [] and m.paused == 0 and io.recovered == 0
