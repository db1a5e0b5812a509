"""`--machine minimal|pc`: the presets live in the registry, `pykvm devices` lists them, `--device` adds
to them, an unknown one is a usage error naming the known ones, and `pc` gives a guest the PC platform."""

from __future__ import annotations

import pytest

from pykvm.devices import registry

from .helpers import pykvm


def test_minimal_is_the_default_set_and_pc_adds_the_pc_platform():
    assert registry.DEFAULT_PRESET == "minimal"
    assert registry.preset_devices("minimal") == []
    assert [n for n, _o in registry.preset_devices("pc")] == ["ioapic", "pic", "pit", "rtc", "acpi-pm", "i8042"]
    for preset in registry.PRESETS.values():          # every name a preset gives is a registry type
        assert set(preset.devices) <= set(registry.TYPES) and set(preset.in_kernel) <= set(preset.devices)


def test_the_in_kernel_irqchip_keeps_its_own_pic_pit_and_ioapic():
    assert [n for n, _o in registry.preset_devices("pc", "full")] == ["rtc", "acpi-pm", "i8042"]


def test_a_device_named_again_is_built_once_with_its_own_options():
    got = registry.with_preset("pc", "split", [("rtc", {"x": "1"}), ("pc-testdev", {})])
    assert [n for n, _o in got].count("rtc") == 1
    assert ("rtc", {"x": "1"}) in got and got[-1] == ("pc-testdev", {})
    assert registry.with_preset("minimal", "split", [("pit", {})]) == [("pit", {})]


@pytest.mark.parametrize("name", ["", "PC", "q35", None, 3])
def test_an_unknown_preset_names_the_known_ones(name):
    with pytest.raises(registry.DeviceSpecError, match="known: minimal, pc"):
        registry.preset_devices(name)


def test_pykvm_devices_lists_the_presets_with_what_they_add():
    r = pykvm("devices")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    lines = {line.split()[0]: line for line in out.split("machine presets", 1)[1].splitlines()[1:] if line}
    assert set(lines) == set(registry.PRESETS)
    assert lines["pc"].split()[1:7] == ["ioapic", "pic", "pit", "rtc", "acpi-pm", "i8042"]


@pytest.mark.parametrize("extra", [(), ("--cpus", "1", "--cpus", "1")], ids=["fast-path", "click"])
def test_an_unknown_preset_is_a_usage_error_with_the_list(extra):
    r = pykvm("run", "hello", "--machine", "q35", *extra, "--no-dump")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "--machine 'q35'" in err and "known: minimal, pc" in err, err


@pytest.mark.kvm
@pytest.mark.parametrize("mode, out", [("pit-pic", "pit-pic: 5 ticks\n"), ("rtc", "rtc: present\n")])
def test_pc_gives_the_guest_the_pic_pit_and_rtc(mode, out, tmp_path):
    r = pykvm("run", "pc-irq", "--machine", "pc", "--cmdline", mode, "--timeout", "30", "--no-dump", timeout=90)
    assert (r.stdout.decode(), r.returncode) == (out, 0), r.stderr.decode()


@pytest.mark.kvm
def test_minimal_has_no_rtc():
    r = pykvm("run", "pc-irq", "--cmdline", "rtc", "--timeout", "30", "--no-dump", timeout=90)
    assert (r.stdout.decode(), r.returncode) == ("rtc: absent\n", 4 << 1 | 1)


@pytest.mark.kvm
def test_pc_tables_describe_the_ioapic_the_8259s_and_the_pm_timer():
    r = pykvm("run", "acpi", "--machine", "pc", "--timeout", "30", "--no-dump", timeout=90)
    out = r.stdout.decode()
    assert r.returncode == 0, (out, r.stderr.decode())
    assert "madt: lapic 0xfee00000 pcat 1\n" in out and "madt: 1 cpus, 1 ioapics\n" in out
    assert "fadt: sci 9 pm1a_evt 0x600 pm1a_cnt 0x604 pm_tmr 0x608 hw_reduced 0\n" in out


@pytest.mark.kvm
def test_device_adds_to_pc_and_pc_works_with_the_in_kernel_irqchip():
    r = pykvm("run", "pc-irq", "--machine", "pc", "--device", "pit", "--device", "pc-testdev-irq",
              "--cmdline", "retrigger", "--timeout", "30", "--no-dump", timeout=90)
    assert (r.stdout.decode(), r.returncode) == ("retrigger: 2 interrupts\n", 0), r.stderr.decode()
    r = pykvm("run", "pc-irq", "--machine", "pc", "--irqchip", "full", "--cmdline", "rtc", "--timeout", "30",
              "--no-dump", timeout=90)
    assert (r.stdout.decode(), r.returncode) == ("rtc: present\n", 0), r.stderr.decode()


@pytest.mark.kvm
def test_the_api_takes_the_preset():
    from pykvm import VM

    with VM("pc-irq", machine="pc", cmdline="rtc", timeout=30) as vm:
        vm.expect(b"rtc: present")
        assert vm.wait().status == 0
        assert {"pic", "pit", "rtc", "ioapic", "acpi-pm", "i8042"} <= set(vm.machine.built)
