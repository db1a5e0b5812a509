"""Inspection: the report built from a core, its text rendering, and bad input files."""

from __future__ import annotations

import json
import re
import os
import struct

import pytest

from pykvm.crash import CoreFormatError, CrashSnapshot, VcpuState, build_report, render_text, write_core
from pykvm.memory import MIB

from .test_crash_support import CR0_PE, HIGHER_HALF, build_guest, make_memory, regs, seg


@pytest.fixture(params=[False, True], ids=["identity", "higher-half"])
def crashed(request, tmp_path):
    snap, elf, facts = build_guest(tmp_path, higher_half=request.param, nvcpus=2, crashing=1)
    try:
        core = write_core(snap, tmp_path / "crashes")
    finally:
        snap.memory.close()
    return core, elf, facts


def test_report_explains_the_crash(crashed):
    core, elf, facts = crashed
    r = build_report(core, kernel_path=elf)
    json.dumps(r)  # the CLI prints it with --json
    assert r["trigger"] == "exception" and r["reason"] == "unhandled #PF in guest"
    assert r["vector"] == 14 and r["vector_name"] == "#PF page fault"
    assert r["error_code"] == 2 and r["error_code_text"] == "not-present, write, supervisor"
    assert r["exit_reason"] == "io (firmware trap port)" and r["crashing_vcpu"] == 1
    assert r["serial_tail"].startswith("booting") and "OSRELEASE=test-1.0" in r["crash_info"]
    v = next(v for v in r["vcpus"] if v["index"] == 1)
    assert v["mode"] == {"name": "long", "bits": 64, "paging": True, "paging_levels": 4, "pae": True,
                         "interrupts": False}
    assert v["regs"]["rip"] == facts["fault_rip"] and v["pc_symbol"].startswith("c+")
    [cur] = [i for i in v["code"]["insns"] if i["current"]]
    assert (cur["address"], cur["mnemonic"], cur["op_str"]) == (facts["fault_rip"], "mov", "dword ptr [rax], 1")
    assert any(i["address"] < facts["fault_rip"] for i in v["code"]["insns"])  # context before RIP
    frames = v["backtrace"]["frames"]
    assert [f["symbol"].split("+")[0] for f in frames] == ["c", "b", "a", "_start"]
    assert [f["pc"] for f in frames[1:]] == [facts["ret_b"], facts["ret_a"], facts["ret_start"]]
    other = next(v for v in r["vcpus"] if v["index"] == 0)
    assert other["mode"]["interrupts"] and [i["mnemonic"] for i in other["code"]["insns"] if i["current"]] == ["hlt"]


@pytest.mark.parametrize("with_kernel", [True, False])
def test_code_listing_columns_line_up(crashed, with_kernel):
    """Addresses, symbols, bytes, mnemonics and operands each start in the same column on every line."""
    core, elf, facts = crashed
    r = build_report(core, kernel_path=elf if with_kernel else None)
    v = next(v for v in r["vcpus"] if v["index"] == r["crashing_vcpu"])
    text = render_text(r)
    lines = text.split("  code:\n", 1)[1].split("  backtrace:", 1)[0].splitlines()
    insns = v["code"]["insns"]
    assert len(lines) == len(insns) >= 3
    byte_cols = {line.index(" " + i["bytes"] + " ") for line, i in zip(lines, insns)}
    mnem_cols = {line.index(" " + i["mnemonic"] + " ", min(byte_cols) + 1) for line, i in zip(lines, insns)
                 if i["op_str"]}
    op_cols = {line.rindex(i["op_str"]) for line, i in zip(lines, insns) if i["op_str"]}
    assert len(byte_cols) == 1 and len(mnem_cols) == 1 and len(op_cols) == 1, "\n".join(lines)


def test_render_text(crashed):
    core, elf, facts = crashed
    text = render_text(build_report(core, kernel_path=elf))
    assert "exception: #PF page fault (vector 14)" in text
    assert "error code:    0x2 (not-present, write, supervisor)" in text
    assert "vCPU 1 (crashing): long mode, 64-bit code, paging 4-level, PAE, interrupts off" in text
    assert f"=> {facts['fault_rip']:#x} <c+" in text
    assert re.search(r"=> .* mov +dword ptr \[rax\], 1$", text, re.M)
    assert " b+0x" in text and " a+0x" in text
    assert "about to crash" in text and "OSRELEASE=test-1.0" in text


def test_report_without_symbols(crashed):
    core, _, facts = crashed
    r = build_report(core)
    v = next(v for v in r["vcpus"] if v["index"] == 1)
    assert [f["pc"] for f in v["backtrace"]["frames"]][:2] == [facts["fault_rip"], facts["ret_b"]]
    assert all(f["symbol"] is None for f in v["backtrace"]["frames"])
    assert "=>" in render_text(r)


def test_bad_kernel_file_is_reported_not_raised(crashed, tmp_path):
    core, _, _ = crashed
    bogus = tmp_path / "not-elf"
    bogus.write_bytes(b"hello")
    r = build_report(core, kernel_path=bogus)
    assert "cannot read symbols" in r["symbols_error"]


def test_looping_frame_pointers_stop(tmp_path):
    mem = make_memory(2 * MIB)
    try:
        mem.write(0x8000, struct.pack("<QQ", 0x8000, 0x1234))  # frame points at itself
        mem.write(0x1000, b"\x90" * 16)
        v = VcpuState(0, regs(rip=0x1000, rbp=0x8000),
                      {"cs": seg(8, type_=11, l=1, db=0), "cr0": CR0_PE, "efer": 1 << 10}, None)
        core = write_core(CrashSnapshot("watchdog", "stuck", [v], 0, mem), tmp_path)
    finally:
        mem.close()
    r = build_report(core)
    bt = r["vcpus"][0]["backtrace"]
    assert len(bt["frames"]) == 2 and "does not move up" in bt["stop"]
    assert r["vector"] is None and r["vector_name"] is None


def test_protected_and_real_mode_disassembly(tmp_path):
    mem = make_memory(2 * MIB)
    try:
        mem.write(0x7000, bytes.fromhex("90a1efbeadde"))  # nop; mov eax, [0xdeadbeef] (32-bit)
        mem.write(0xFFFF0, bytes.fromhex("ea5be000f0"))   # jmp far f000:e05b (16-bit)
        flat = seg(0x10)
        pm = VcpuState(0, regs(rip=0x7001, rbp=0x9000),
                       {"cs": seg(0x08, type_=11), "ds": flat, "ss": flat, "cr0": CR0_PE, "efer": 0}, None)
        rm = VcpuState(1, regs(rip=0xFFF0), {"cs": seg(0xF000, base=0xF0000, limit=0xFFFF, type_=11, db=0, g=0),
                                             "cr0": 0x10, "efer": 0}, None)
        core = write_core(CrashSnapshot("exception", "#GP", [pm, rm], 0, mem, vector=13, error_code=0), tmp_path)
    finally:
        mem.close()
    r = build_report(core)
    v0, v1 = r["vcpus"]
    assert v0["mode"]["name"] == "protected" and v0["mode"]["bits"] == 32 and not v0["mode"]["paging"]
    [cur] = [i for i in v0["code"]["insns"] if i["current"]]
    assert (cur["mnemonic"], cur["op_str"]) == ("mov", "eax, dword ptr [0xdeadbeef]")
    names = [i["mnemonic"] for i in v0["code"]["insns"]]
    assert names[names.index("mov") - 1] == "nop"
    assert v1["mode"]["name"] == "real" and v1["pc"] == 0xFFFF0
    [cur] = [i for i in v1["code"]["insns"] if i["current"]]
    assert (cur["mnemonic"], cur["op_str"]) == ("ljmp", "0xf000:0xe05b")
    assert r["vector_name"] == "#GP general protection fault"
    assert "vCPU 1: real mode, 16-bit code, paging off" in render_text(r)


def test_unreadable_rip(tmp_path):
    mem = make_memory(1 * MIB)
    try:
        v = VcpuState(0, regs(rip=HIGHER_HALF), {"cs": seg(8, type_=11, l=1, db=0), "cr0": CR0_PE,
                                                 "efer": 1 << 10}, None)
        core = write_core(CrashSnapshot("internal-error", "emulation failure", [v], 0, mem), tmp_path)
    finally:
        mem.close()
    r = build_report(core)
    assert r["vcpus"][0]["code"]["insns"] == [] and "not in the core" in r["vcpus"][0]["code"]["error"]
    assert "not in the core" in render_text(r)


def test_not_a_core(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"definitely not ELF")
    with pytest.raises(CoreFormatError, match="not an ELF"):
        build_report(f)
    with pytest.raises(CoreFormatError, match="not an x86-64 ELF core"):
        build_report("/bin/true" if os.path.exists("/bin/true") else f)
    with pytest.raises(CoreFormatError, match="cannot open"):
        build_report(tmp_path / "missing")


def test_truncated_core(crashed, tmp_path):
    core, _, _ = crashed
    data = core.read_bytes()
    for cut in (40, 200, 2000, len(data) // 2):
        t = tmp_path / f"cut{cut}"
        t.write_bytes(data[:cut])
        with pytest.raises(CoreFormatError):
            build_report(t)


def test_foreign_core_without_pykvm_note(tmp_path):
    # An ELF core with only a CORE note: readable ELF, but not ours.
    desc = bytes(336)
    note = struct.pack("<III", 5, len(desc), 1) + b"CORE\0\0\0\0" + desc
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(note), 0, 4)
    f = tmp_path / "foreign.core"
    f.write_bytes(ehdr + phdr + note)
    with pytest.raises(CoreFormatError, match="no pykvm note"):
        build_report(f)
