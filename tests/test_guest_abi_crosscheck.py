"""Cross-check the guest ABI as the VMM reads it (cffi over pykvm_abi.h) against what gcc makes of it.

A C program is generated from what pykvm.abi declares (every struct cffi parsed, every
field reached by walking the cffi types, every PYKVM_* constant), compiled with gcc as
the 64-bit guests compile the header and run on the host (same x86-64 layout rules);
each value it prints must equal the VMM's. The list comes from the ffi itself, so a
struct added to the header (the partition bus rings, packets, range lists) is checked
without touching this file; the bus names below make sure they were reached.
"""

import os
import subprocess

import pytest

from pykvm import abi
from pykvm.paths import ABI_HEADER

from .conftest import require_tool

BUS_STRUCTS = ("pykvm_ring_header", "pykvm_vmpacket", "pykvm_gpa_direct_header", "pykvm_gpa_range",
               "pykvm_xfer_page_header", "pykvm_xfer_range")


def _walk(ctype, prefix=""):
    """Yield (dotted path, cffi field type) for every field, nested ones included."""
    for name, field in ctype.fields:
        path = prefix + name
        yield path, field.type
        if field.type.kind in ("struct", "union"):
            yield from _walk(field.type, path + ".")


def _expected():
    """(kind, key) -> the VMM's value, and the C statements that print gcc's value."""
    ffi = abi.ffi
    expected, lines = {}, []
    for sname in sorted(ffi.list_types()[1]):
        ctype = f"struct {sname}"
        expected[("sizeof", sname)] = ffi.sizeof(ctype)
        lines.append(f"S({sname});")
        for path, ftype in _walk(ffi.typeof(ctype)):
            expected[("offsetof", f"{sname}.{path}")] = ffi.offsetof(ctype, *path.split("."))
            lines.append(f"O({sname}, {path});")
            if not (ftype.kind == "array" and ftype.length is None):  # no sizeof of a flexible array
                expected[("sizeof", f"{sname}.{path}")] = ffi.sizeof(ftype)
                lines.append(f"M({sname}, {path});")
    for name, value in sorted(abi.constants.items()):
        expected[("value", name)] = value
        lines.append(f"V({name});")
    return expected, lines


PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include "pykvm_abi.h"
#define S(T) printf("sizeof %s %zu\n", #T, sizeof(struct T))
#define O(T, F) printf("offsetof %s.%s %zu\n", #T, #F, offsetof(struct T, F))
#define M(T, F) printf("sizeof %s.%s %zu\n", #T, #F, sizeof(((struct T *)0)->F))
#define V(N) printf("value %s %llu\n", #N, (unsigned long long)(N))
int main(void)
{
BODY
    return 0;
}
"""


@pytest.fixture(scope="module")
def gcc_values(tmp_path_factory):
    """Compile and run the generated program; map (kind, key) -> gcc's value."""
    require_tool("gcc")
    tmp = tmp_path_factory.mktemp("guest_abi")
    _, lines = _expected()
    src, exe = tmp / "guest_abi.c", tmp / "guest_abi"
    src.write_text(PROGRAM.replace("BODY", "\n".join(lines)))
    build = subprocess.run(["gcc", "-std=gnu11", "-m64", "-O0", "-Wall", "-Werror", f"-I{os.path.dirname(ABI_HEADER)}",
                            "-o", str(exe), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, f"generated C program failed to compile:\n{build.stderr[-3000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    values = {}
    for line in run.stdout.splitlines():
        kind, key, value = line.split()
        values[(kind, key)] = int(value)
    return values


def test_every_declaration_is_checked(gcc_values):
    expected, _ = _expected()
    assert set(gcc_values) == set(expected)
    for name in BUS_STRUCTS + ("pykvm_boot_info", "pykvm_trap_frame64"):
        assert ("sizeof", name) in expected
    for key in ("pykvm_ring_header.feature_bits", "pykvm_gpa_range.pfn_array", "pykvm_vmpacket.trans_id",
                "pykvm_boot_info.mmap"):
        assert ("offsetof", key) in expected
    assert ("value", "PYKVM_VMPKT_DATA_GPA_DIRECT") in expected


@pytest.mark.parametrize("kind", ["sizeof", "offsetof", "value"])
def test_vmm_view_matches_gcc(gcc_values, kind):
    expected, _ = _expected()
    wrong = [f"{key}: VMM {want} != gcc {gcc_values.get((k, key))}"
             for (k, key), want in sorted(expected.items())
             if k == kind and gcc_values.get((k, key)) != want]
    assert not wrong, f"{len(wrong)} {kind} mismatches:\n" + "\n".join(wrong)


def test_bus_layouts_are_the_vmbus_ones():
    """The offsets BUS.md fixes, stated once more so a header edit that moves them fails here too."""
    ffi = abi.ffi
    off = ffi.offsetof
    assert ffi.sizeof("struct pykvm_ring_header") == abi.PYKVM_RING_HEADER_SIZE == 4096
    assert [off("struct pykvm_ring_header", f) for f in
            ("write_index", "read_index", "interrupt_mask", "pending_send_sz", "feature_bits")] == [0, 4, 8, 12, 64]
    assert ffi.sizeof("struct pykvm_vmpacket") == 16
    assert [off("struct pykvm_vmpacket", f) for f in ("type", "offset8", "len8", "flags", "trans_id")] == \
        [0, 2, 4, 6, 8]
    assert [off("struct pykvm_xfer_page_header", f) for f in
            ("xfer_pageset_id", "sender_owns_set", "reserved", "range_count")] == [0, 2, 3, 4]
    assert off("struct pykvm_gpa_range", "pfn_array") == 8
    assert (abi.PYKVM_VMPKT_DATA_INBAND, abi.PYKVM_VMPKT_DATA_XFER_PAGES, abi.PYKVM_VMPKT_DATA_GPA_DIRECT,
            abi.PYKVM_VMPKT_COMP, abi.PYKVM_VMPKT_FLAG_COMPLETION_REQ) == (6, 7, 9, 11, 1)
