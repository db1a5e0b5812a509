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
