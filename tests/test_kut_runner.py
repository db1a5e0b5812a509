"""scripts/kvm_unit_tests.py reads unittests.cfg as kvm-unit-tests' own runner does (no suite needed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
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


def test_statuses_read_as_the_suites_runner_reads_them():
    # report_summary() returns 77 >> 1 when every test skipped; debug-exit makes that (38 << 1) | 1
    assert kut.verdict((77 >> 1) << 1 | 1) == "SKIP"
    assert kut.verdict(1) == "PASS"
    assert kut.verdict(3) == "FAIL (rc 3)" and kut.verdict(155).startswith("FAIL")
    assert kut.verdict(None) == "TIMEOUT"


def test_check_lines_rule_an_entry_out_unless_every_file_holds_its_value(tmp_path):
    nested, watchdog = tmp_path / "nested", tmp_path / "nmi_watchdog"
    nested.write_text("Y\n")
    watchdog.write_text("1\n")
    assert kut.unmet_check(None) is None and kut.unmet_check("") is None
    assert kut.unmet_check(f"{nested}=Y") is None                     # trailing newline dropped, as $(cat) does
    assert kut.unmet_check(f"{nested}=Y {watchdog}=0") == f"{watchdog} not equal to 0"
    assert kut.unmet_check(f"{tmp_path}/missing=1") == f"{tmp_path}/missing not equal to 1"
    assert kut.unmet_check(f"{nested}=") == f"{nested} not equal to "
    assert kut.unmet_check("=Y") is None                               # no path: nothing to check


@given(st.text(max_size=40))
def test_any_check_line_gives_none_or_a_reason(text):
    got = kut.unmet_check(text, read=lambda path: "1")
    assert got is None or got.endswith(tuple(w.partition("=")[2] for w in text.split()))


def test_nodefault_entries_are_known_by_their_groups(tmp_path):
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text(CFG + "\n[vmx_manual]\nfile = vmx.flat\ngroups = vmx nodefault\ncheck = /proc/x=1\n")
    secs = dict(kut.entries(cfg, []))
    assert [n for n, s in secs.items() if kut.nodefault(s)] == ["vmx_manual"]
    assert secs["vmx_manual"].get("check") == "/proc/x=1"


def test_pykvm_runs_kvm_unit_tests_on_the_pc_preset_plus_the_test_devices():
    from pykvm.devices import registry

    m = kut.PYKVM_MACHINE
    assert m[:2] == ["--machine", "pc"] and m[1] in registry.PRESETS
    added = m[3::2]
    assert added == ["pc-testdev", "pc-testdev-irq"] and not set(added) & set(registry.PRESETS["pc"].devices)


@pytest.mark.kvm
def test_the_runner_runs_what_the_suite_would_and_skips_the_rest(tmp_path):
    from .helpers import guest

    (tmp_path / "x86").mkdir()
    hello = guest("hello")      # powers off: not a debug-exit status, so the suite's runner calls it a failure
    (tmp_path / "x86" / "unittests.cfg").write_text(
        f"[plain]\nfile = {hello}\n\n[manual]\nfile = {hello}\ngroups = nodefault\n\n"
        f"[needs_nested]\nfile = {hello}\ncheck = {tmp_path}/nested=Y\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "kvm_unit_tests.py"), str(tmp_path), "--no-qemu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    table = {cells[0]: cells[1] for cells in ([c.strip() for c in line.strip("|").split(" | ")]
                                              for line in r.stdout.splitlines() if line.startswith("| "))}
    assert table["plain"].startswith("FAIL (rc 0)") and table["test"] == "pykvm"
    assert table["manual"] == "SKIP (manual run only (nodefault))"
    assert table["needs_nested"] == f"SKIP ({tmp_path}/nested not equal to Y)"
