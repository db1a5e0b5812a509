"""Builders shared by the crash-layer tests: guest memory, page tables, a compiled guest, snapshots.

No tests live here; the crash tests import it (tests is a package: `from .test_crash_support import ...`).
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import capstone
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pykvm.crash import CrashSnapshot, VcpuState
from pykvm.memory import MIB, GuestMemory

from .conftest import require_tool

MMIO_HOLE = 0xC0000000
HIGHER_HALF = 0xFFFFFFFF80000000

P, RW, US, PS = 1, 2, 4, 0x80
NX = 1 << 63

CR0_PE, CR0_PG = 1, 1 << 31
CR4_PSE, CR4_PAE = 1 << 4, 1 << 5
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11

GUEST_C = r"""
volatile unsigned long some_global = 0x1234;
unsigned long counter;
__attribute__((noinline)) void c(unsigned long x) { some_global = x; *(volatile int *)0 = 1; counter += x; }
__attribute__((noinline)) void b(unsigned long x) { c(x + 1); counter++; }
__attribute__((noinline)) void a(unsigned long x) { b(x * 2); counter++; }
void _start(void) { a(5); for (;;) __asm__ volatile("hlt"); }
"""

LINK_LD = """
ENTRY(_start)
SECTIONS {
  . = %#x;
  .text : { *(.text*) }
  .rodata : { *(.rodata*) }
  .data : { *(.data*) }
  .bss : { *(.bss*) *(COMMON) }
}
"""


def gdb_or_skip() -> str:
    """Path of gdb; skip when it is missing, except in CI where it must be installed."""
    return require_tool("gdb")


def make_memory(size: int = 8 * MIB) -> GuestMemory:
    """Guest RAM laid out like the machine does it."""
    return GuestMemory.create(size, MMIO_HOLE)


class PageTables:
    """Builds x86-64 4-level page tables in guest RAM from a bump allocator."""

    def __init__(self, mem: GuestMemory, pool: int):
        self.mem = mem
        self.next = pool
        self.root = self.alloc()

    def alloc(self) -> int:
        """A zeroed 4 KiB table."""
        addr = self.next
        self.next += 4096
        self.mem.write(addr, bytes(4096))
        return addr

    def _slot(self, table: int, index: int) -> int:
        return table + 8 * index

    def _child(self, table: int, index: int, flags: int) -> int:
        e = self.mem.read_u64(self._slot(table, index))
        if e & P:
            return e & 0x000F_FFFF_FFFF_F000
        t = self.alloc()
        self.mem.write(self._slot(table, index), struct.pack("<Q", t | flags))
        return t

    def map(self, vaddr: int, paddr: int, size: int, page: int = 4096, flags: int = P | RW) -> None:
        """Map [vaddr, vaddr+size) to paddr with 4 KiB, 2 MiB or 1 GiB pages."""
        leaf_level = {4096: 1, 2 << 20: 2, 1 << 30: 3}[page]
        for off in range(0, size, page):
            va, pa = vaddr + off, paddr + off
            table = self.root
            for level in range(4, leaf_level, -1):
                table = self._child(table, (va >> (12 + 9 * (level - 1))) & 511, P | RW | US)
            idx = (va >> (12 + 9 * (leaf_level - 1))) & 511
            self.mem.write(self._slot(table, idx), struct.pack("<Q", pa | flags | (PS if leaf_level > 1 else 0)))


def seg(selector: int = 0, base: int = 0, limit: int = 0xFFFFFFFF, type_: int = 3, s: int = 1, dpl: int = 0,
        db: int = 1, l: int = 0, g: int = 1, present: int = 1) -> dict:
    """A KVM-style segment dict."""
    return {"base": base, "limit": limit, "selector": selector, "type": type_, "present": present,
            "dpl": dpl, "db": db, "s": s, "l": l, "g": g, "avl": 0}


def long_sregs(cr3: int, cr2: int = 0) -> dict:
    """sregs of a 64-bit kernel with 4-level paging."""
    data = seg(0x10)
    return {"cs": seg(0x08, type_=11, db=0, l=1), "ds": data, "es": data, "fs": seg(0x10, base=0x5000),
            "gs": seg(0x10, base=0x6000), "ss": data, "tr": seg(0x20, type_=11, s=0, limit=0x67, g=0, db=0),
            "ldt": seg(0, type_=2, s=0, present=0, limit=0, g=0, db=0),
            "gdt": {"base": 0x10000, "limit": 0x37}, "idt": {"base": 0x11000, "limit": 0xFFF},
            "cr0": CR0_PE | CR0_PG | 0x10, "cr2": cr2, "cr3": cr3, "cr4": CR4_PAE, "cr8": 0,
            "efer": EFER_LME | EFER_LMA | EFER_NXE, "apic_base": 0xFEE00900}


def regs(**kw) -> dict:
    """A regs dict with every key, zero unless given."""
    r = {k: 0 for k in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                        "r12", "r13", "r14", "r15", "rip")}
    r["rflags"] = 0x2
    r.update(kw)
    return r


def fpu() -> dict:
    """An fpu dict with recognisable xmm0."""
    return {"fcw": 0x37F, "fsw": 0, "ftwx": 0, "last_opcode": 0, "last_ip": 0, "last_dp": 0, "mxcsr": 0x1F80,
            "fpr": [bytes(16)] * 8, "xmm": [bytes(range(16))] + [bytes(16)] * 15}


def compile_guest(workdir: Path, base: int) -> Path:
    """Compile the a->b->c guest linked at `base`; skip when gcc is missing (fail in CI)."""
    gcc = require_tool("gcc")
    src, ld, out = workdir / "guest.c", workdir / f"link-{base:x}.ld", workdir / f"guest-{base:x}.elf"
    src.write_text(GUEST_C)
    ld.write_text(LINK_LD % base)
    cmd = [gcc, "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie", "-fno-omit-frame-pointer",
           "-O0", "-g", "-fcf-protection=none", "-mno-red-zone", "-Wl,--build-id=none",
           "-Wl,--no-warn-rwx-segments", "-Wl,-T," + str(ld), "-o", str(out), str(src)]
    if base >= HIGHER_HALF:
        cmd.insert(1, "-mcmodel=kernel")
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def elf_symbols(path: Path) -> dict[str, int]:
    """name -> address of the ELF's symbols."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        tab = next(s for s in elf.iter_sections() if isinstance(s, SymbolTableSection))
        return {s.name: s["st_value"] for s in tab.iter_symbols() if s.name}


def load_elf(mem: GuestMemory, path: Path, virt_base: int) -> None:
    """Copy the ELF's PT_LOAD bytes to guest-physical vaddr - virt_base."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for s in elf.iter_segments():
            if s["p_type"] == "PT_LOAD":
                mem.write(s["p_vaddr"] - virt_base, s.data())


def code_facts(mem: GuestMemory, syms: dict[str, int], virt_base: int) -> dict:
    """Addresses of the faulting store in c() and the return addresses after each call."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

    def insns(fn: str):
        start = syms[fn]
        return list(md.disasm(mem.read(start - virt_base, 0x40), start))

    def ret_after_call(fn: str, target: str) -> int:
        for i in insns(fn):
            if i.mnemonic == "call" and int(i.op_str, 16) == syms[target]:
                return i.address + i.size
        raise AssertionError(f"no call {target} in {fn}")

    fault = next(i for i in insns("c") if i.mnemonic == "mov" and i.op_str == "dword ptr [rax], 1")
    hlt = next(i for i in insns("_start") if i.mnemonic == "hlt")
    return {"fault_rip": fault.address, "fault_insn": fault, "hlt_rip": hlt.address, "ret_b": ret_after_call("b", "c"),
            "ret_a": ret_after_call("a", "b"), "ret_start": ret_after_call("_start", "a")}


def build_guest(workdir: Path, higher_half: bool, nvcpus: int = 2, crashing: int = 0):
    """A compiled guest 'crashed' in c() with a real rbp chain: (snapshot, elf path, facts)."""
    virt_base = HIGHER_HALF if higher_half else 0
    elf = compile_guest(workdir, virt_base + 0x100000)
    mem = make_memory(8 * MIB)
    load_elf(mem, elf, virt_base)
    syms = elf_symbols(elf)
    facts = code_facts(mem, syms, virt_base)
    facts["syms"] = syms

    pt = PageTables(mem, 0x600000)
    pt.map(0, 0, 4 * MIB, page=2 << 20)  # identity: firmware-style 2 MiB pages
    if higher_half:
        pt.map(HIGHER_HALF, 0, 2 * MIB, page=4096)  # kernel half with 4 KiB pages
    # The guest changed the global after load: gdb must show the core's value, not the ELF's.
    mem.write(syms["some_global"] - virt_base, struct.pack("<Q", 0xDEADBEEF))

    # Stack frames: c's frame -> b's -> a's -> _start's (outermost, rbp 0).
    stack_top = virt_base + 0x90000
    fp_start, fp_a, fp_b, fp_c = stack_top - 0x20, stack_top - 0x60, stack_top - 0xA0, stack_top - 0xE0
    for fp, saved, ret in ((fp_c, fp_b, facts["ret_b"]), (fp_b, fp_a, facts["ret_a"]),
                           (fp_a, fp_start, facts["ret_start"]), (fp_start, 0, 0)):
        mem.write(fp - virt_base, struct.pack("<QQ", saved, ret))
    facts.update(fp_c=fp_c, stack_top=stack_top, virt_base=virt_base)

    sregs = long_sregs(pt.root, cr2=0)
    vcpus = []
    for i in range(nvcpus):
        if i == crashing:
            r = regs(rip=facts["fault_rip"], rbp=fp_c, rsp=fp_c - 0x10, rax=0, rdi=11)
        else:
            r = regs(rip=facts["hlt_rip"], rbp=0, rsp=stack_top - 0x1000 * (i + 1), rflags=0x202)
        vcpus.append(VcpuState(i, r, dict(sregs), fpu()))
    snap = CrashSnapshot(trigger="exception", reason="unhandled #PF in guest", vcpus=vcpus, crashing_vcpu=crashing,
                         memory=mem, vector=14, error_code=0x2, exit_reason="io (firmware trap port)",
                         serial_tail=b"booting\nabout to crash \xff\n", config={"memory": "8M", "cpus": nvcpus},
                         crash_info=b"OSRELEASE=test-1.0\nPAGESIZE=4096\n")
    snap.vcpus[crashing].sregs["cr2"] = 0
    return snap, elf, facts
