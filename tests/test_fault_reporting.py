"""A guest that faults before installing its own IDT is reported with the right vector, RIP and registers."""

import re
import subprocess

import pytest

from .conftest import require_tool
from .helpers import pykvm

pytestmark = pytest.mark.kvm

LOAD = 0x100000


def flat(tmp_path, asm: str, bits: int) -> str:
    """Assemble a flat binary for LOAD with gcc/binutils."""
    require_tool("gcc")
    src = tmp_path / "g.S"
    src.write_text(f".code{bits}\n.globl _start\n_start:\n{asm}\n")
    obj, out = tmp_path / "g.o", tmp_path / "g.bin"
    subprocess.run(["gcc", "-c", "-m64" if bits == 64 else "-m32", str(src), "-o", str(obj)], check=True)
    subprocess.run(["objcopy", "-O", "binary", str(obj), str(out)], check=True)
    return str(out)


def crash(tmp_path, image, bits):
    r = pykvm("run", image, "--load-addr", hex(LOAD), "--entry-mode", str(bits), "--timeout", "20",
              "--crash-dir", str(tmp_path / "cores"))
    assert r.returncode == 16, r.stderr.decode()
    return r.stderr.decode()


def test_64bit_invalid_opcode(tmp_path):
    # mov $0x1234, %rbx (7 bytes) then ud2 at LOAD + 7
    err = crash(tmp_path, flat(tmp_path, "mov $0x1234, %rbx\nud2", 64), 64)
    assert f"exception #UD invalid opcode (vector 6, error code 0x0) at RIP {LOAD + 7:#x}" in err
    assert "bytes 0f 0b" in err


def test_64bit_page_fault_reports_cr2(tmp_path):
    # a non-canonical-free but unmapped address far above RAM and the 4 GiB identity map
    err = crash(tmp_path, flat(tmp_path, "movabs $0x0000100000000000, %rax\nmov (%rax), %rcx", 64), 64)
    assert re.search(r"exception #PF page fault \(vector 14, error code 0x0\) at RIP 0x10000a, "
                     r"CR2 0x100000000000", err), err


def test_64bit_general_protection_with_error_code(tmp_path):
    # loading an out-of-GDT selector into DS raises #GP with the selector as error code
    err = crash(tmp_path, flat(tmp_path, "mov $0x78, %ax\nmov %ax, %ds", 64), 64)
    assert "exception #GP general protection fault (vector 13, error code 0x78)" in err


def test_32bit_divide_error(tmp_path):
    err = crash(tmp_path, flat(tmp_path, "xor %ecx, %ecx\nmov $5, %eax\ncltd\ndiv %ecx", 32), 32)
    assert f"exception #DE divide error (vector 0, error code 0x0) at RIP {LOAD + 8:#x}" in err


def test_core_holds_faulting_registers(tmp_path):
    crash(tmp_path, flat(tmp_path, "mov $0xfeedface, %r15\nmov $0x1234, %rbx\nud2", 64), 64)
    import json

    core = next((tmp_path / "cores").glob("*.core"))
    r = pykvm("inspect", str(core), "--json")
    assert r.returncode == 0, r.stderr.decode()
    rep = json.loads(r.stdout)
    assert rep["trigger"] == "exception" and rep["vector"] == 6
    text = json.dumps(rep)
    assert "0xfeedface" in text.lower() or str(0xfeedface) in text
    assert "ud2" in text


def test_emulation_failure_is_a_guest_crash_not_a_vmm_bug(tmp_path):
    # int3 is #BP on ordinary hosts (caught by the stubs) and a KVM emulation failure on
    # nested software-assisted ones: either way a guest crash naming RIP, never a VMM error.
    err = crash(tmp_path, flat(tmp_path, "nop\nint3", 64), 64)
    assert ("exception #BP breakpoint (vector 3" in err) or ("KVM internal error" in err and f"RIP {LOAD + 1:#x}" in err), err
