"""Guest-controlled register values never overflow the VMM's address arithmetic (issue 9)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.memory.pagewalk import EFER_LMA, code_bits, linear_address

from .helpers import guest

U64 = (1 << 64) - 1


@given(st.integers(0, U64), st.integers(0, U64), st.sampled_from([16, 32, 64]))
def test_linear_addresses_always_fit_their_width(base, offset, bits):
    lin = linear_address(base, offset, bits)
    assert 0 <= lin <= (U64 if bits == 64 else 0xFFFFFFFF)


def test_linear_address_wraps_like_the_cpu():
    assert linear_address(0xFFFFF000, 0xFFFFFFFFFFFFFFF0, 64) == 0xFFFFFFFFFFFFFFF0   # base ignored
    assert linear_address(0xFFFFF000, 0x2000, 32) == 0x1000                           # wraps at 4 GiB
    assert linear_address(0xF0000, 0x1FFFF, 16) == 0xFFFFF                             # IP is 16 bits
    assert code_bits(1, EFER_LMA, 1, 0) == 64 and code_bits(1, EFER_LMA, 0, 1) == 32 and code_bits(0, 0, 0, 0) == 16


@pytest.fixture
def machine():
    from pykvm.machine import Machine, MachineConfig

    with Machine(MachineConfig(kernel=guest("hello"), mem=16 << 20, serial_out=None)) as m:
        yield m


@pytest.mark.kvm
@pytest.mark.parametrize("long_mode", [True, False])
def test_trap_with_huge_segment_base_and_stack_pointer_is_a_guest_crash(machine, long_mode):
    """SS base 0xfffff000 + RSP 0xfffffffffffffff0 used to raise OverflowError (status 20)."""
    vcpu = machine.vcpus[0]
    sregs = vcpu.get_sregs()
    sregs.ss.base = 0xFFFFF000
    sregs.cs.base = 0xFFFFF000
    if not long_mode:
        sregs.efer &= ~0x500          # LME, LMA off; paging off so KVM accepts the state
        sregs.cr0 &= ~(1 << 31)
        sregs.cs.l = 0
        sregs.cs.db = 1
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rsp = 0xFFFFFFFFFFFFFFF0
    regs.rip = 0xFFFFFFFFFFFFFFF8
    vcpu.set_regs(regs)
    assert machine.faults.rip_text(vcpu).startswith("RIP 0xfffffffffffffff8")
    machine.faults.firmware_trap(vcpu)
    out = machine.outcome
    assert out is not None and out.status == 16 and out.kind == "crash", out
