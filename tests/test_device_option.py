"""The default device set and `pykvm run --device NAME[,key=value...]` (issue 9)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import errors
from pykvm.devices import registry

from .helpers import pykvm

DEFAULT = {"serial", "debug-exit", "pvpanic", "poweroff", "fw-cfg", "firmware-trap"}


def test_the_default_set_is_what_a_tiny_kernel_needs():
    assert {t.name for t in registry.TYPES.values() if t.default} == DEFAULT


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_spec_accepts_or_refuses_with_a_spec_error(text):
    try:
        name, opts = registry.parse_spec(text)
    except registry.DeviceSpecError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert name in registry.TYPES and all(isinstance(v, str) for v in opts.values())


@pytest.mark.kvm
@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown device 'nope'"), ("mailbox,base", "expected NAME[,key=value...]"),
    ("mailbox,base=0x10000", "not an I/O port"), ("mailbox,colour=red", "unknown option 'colour'"),
    ("identity,base=0x1000", "overlaps guest RAM"), ("mailbox,base=1,base=2", "given twice"),
    ("serial", "already belongs to serial"), ("mailbox,name=serial,base=0x700", "already exists"), ("mailbox,name=a b", "not a device name"),
])
def test_bad_device_specs_are_one_line_errors_with_status_10(spec, message):
    r = pykvm("run", "hello", "--device", spec, "--timeout", "20")
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == errors.EXIT_DEVICE_CONFIG, r.stderr
    assert len(lines) == 1 and lines[0].startswith("pykvm: error: ") and message in lines[0], lines


@pytest.mark.kvm
def test_a_non_default_device_is_absent_until_named():
    r = pykvm("run", "mailbox", "--cmdline", "power", "--timeout", "30")
    assert r.returncode != 37            # its mailbox reads as all ones without the device
    r = pykvm("run", "mailbox", "--device", "mailbox", "--device", "power-control", "--cmdline", "power",
              "--timeout", "30")
    assert r.returncode == 37, r.stderr


def test_cli_lists_the_registry():
    r = pykvm("devices")
    types = r.stdout.decode().split("\nmachine presets", 1)[0]      # the presets follow the types
    rows = [line.split() for line in types.splitlines()]
    assert r.returncode == 0
    assert {row[0] for row in rows if row[1] == "default"} == DEFAULT
    assert {row[0] for row in rows} == set(registry.TYPES)
