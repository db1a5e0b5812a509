"""The ELF core writer: note layout, segments, sparseness, atomic publishing, reading back."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pykvm.crash import CoreFile, CoreWriteError, CrashSnapshot, VcpuState, read_crash_info, write_core
from pykvm.crash import core as core_mod
from pykvm.crash.notes import NT_PYKVM
from pykvm.crash.snapshot import CRASH_INFO_MAX
from pykvm.memory import MIB, GuestMemory, MemoryRegion
from pykvm.memory.pagewalk import DEFAULT_MAX_TABLES

from .test_crash_support import (CR0_PE, HIGHER_HALF, P, RW, PageTables, build_guest, fpu, long_sregs, make_memory,
                                regs, seg)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def guest(tmp_path):
    snap, elf, facts = build_guest(tmp_path, higher_half=True, nvcpus=2, crashing=1)
    yield snap, elf, facts
    snap.memory.close()


def _notes(path: Path) -> list[tuple[str, object, bytes]]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        seg0 = elf.get_segment(0)
        assert seg0["p_type"] == "PT_NOTE"
        return [(n["n_name"], n["n_type"], bytes(n["n_descdata"])) for n in seg0.iter_notes()]


def _loads(path: Path) -> list[dict]:
    with open(path, "rb") as f:
        return [dict(s.header) for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD"]


def test_header_and_note_order(guest, tmp_path):
    snap, _, _ = guest
    path = write_core(snap, tmp_path / "crashes")
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert (elf["e_type"], elf["e_machine"], elf.elfclass, elf.little_endian) == ("ET_CORE", "EM_X86_64", 64, True)
    notes = _notes(path)
    kinds = [(name, t) for name, t, _ in notes]
    assert kinds == [("CORE", "NT_PRSTATUS"), ("CORE", "NT_FPREGSET")] * 2 + [("QEMU", 0)] * 2 + \
        [("PYKVM", NT_PYKVM), ("VMCOREINFO", 0)]
    # NT_PRSTATUS: crashing vCPU 1 first; raw offsets of struct elf_prstatus.
    pr_crash, pr_other = notes[0][2], notes[2][2]
    assert len(pr_crash) == 336
    assert struct.unpack_from("<i", pr_crash, 32)[0] == 2  # pr_pid = index + 1
    assert struct.unpack_from("<i", pr_other, 32)[0] == 1
    assert struct.unpack_from("<h", pr_crash, 12)[0] == signal.SIGSEGV  # #PF
    assert struct.unpack_from("<h", pr_other, 12)[0] == signal.SIGSEGV  # every thread, as Linux writes it
    reg = struct.unpack_from("<27Q", pr_crash, 112)
    v = snap.vcpus[1]
    assert reg[16] == v.regs["rip"] and reg[19] == v.regs["rsp"] and reg[4] == v.regs["rbp"]
    assert reg[17] == 0x08 and reg[20] == 0x10  # cs, ss selectors
    assert reg[21] == 0x5000 and reg[22] == 0x6000  # fs_base, gs_base
    # NT_FPREGSET: FXSAVE image.
    fp = notes[1][2]
    assert len(fp) == 512 and struct.unpack_from("<H", fp, 0)[0] == 0x37F
    assert struct.unpack_from("<I", fp, 24)[0] == 0x1F80 and fp[160:176] == bytes(range(16))


def test_qemu_note_layout(guest, tmp_path):
    snap, _, _ = guest
    notes = _notes(write_core(snap, tmp_path))
    q0, q1 = (d for name, _, d in notes if name == "QEMU")  # in vCPU index order
    assert len(q1) == 440
    version, size = struct.unpack_from("<II", q1, 0)
    assert (version, size) == (1, 440)
    rip, rflags = struct.unpack_from("<QQ", q1, 8 + 16 * 8)
    assert rip == snap.vcpus[1].regs["rip"] and rip != struct.unpack_from("<Q", q0, 8 + 16 * 8)[0]
    cs_sel, cs_limit, cs_flags, _pad, cs_base = struct.unpack_from("<IIIIQ", q1, 152)
    assert (cs_sel, cs_limit, cs_base) == (0x08, 0xFFFFFFFF, 0)
    assert cs_flags == (11 << 8) | (1 << 12) | (1 << 15) | (1 << 21) | (1 << 23)  # type, S, P, L, G
    gdt = struct.unpack_from("<IIIIQ", q1, 152 + 24 * 8)
    assert gdt == (0, 0x37, 0, 0, 0x10000)
    cr = struct.unpack_from("<5Q", q1, 152 + 24 * 10)
    sregs = snap.vcpus[1].sregs
    assert cr == (sregs["cr0"], 0, sregs["cr2"], sregs["cr3"], sregs["cr4"])


def test_pykvm_note_and_vmcoreinfo(guest, tmp_path):
    snap, _, _ = guest
    notes = _notes(write_core(snap, tmp_path))
    doc = json.loads(next(d for name, _, d in notes if name == "PYKVM"))
    assert doc["trigger"] == "exception" and doc["vector"] == 14 and doc["error_code"] == 2
    assert doc["vector_name"] == "#PF page fault" and doc["crashing_vcpu"] == 1
    assert doc["exit_reason"] == "io (firmware trap port)" and doc["pykvm_version"] == snap.pykvm_version
    assert doc["serial_tail"] == "booting\nabout to crash \ufffd\n"
    assert doc["config"] == {"memory": "8M", "cpus": 2}
    assert doc["prstatus_order"] == [1, 0]
    assert next(d for name, _, d in notes if name == "VMCOREINFO") == snap.crash_info


def test_segments_share_the_physical_bytes(guest, tmp_path):
    snap, elf, facts = guest
    path = write_core(snap, tmp_path)
    loads = _loads(path)
    phys = [s for s in loads if s["p_vaddr"] == s["p_paddr"]]
    [region] = snap.memory.regions
    assert [(s["p_paddr"], s["p_filesz"]) for s in phys] == [(0, region.size)]
    # The higher-half run (4 KiB pages merged) points into the physical view's bytes.
    [virt] = [s for s in loads if s["p_vaddr"] == HIGHER_HALF]
    assert virt["p_paddr"] == 0 and virt["p_filesz"] == 2 * MIB
    assert virt["p_offset"] == phys[0]["p_offset"]
    # The identity 2 MiB mappings were not duplicated.
    assert len(loads) == 2
    assert os.stat(path).st_size == phys[0]["p_offset"] + region.size


def test_reader_reads_virtual_and_physical(guest, tmp_path):
    snap, elf, facts = guest
    with CoreFile(write_core(snap, tmp_path)) as core:
        code = core.read(facts["fault_rip"], 6)
        assert code == bytes(facts["fault_insn"].bytes)
        assert core.read_physical(facts["fault_rip"] - HIGHER_HALF, 6) == code
        glob = facts["syms"]["some_global"]
        assert struct.unpack("<Q", core.read(glob, 8, vcpu=1))[0] == 0xDEADBEEF
        assert core.read(HIGHER_HALF + 2 * MIB, 8) is None  # not mapped
        v = core.vcpu(1)
        assert v["regs"]["rip"] == facts["fault_rip"] and v["fpu"]["xmm"][0] == bytes(range(16))
        assert v["segments"]["cs"]["l"] == 1 and v["mode"]["name"] == "long"


def test_each_vcpu_reads_through_its_own_address_space(tmp_path):
    mem = make_memory(8 * MIB)
    try:
        a, b = PageTables(mem, 0x400000), PageTables(mem, 0x500000)
        a.map(0x7000_0000, 0x100000, 0x1000)
        b.map(0x7000_0000, 0x200000, 0x1000)
        mem.write(0x100000, b"AAAA")
        mem.write(0x200000, b"BBBB")
        vcpus = [VcpuState(0, regs(), long_sregs(a.root), fpu()), VcpuState(1, regs(), long_sregs(b.root), None)]
        snap = CrashSnapshot("host-request", "test", vcpus, 0, mem)
        with CoreFile(write_core(snap, tmp_path)) as core:
            assert core.read(0x7000_0000, 4, vcpu=0) == b"AAAA"
            assert core.read(0x7000_0000, 4, vcpu=1) == b"BBBB"
            assert core.read(0x7000_0000, 4) == b"AAAA"  # gdb's view: the crashing vCPU's space wins
            assert [sp["vcpus"] for sp in core.info["address_spaces"]] == [[0], [1]]
            assert core.vcpu(1)["fpu"] is None
    finally:
        mem.close()


def test_address_space_cap_is_reported(tmp_path):
    mem = make_memory(8 * MIB)
    try:
        a, b = PageTables(mem, 0x400000), PageTables(mem, 0x500000)
        a.map(0x7000_0000, 0x100000, 0x1000)
        b.map(0x7000_0000, 0x200000, 0x1000)
        vcpus = [VcpuState(0, regs(), long_sregs(a.root), None), VcpuState(1, regs(), long_sregs(b.root), None)]
        snap = CrashSnapshot("host-request", "test", vcpus, 1, mem)
        with CoreFile(write_core(snap, tmp_path, max_spaces=1)) as core:
            [walked] = core.info["address_spaces"]
            assert walked["vcpus"] == [1] and walked["cr3"] == b.root  # the crashing vCPU's space wins
            assert [sp["vcpus"] for sp in core.info["dropped_address_spaces"]] == [[0]]
            assert core.read(0x7000_0000, 4096, vcpu=0) is None  # not walked: not readable by vaddr
    finally:
        mem.close()


def test_segment_cap_is_reported(tmp_path):
    mem = make_memory(8 * MIB)
    try:
        pt = PageTables(mem, 0x400000)
        for i in range(10):  # alternate rights so nothing merges
            pt.map(0x7000_0000 + i * 0x1000, 0x100000 + i * 0x1000, 0x1000, flags=P | (RW if i % 2 else 0))
        snap = CrashSnapshot("host-request", "t", [VcpuState(0, regs(), long_sregs(pt.root), None)], 0, mem)
        path = write_core(snap, tmp_path, max_segments=4)
        with CoreFile(path) as core:
            assert core.info["dropped_segments"] == 6
            assert len(core.loads) == 4 + 1
    finally:
        mem.close()


def test_extended_program_header_numbering(tmp_path):
    # 70000 non-mergeable 4 KiB mappings: more than 65535 program headers.
    mem = GuestMemory([MemoryRegion(0, 2 * MIB)])
    try:
        pml4, pdpt, pd, pt0 = 0x100000, 0x101000, 0x102000, 0x103000
        npages = 70000
        nts = -(-npages // 512)
        mem.write(pml4, struct.pack("<Q", (pdpt | P | RW)))
        mem.write(pdpt + 8, struct.pack("<Q", (pd | P | RW)))  # vaddr 1 GiB.. (never identity)
        mem.write(pd, struct.pack(f"<{nts}Q", *[(pt0 + i * 4096) | P | RW for i in range(nts)]))
        ptes = [((i % 256) * 4096) | P | (RW if i % 2 else 0) for i in range(npages)]
        mem.write(pt0, struct.pack(f"<{npages}Q", *ptes))
        snap = CrashSnapshot("host-request", "t", [VcpuState(0, regs(), long_sregs(pml4), None)], 0, mem)
        path = write_core(snap, tmp_path, max_segments=10**6, walk_max_entries=10**6)
        with open(path, "rb") as f:
            elf = ELFFile(f)
            assert elf["e_phnum"] == 0xFFFF and elf.num_segments() == npages + 2
        with CoreFile(path) as core:
            assert core.read((1 << 30) + 69999 * 4096, 4096) == mem.read((69999 % 256) * 4096, 4096)
    finally:
        mem.close()


def test_sparse_core_of_mostly_untouched_memory(tmp_path):
    mem = GuestMemory.create(256 * MIB, 0xC0000000)
    try:
        mem.write(0x1000, b"\x01" * 4096)
        mem.write(100 * MIB + 123, b"hello")
        mem.write(200 * MIB, bytes(4096))  # touched but zero: must not be written
        snap = CrashSnapshot("host-request", "sparse", [VcpuState(0, regs(), {"cr0": CR0_PE}, None)], 0, mem)
        path = write_core(snap, tmp_path)
        st = os.stat(path)
        assert st.st_size > 256 * MIB
        assert st.st_blocks * 512 <= 256 * 1024, st.st_blocks
        with CoreFile(path) as core:
            assert core.info["bytes_written"] == 2 * 4096
            assert core.read_physical(100 * MIB + 123, 5) == b"hello"
            assert core.read_physical(0x1000, 4096) == b"\x01" * 4096
            assert core.read_physical(200 * MIB, 16) == bytes(16)
    finally:
        mem.close()


def test_two_dumps_get_two_files(guest, tmp_path):
    snap, _, _ = guest
    out = tmp_path / "crashes"
    p1, p2 = write_core(snap, out), write_core(snap, out)
    assert p1 != p2 and p1.exists() and p2.exists()
    assert re.fullmatch(r"pykvm-\d{8}T\d{6}Z-\d+-\d+\.core", p1.name)
    assert sorted(os.listdir(out)) == sorted([p1.name, p2.name])  # no temp files left


def test_existing_file_is_never_overwritten(guest, tmp_path, monkeypatch):
    snap, _, _ = guest
    names = iter([7, 8, 7, 9])
    monkeypatch.setattr(core_mod, "_stamp", lambda: "20000101T000000Z")
    monkeypatch.setattr(core_mod, "_next_n", lambda: next(names))
    out = tmp_path / "crashes"
    out.mkdir()
    stem = f"vm-20000101T000000Z-{os.getpid()}"
    taken = out / f"{stem}-7.core"
    taken.write_text("keep me")
    p1 = write_core(snap, out, prefix="vm")
    p2 = write_core(snap, out, prefix="vm")
    assert taken.read_text() == "keep me"
    assert (p1.name, p2.name) == (f"{stem}-8.core", f"{stem}-9.core")
    assert sorted(os.listdir(out)) == sorted([taken.name, p1.name, p2.name])


def test_unwritable_crash_dir_raises_and_leaves_nothing(guest, tmp_path):
    snap, _, _ = guest
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CoreWriteError, match="crash directory"):
        write_core(snap, blocker / "crashes")
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(CoreWriteError, match="permission denied"):
            write_core(snap, ro)
        assert os.listdir(ro) == []


def test_disk_full_removes_the_temp_file(guest, tmp_path, monkeypatch):
    snap, _, _ = guest
    real = os.pwrite
    calls = []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "crashes"
    with pytest.raises(CoreWriteError, match="disk is full"):
        write_core(snap, out)
    assert os.listdir(out) == []


def test_failed_publish_leaves_no_partial_file(guest, tmp_path, monkeypatch):
    snap, _, _ = guest

    def link(src, dst, **_dir_fds):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "link", link)
    out = tmp_path / "crashes"
    with pytest.raises(CoreWriteError):
        write_core(snap, out)
    assert os.listdir(out) == []


def test_hostile_page_tables_still_produce_a_core(tmp_path):
    mem = make_memory(4 * MIB)
    try:
        # Every entry of the "PML4" points at itself or its neighbour, with PS set in half of them.
        root = 0x200000
        mem.write(root, struct.pack("<512Q", *[(root + 4096 * (i % 2)) | P | RW | (0x80 * (i % 3 == 0))
                                               for i in range(512)]))
        mem.write(root + 4096, struct.pack("<512Q", *[(root + 4096 * (i % 2)) | P | RW for i in range(512)]))
        snap = CrashSnapshot("triple-fault", "garbage", [VcpuState(0, regs(), long_sregs(root), None)], 0, mem)
        with CoreFile(write_core(snap, tmp_path)) as core:
            assert core.info["address_spaces"][0]["tables"] <= DEFAULT_MAX_TABLES
    finally:
        mem.close()


def test_crash_info_is_bounded_and_tolerates_bad_addresses():
    mem = make_memory(1 * MIB)
    try:
        mem.write(0x1000, b"K=V\nX=Y\0garbage")
        assert read_crash_info(mem, 0x1000, 100) == b"K=V\nX=Y"
        assert read_crash_info(mem, 0x7F000000, 100) == b""  # not RAM
        assert read_crash_info(mem, 0, 100) == b""
        assert len(read_crash_info(mem, 0x2000, 1 << 40)) <= CRASH_INFO_MAX
        mem.write(MIB - 4, b"ABCD")
        assert read_crash_info(mem, MIB - 4, 100) == b"ABCD"  # clipped at the end of RAM
    finally:
        mem.close()


def test_crash_info_max_matches_the_guest_abi():
    header = (ROOT / "guests" / "include" / "pykvm_abi.h").read_text()
    m = re.search(r"#define\s+PYKVM_CRASH_INFO_MAX\s+(\w+)", header)
    assert m and int(m.group(1), 0) == CRASH_INFO_MAX


def test_real_mode_guest_gets_a_readable_core(tmp_path):
    mem = make_memory(2 * MIB)
    try:
        mem.write(0xFFFF0, bytes.fromhex("ea5be000f0"))  # jmp far f000:e05b
        rm = seg(0xF000, base=0xF0000, limit=0xFFFF, type_=11, db=0, g=0)
        sregs = {"cs": rm, "ds": seg(0, limit=0xFFFF, db=0, g=0), "ss": seg(0, limit=0xFFFF, db=0, g=0),
                 "cr0": 0x10, "cr3": 0, "cr4": 0, "efer": 0}
        snap = CrashSnapshot("triple-fault", "reset loop", [VcpuState(0, regs(rip=0xFFF0), sregs, None)], 0, mem)
        path = write_core(snap, tmp_path)
        assert len(_loads(path)) == 1
        with CoreFile(path) as core:
            v = core.vcpu(0)
            assert v["mode"]["name"] == "real" and v["segments"]["cs"]["base"] == 0xF0000
            assert core.read(0xFFFF0, 5) == bytes.fromhex("ea5be000f0")
    finally:
        mem.close()
