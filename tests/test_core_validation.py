"""`pykvm inspect` on cores whose pykvm note or notes are hostile: always status 24, never a traceback."""

from __future__ import annotations

import struct

import pytest

from pykvm import errors
from pykvm.crash import CoreFormatError, build_report, render_text
from pykvm.crash import notes as N

from .coredata import core_bytes, info_doc
from .helpers import pykvm
from .test_cli_errors import one_line_error


def report_of(tmp_path, blob: bytes) -> str:
    f = tmp_path / "x.core"
    f.write_bytes(blob)
    return render_text(build_report(f))


def test_the_synthetic_core_is_readable(tmp_path):
    text = report_of(tmp_path, core_bytes())
    assert "=> 0x100000" in text and "ud2" in text


BAD_FIELDS = [
    {"memory": [1, 2]}, {"memory": {"regions": "x"}}, {"memory": {"regions": [7]}},
    {"memory": {"regions": [{"phdr": "1"}]}}, {"memory": {"regions": [{"phdr": 99}]}},
    {"address_spaces": "x"}, {"address_spaces": [3]}, {"address_spaces": [{"phdr_first": "2"}]},
    {"address_spaces": [{"vcpus": 5, "phdr_first": 2, "phdr_count": 0}]},
    {"address_spaces": [{"vcpus": [0], "phdr_first": 1, "phdr_count": 2 ** 63}]},
    {"address_spaces": [{"vcpus": [0], "phdr_first": -5, "phdr_count": 1}]},
    {"serial_tail": 5}, {"serial_tail": ["a"]}, {"error_code": "0x2"}, {"error_code": 2 ** 70},
    {"trigger": {"x": 1}}, {"trigger": 3}, {"vector": "14"}, {"vector": 1000}, {"reason": []},
    {"crashing_vcpu": "0"}, {"vcpus": {"0": 1}}, {"vcpus": [{"index": "0"}]}, {"vcpus": [5]},
    {"vcpus": [{"index": 0, "efer": "x"}]}, {"qemu_note_order": 4}, {"qemu_note_order": [[1]]},
    {"dropped_segments": "many"}, {"config": 7}, {"created": 1.5}, {"pykvm_version": [1]},
]


@pytest.mark.parametrize("bad", BAD_FIELDS, ids=[f"{i}-{next(iter(b))}" for i, b in enumerate(BAD_FIELDS)])
def test_wrong_types_in_the_pykvm_note_are_a_bad_core(tmp_path, bad):
    f = tmp_path / "bad.core"
    f.write_bytes(core_bytes(info_doc(**bad)))
    with pytest.raises(CoreFormatError):
        render_text(build_report(f))


def test_bad_core_from_the_command_line_is_status_24(tmp_path):
    f = tmp_path / "bad.core"
    f.write_bytes(core_bytes(info_doc(serial_tail=5, error_code="0x2")))
    one_line_error(pykvm("inspect", str(f)), errors.EXIT_BAD_CORE, "bad.core")


def test_qemu_note_whose_namesz_is_3(tmp_path):
    """A QEMU note whose header says namesz 3: pyelftools' parser raised a construct ArrayError."""
    desc = bytes(N.QEMU_CPUSTATE_SIZE)
    odd = struct.pack("<III", 3, len(desc), N.NT_QEMU) + b"QEMU\0\0\0\0" + desc
    f = tmp_path / "odd.core"
    f.write_bytes(core_bytes(extra_notes=odd))
    with pytest.raises(CoreFormatError, match="damaged core"):
        build_report(f)
    one_line_error(pykvm("inspect", str(f)), errors.EXIT_BAD_CORE, "odd.core")


def test_huge_phdr_count_does_not_hang(tmp_path):
    f = tmp_path / "big.core"
    f.write_bytes(core_bytes(info_doc(address_spaces=[{"vcpus": [0], "phdr_first": 0, "phdr_count": 2 ** 63}])))
    r = pykvm("inspect", str(f), timeout=30)
    one_line_error(r, errors.EXIT_BAD_CORE, "phdr_count")
