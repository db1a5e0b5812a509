"""Rules a reset relies on to leave state out, checked without a VM (the VM-level checks are in
tests/test_reset.py and tests/test_fuzz.py)."""

from __future__ import annotations


def test_xcr0_is_left_alone_only_without_xsave_in_cpuid():
    """A reset skips KVM_SET_XCRS only when the vCPU's CPUID has no XSAVE (XSETBV then faults)."""
    from types import SimpleNamespace

    from pykvm.kvm.abi import ffi
    from pykvm.kvm.vcpu import Vcpu

    def vcpu_with(ecx: int, flags: int = 0):
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": 2, "entries": 2})
        cpuid.entries[0].function, cpuid.entries[0].ecx = 0, 0xFFFFFFFF
        cpuid.entries[1].function, cpuid.entries[1].ecx, cpuid.entries[1].flags = 1, ecx, flags
        return SimpleNamespace(cpuid=cpuid)

    assert Vcpu.cpuid_bit(vcpu_with(1 << 26), 1, 0, "ecx", 26) is True
    assert Vcpu.cpuid_bit(vcpu_with(~(1 << 26) & 0xFFFFFFFF), 1, 0, "ecx", 26) is False
    assert Vcpu.cpuid_bit(SimpleNamespace(cpuid=None), 1, 0, "ecx", 26) is None      # unknown: XCR0 is loaded
    assert Vcpu.cpuid_bit(vcpu_with(1 << 26), 7, 0, "ebx", 0) is False                 # a leaf it lacks
