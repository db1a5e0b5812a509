"""scripts/kvm_unit_tests.py reads unittests.cfg as kvm-unit-tests' own runner does (no suite needed)."""

from __future__ import annotations

import importlib.util

from hypothesis import given
from hypothesis import strategies as st

from .helpers import ROOT

_spec = importlib.util.spec_from_file_location("kvm_unit_tests", ROOT / "scripts" / "kvm_unit_tests.py")
kut = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kut)

CFG = """\
[xapic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,-x2apic,+tsc-deadline
arch = x86_64
timeout = 60

[ioapic]
file = ioapic.flat
smp = 4

[slow]
file = vmx.flat
timeout = 5m

[cmpxchg8b]
file = cmpxchg8b.flat
arch = i386
"""


def test_each_entry_keeps_its_own_timeout_else_the_default(tmp_path):
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text(CFG)
    got = {name: kut.entry_timeout(sec.get("timeout"), 25.0) for name, sec in kut.entries(cfg, [])}
    assert got == {"xapic": 60.0, "ioapic": 25.0, "slow": 300.0}   # the i386 entry is not ours


def test_cpu_option_turns_off_what_qemu_params_turn_off():
    assert kut.cpu_option("-cpu qemu64,-x2apic,+tsc-deadline") == ["--cpu", "host,-x2apic"]
    assert kut.cpu_option("-cpu qemu64,+x2apic") == []


@given(st.text(max_size=12))
def test_any_timeout_text_gives_a_positive_number(text):
    assert 0 < kut.entry_timeout(text, 7.0) < 1e6


def test_test_args_lose_their_quotes_as_the_suites_shell_runner_does():
    # 'vmcall' reaching the guest with its quotes names no test: the run "passes" having run nothing
    assert kut.test_args("'vmcall'") == "vmcall"
    assert kut.test_args('"-pause_filter_test -svm_unsupported_instruction_intercept_test"') == \
        "-pause_filter_test -svm_unsupported_instruction_intercept_test"
    assert kut.test_args("tscdeadline") == "tscdeadline"
    words = kut.test_args('"10000000 `date +%s`"').split()
    assert words[0] == "10000000" and words[1].isdigit()
    assert kut.test_args("'unbalanced") == "'unbalanced"


def test_qemu_pci_devices_become_pykvm_devices():
    assert kut.device_options("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu") == [
        "--device", "pci-host", "--device", "intel-iommu,intremap=on,eim=off", "--device", "edu"]
    assert kut.device_options("-device intel-iommu,intremap=on,caching-mode=on") == ["--device", "intel-iommu,intremap=on"]
    assert kut.device_options("-machine pc -device pc-testdev") == []
