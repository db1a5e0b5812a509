"""Bad input gets one line naming the problem, a distinct exit status, and no traceback."""


import pytest

from pykvm import errors
from pykvm.cli import parse_size

from .helpers import pykvm
from .test_boot_image import elf


def one_line_error(r, status, *needles):
    err = r.stderr.decode()
    assert r.returncode == status, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_guest_name():
    one_line_error(pykvm("run", "no-such-guest"), errors.EXIT_UNKNOWN_GUEST, "no-such-guest", "hello")


def test_truncated_elf(tmp_path):
    k = tmp_path / "trunc.elf"
    k.write_bytes(elf()[:40])
    one_line_error(pykvm("run", str(k)), errors.EXIT_BAD_IMAGE, "truncated")


def test_non_x86_elf(tmp_path):
    k = tmp_path / "arm.elf"
    k.write_bytes(elf(machine=183))
    one_line_error(pykvm("run", str(k)), errors.EXIT_BAD_IMAGE, "not an x86 ELF")


def test_not_a_kernel_at_all(tmp_path):
    k = tmp_path / "notes.txt"
    k.write_bytes(b"hello world\n" * 10)
    one_line_error(pykvm("run", str(k)), errors.EXIT_BAD_IMAGE, "not an ELF")


@pytest.mark.kvm
def test_kernel_does_not_fit(tmp_path):
    k = tmp_path / "big.elf"
    k.write_bytes(elf(segments=((0x100000, 0x100000, b"\x90" * 16, 64 << 20),)))
    one_line_error(pykvm("run", str(k), "--mem", "16M"), errors.EXIT_IMAGE_DOES_NOT_FIT, "--mem")


@pytest.mark.kvm
def test_kernel_over_firmware_area(tmp_path):
    k = tmp_path / "low.elf"
    k.write_bytes(elf(segments=((0x20000, 0x20000, b"\x90" * 16, 16),), entry=0x20000))
    one_line_error(pykvm("run", str(k)), errors.EXIT_IMAGE_DOES_NOT_FIT, "firmware area")


@pytest.mark.parametrize("mem", ["4097K", "1M", "0"])
def test_bad_memory_sizes(mem):
    one_line_error(pykvm("run", "hello", "--mem", mem), errors.EXIT_BAD_MEMORY_SIZE, "memory size")


def test_memory_size_syntax():
    assert parse_size("128M") == 128 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("64") == 64 << 20
    with pytest.raises(errors.MemorySizeError):
        parse_size("lots")


@pytest.mark.kvm
def test_overlapping_device_ranges():
    one_line_error(pykvm("run", "hello", "--exit-port", "0x3f8"), errors.EXIT_DEVICE_CONFIG,
                   "already belongs to serial")


def test_missing_dev_kvm():
    r = pykvm("run", "hello", env={"PYKVM_DEV_KVM": "/nonexistent/kvm"})
    one_line_error(r, errors.EXIT_KVM_UNAVAILABLE, "/nonexistent/kvm")


def test_unreadable_dev_kvm(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    r = pykvm("info", env={"PYKVM_DEV_KVM": str(fake)})
    one_line_error(r, errors.EXIT_KVM_UNAVAILABLE, str(fake))


def test_bogus_option_is_usage_error():
    r = pykvm("run", "hello", "--frobnicate")
    assert r.returncode == errors.EXIT_USAGE
    assert b"Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    k = tmp_path / "trunc.elf"
    k.write_bytes(elf()[:40])
    r = pykvm("run", str(k), "--debug")
    assert r.returncode == errors.EXIT_BAD_IMAGE
    assert b"Traceback" in r.stderr


def test_statuses_are_distinct():
    names = [n for n in dir(errors) if n.startswith("EXIT_")]
    values = [getattr(errors, n) for n in names]
    assert len(set(values)) == len(values)
    assert all(v % 2 == 0 for v in values), "odd statuses belong to the guest's debug-exit codes"
