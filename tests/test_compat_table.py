"""docs/guests.md's "What boots" table stays true: every row's command runs with the status it states,
and the tables (with docs/devices.md's) name every boot format and every device pykvm has."""

from __future__ import annotations

import gzip
import os
import re
import shlex

import pytest

from pykvm.devices import registry

from .helpers import ROOT, guest, pykvm

FORMATS = ("ELF64", "multiboot v1, ELF32", "a.out kludge", "bzImage", "PHYS32_ENTRY", "gzip")


def _section(title: str, page: str) -> str:
    text = (ROOT / "docs" / page).read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _rows(section: str, first_col: str) -> list[list[str]]:
    """Body rows of the markdown table whose header starts with `first_col`."""
    lines = section.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_col} |"))
    rows = []
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


BOOTS = _rows(_section("What boots", "guests.md"), "kernel")
DEVICES = _rows(_section("The device set", "devices.md"), "device")


def test_table_names_every_format_and_device():
    formats = " ".join(r[1] for r in BOOTS)
    for f in FORMATS:
        assert f in formats, f"docs/guests.md's table has no row for {f}"
    named = {re.fullmatch(r"`([\w-]+)`", r[0]).group(1) for r in DEVICES}
    assert named == set(registry.TYPES), "docs/devices.md's device table and the registry disagree"
    for r in DEVICES:
        name = r[0].strip("`")
        assert (r[2] == "yes") == registry.TYPES[name].default, name


@pytest.mark.kvm
@pytest.mark.parametrize("row", BOOTS, ids=[r[0] for r in BOOTS])
def test_row_boots_as_stated(row, tmp_path):
    args = shlex.split(row[3].strip("`"))
    assert args[:2] == ["pykvm", "run"], row
    args = args[2:]
    if args[0] in ("VMLINUX", "BZIMAGE"):
        _linux_row(args, tmp_path)
        return
    if args[0] == "HOBBY.gz":
        packed = tmp_path / "hobby.elf.gz"
        packed.write_bytes(gzip.compress(guest("vga-text").read_bytes()))
        args[0] = str(packed)
    r = pykvm("run", *args, "--crash-dir", str(tmp_path / "crashes"), timeout=120)
    assert r.returncode == int(row[4]), (row, r.stderr.decode()[-2000:])


def _linux_row(args: list[str], tmp_path) -> None:
    """A Linux row: its options are the ones the Linux tests boot with; a bzImage boots when asked to.

    The vmlinux (PVH) row is booted by tests/test_linux_boot.py with exactly these options. A bzImage
    decompresses itself first, which takes minutes under nested KVM: it boots here only with
    PYKVM_TEST_BZIMAGE_BOOT=1, and otherwise is parsed and loaded without running it.
    """
    from . import linux_kernel as lk

    opts = dict(zip(args[1::2], args[2::2]))
    assert opts == {"--mem": lk.LINUX_MEM, "--cpu": lk.LINUX_CPU, "--cmdline": lk.LINUX_CMDLINE,
                    "--timeout": lk.LINUX_TIMEOUT}
    if args[0] == "VMLINUX":
        return
    path = lk.find_bzimage()
    if path is None:
        pytest.skip("no bzImage on this machine")
    if os.environ.get("PYKVM_TEST_BZIMAGE_BOOT") != "1":
        from pykvm.boot.image import PROTOCOL_LINUX, load_image

        assert load_image(path).protocol == PROTOCOL_LINUX
        return
    console, outcome = lk.boot_until_memory_summary(path)
    assert "Linux version" in console and "Memory:" in console, f"{outcome.reason}\n{console[-3000:]}"
