"""End to end: the crash-* guests die on purpose under the real `pykvm run`; gdb and `pykvm inspect` explain the core.

Every guest is booted once per test session (the `crashed` fixture) and then checked from
three sides: the run itself (exit status, the serial line, exactly one core), real gdb on the
core with the guest's ELF (threads, backtrace, $rip at the faulting instruction, a global's
value as the guest left it), and `pykvm inspect --json` / text (trigger, vector, the marked
instruction, the symbolized backtrace). What each guest does and prints is documented at the
top of guests/crash-*/crash-*.c.

Three tests guard bugs this file found: test_inspect_backtrace_is_complete (inspect's
frame-pointer walk used to skip the caller of a frameless leaf function; without --kernel it
still did: test_inspect_without_kernel_finds_the_same_frames) and
test_gdb_names_the_signal_of_a_multi_vcpu_core (only the crashing vCPU's NT_PRSTATUS carried
the signal, and BFD keeps the last note's).
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import capstone
import pytest
from elftools.elf.elffile import ELFFile

from .conftest import require_tool
from .helpers import guest, pykvm

pytestmark = pytest.mark.kvm

STATUS_CRASH = 16
STATUS_TIMEOUT = 18
HH_BASE = 0xFFFFFFFF80000000


def _mem_operand(addr: int) -> Callable:
    """An instruction whose memory operand is the absolute address `addr` (movabs)."""
    return lambda i: i.mnemonic in ("mov", "movabs") and f"[{addr:#x}]" in i.op_str


@dataclass
class Case:
    """What one crash guest must produce."""

    name: str
    serial: str                      # the whole serial output, exact bytes
    trigger: str | tuple             # inspect's trigger (a tuple: any of these)
    vector: int | None
    fault_func: str                  # function holding the crashing vCPU's RIP
    gdb_frames: list                 # gdb's backtrace function names, innermost first (a prefix)
    insn: Callable | None = None     # picks the faulting instruction in fault_func (None: any)
    mnemonics: tuple = ()            # inspect's marked instruction must be one of these
    error_code: int | None = None
    cr2: int | None = None
    status: int = STATUS_CRASH
    args: tuple = ()
    crashing_vcpu: int = 0
    global_expr: str = ""            # gdb `p` argument
    signal: str = "SIGSEGV"          # what gdb says the program "terminated with"
    global_check: Callable = field(default=lambda v: True)
    # inspect's frame-pointer walk skips the caller of a frameless leaf (see test docstring)


CASES = {c.name: c for c in [
    Case("crash-null", "crash-null: about to dereference NULL\n", "exception", 14, "c",
         ["c", "b", "a", "kmain", "_start"],
         insn=lambda i: i.mnemonic == "mov" and "ptr [" in i.op_str, mnemonics=("mov",),
         error_code=0, cr2=0, global_expr="crash_null_sink", global_check=lambda v: v == 0),
    Case("crash-div0", "crash-div0: dividing 1000 by zero\n", "exception", 0, "divide",
         ["divide", "kmain", "_start"],
         insn=lambda i: i.mnemonic in ("div", "idiv"), mnemonics=("div", "idiv"),
         error_code=0, global_expr="divisor", global_check=lambda v: v == 0,
         signal="SIGFPE"),
    Case("crash-ud", "crash-ud: executing ud2\n", "exception", 6, "invalid_opcode",
         ["invalid_opcode", "kmain", "_start"],
         insn=lambda i: i.mnemonic == "ud2", mnemonics=("ud2",),
         error_code=0, global_expr="crash_ud_sink", global_check=lambda v: v == 0,
         signal="SIGILL"),
    Case("crash-stack", "crash-stack: recursing into the guard page\n", "exception", 8, "recurse",
         ["recurse", "recurse", "recurse", "recurse"],
         error_code=0, global_expr="crash_stack_depth", global_check=lambda v: v >= 50),
    Case("crash-panic", "crash-panic: registering crash info, then panicking\n"
         "PANIC: deliberate panic, code 42\n", "pvpanic", None, "panic",
         # halt_forever is inlined into panic(): gdb shows it as its own frame
         ["halt_forever", "panic", "report_fatal", "kmain", "_start"],
         global_expr="crash_panic_code", global_check=lambda v: v == 42, signal="SIGABRT"),
    Case("crash-hang", "crash-hang: spinning forever with interrupts off\n", "timeout", None, "spin_forever",
         ["spin_forever", "kmain", "_start"], mnemonics=("mov", "add", "jmp"),
         status=STATUS_TIMEOUT, args=("--timeout", "1"),
         global_expr="hang_counter", global_check=lambda v: v > 0,
         signal="SIGALRM"),
    Case("crash-smp", "crash-smp: cpu 0 starting cpu 1\ncrash-smp: cpu 1 reading a bad pointer\n",
         "exception", 14, "ap_crash", ["ap_crash", "ap_main", "rt_ap_entry", "tramp_lm64"],
         insn=_mem_operand(0xBAD00000000), mnemonics=("mov", "movabs"),
         error_code=0, cr2=0xBAD00000000, args=("--cpus", "2"), crashing_vcpu=1,
         global_expr="bsp_spins", global_check=lambda v: v > 0),
    Case("crash-hh", "crash-hh: writing through a bad pointer from the higher half\n", "exception", 14,
         "level3", ["level3", "level2", "level1", "kmain", "_start"],
         insn=_mem_operand(0xDEAD0000000), mnemonics=("mov", "movabs"),
         error_code=2, cr2=0xDEAD0000000, global_expr="hh_counter", global_check=lambda v: v == 0x1003),
    # A triple fault is KVM_EXIT_SHUTDOWN; nested or software-assisted KVM may report an internal error.
    Case("crash-idt", "crash-idt: loading an empty IDT, then faulting\n", ("triple-fault", "internal-error"),
         None, "fault_without_idt", ["fault_without_idt", "kmain", "_start"],
         insn=lambda i: i.mnemonic == "ud2", mnemonics=("ud2",),
         global_expr="crash_idt_sink", global_check=lambda v: v == 0),
]}
NAMES = list(CASES)


@dataclass
class Crash:
    """One run of a crash guest."""

    case: Case
    elf: Path
    status: int
    serial: str
    stderr: str
    files: list
    core: Path | None
    report: dict | None = None       # `pykvm inspect --json`, once


@pytest.fixture(scope="session")
def crashed(tmp_path_factory):
    """name -> Crash; each guest runs once per session, on first use."""
    runs: dict[str, Crash] = {}

    def get(name: str) -> Crash:
        if name not in runs:
            case = CASES[name]
            crash_dir = tmp_path_factory.mktemp(name)
            args = case.args if "--timeout" in case.args else case.args + ("--timeout", "30")
            r = pykvm("run", name, "--crash-dir", str(crash_dir), *args, timeout=120)
            files = sorted(p.name for p in crash_dir.iterdir())
            cores = sorted(crash_dir.glob("*.core"))
            runs[name] = Crash(case, guest(name), r.returncode, r.stdout.decode(errors="replace"),
                               r.stderr.decode(errors="replace"), files, cores[0] if len(cores) == 1 else None)
        return runs[name]

    return get


# -- facts from the guest's ELF ---------------------------------------------------

def _function(elf: Path, name: str) -> tuple[int, bytes]:
    """(address, code bytes) of a sized function symbol."""
    with open(elf, "rb") as f:
        e = ELFFile(f)
        syms = e.get_section_by_name(".symtab").get_symbol_by_name(name)
        assert syms, f"{name} not in {elf}"
        start, size = syms[0]["st_value"], syms[0]["st_size"]
        assert size, f"{name} has no size"
        for sec in e.iter_sections():
            if sec["sh_flags"] & 0x4 and sec["sh_addr"] <= start < sec["sh_addr"] + sec["sh_size"]:  # SHF_EXECINSTR
                off = start - sec["sh_addr"]
                return start, sec.data()[off:off + size]
    raise AssertionError(f"{name} is not in an executable section of {elf}")


def _insns(elf: Path, func: str) -> list:
    start, code = _function(elf, func)
    return list(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64).disasm(code, start))


def _symbol(elf: Path, name: str) -> int:
    with open(elf, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


def expected_rip(c: Crash) -> int | None:
    """The faulting instruction's address, from the ELF (None when any address in fault_func will do)."""
    insns = _insns(c.elf, c.case.fault_func)
    if c.case.name == "crash-panic":
        # pvpanic is a port write: KVM reports it after the `out`, so RIP is the next instruction.
        outs = [i for i in insns if i.mnemonic == "out"]
        assert len(outs) == 1, outs
        return outs[0].address + outs[0].size
    if c.case.insn is None:
        return None
    hits = [i.address for i in insns if c.case.insn(i)]
    assert len(hits) == 1, f"expected one faulting instruction in {c.case.fault_func}, found {hits}"
    return hits[0]


def assert_rip(c: Crash, rip: int) -> None:
    want = expected_rip(c)
    if want is not None:
        assert rip == want, f"RIP {rip:#x}, faulting instruction at {want:#x}"
    start, code = _function(c.elf, c.case.fault_func)
    assert start <= rip < start + len(code), f"RIP {rip:#x} outside {c.case.fault_func}"


def prstatus_pids(core: Path) -> list[int]:
    """pr_pid of each NT_PRSTATUS note, in file order."""
    with open(core, "rb") as f:
        e = ELFFile(f)
        return [struct.unpack_from("<I", n["n_desc"], 32)[0]
                for seg in e.iter_segments() if seg["p_type"] == "PT_NOTE"
                for n in seg.iter_notes() if n["n_type"] == "NT_PRSTATUS"]


def vmcoreinfo(core: Path) -> bytes:
    with open(core, "rb") as f:
        e = ELFFile(f)
        return b"".join(n["n_desc"] if isinstance(n["n_desc"], bytes) else n["n_desc"].encode()
                        for seg in e.iter_segments() if seg["p_type"] == "PT_NOTE"
                        for n in seg.iter_notes() if n["n_name"] == "VMCOREINFO")


# -- the run ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_run_exit_status_serial_and_one_core(crashed, name):
    c = crashed(name)
    assert c.serial == c.case.serial, c.stderr
    assert c.status == c.case.status, c.stderr
    assert len(c.files) == 1 and c.core is not None, f"crash dir holds {c.files}; {c.stderr}"
    assert f"pykvm: core written to {c.core}" in c.stderr, c.stderr
    if c.case.trigger == "exception":
        m = re.search(r"pykvm: guest crashed on vCPU (\d+): exception #\w+ [a-z -]+ "
                      r"\(vector (\d+), error code (0x[0-9a-f]+)\) at RIP (0x[0-9a-f]+)", c.stderr)
        assert m, c.stderr
        assert int(m[1]) == c.case.crashing_vcpu and int(m[2]) == c.case.vector, c.stderr
        assert int(m[3], 16) == c.case.error_code, c.stderr
        assert_rip(c, int(m[4], 16))
        if c.case.cr2 is not None:
            assert f", CR2 {c.case.cr2:#x}" in c.stderr, c.stderr
    elif c.case.trigger == "timeout":
        assert "guest still running after --timeout 1s" in c.stderr, c.stderr
    elif c.case.trigger == "pvpanic":
        assert "pvpanic" in c.stderr, c.stderr
    else:
        assert re.search(r"triple fault|internal error", c.stderr), c.stderr


# -- gdb ----------------------------------------------------------------------------

def run_gdb(c: Crash, *commands: str) -> str:
    gdb = require_tool("gdb")
    assert c.core is not None, c.stderr
    cmd = [gdb, "-batch", "-nx", "-ex", "set pagination off"]
    for command in commands:
        cmd += ["-ex", command]
    r = subprocess.run(cmd + [str(c.elf), str(c.core)], capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def gdb_frames(out: str) -> list[str]:
    """Function names of the `bt` output, by frame number (gdb also prints frame #0 on loading the core)."""
    frames = dict(re.findall(r"^#(\d+)\s+(?:0x[0-9a-f]+ in )?(\w+) \(", out, re.M))
    return [frames[str(i)] for i in range(len(frames))]


def gdb_values(out: str) -> dict[int, str]:
    """$N = value lines."""
    return {int(n): v.strip() for n, v in re.findall(r"^\$(\d+) = (.*)$", out, re.M)}


@pytest.mark.gdb
@pytest.mark.parametrize("name", NAMES)
def test_gdb_threads_backtrace_rip_and_global(crashed, name):
    c = crashed(name)
    if name == "crash-idt" and "triple fault" not in c.stderr:
        pytest.skip("KVM reported an internal error, not a triple fault: the registers are KVM's, "
                    "not necessarily the faulting instruction's")
    out = run_gdb(c, "info threads", "bt", "p/x $rip", f"p/x {c.case.global_expr}")

    threads = re.findall(r"^([* ])\s+(\d+)\s+LWP (\d+)\s", out, re.M)
    ncpus = 2 if c.case.name == "crash-smp" else 1
    assert len(threads) == ncpus, out
    # The crashing vCPU's NT_PRSTATUS comes first: gdb's current thread 1, LWP = vCPU index + 1.
    assert threads[0] == ("*", "1", str(c.case.crashing_vcpu + 1)), out

    if ncpus == 1:   # multi-vCPU cores: see test_gdb_names_the_signal_of_a_multi_vcpu_core
        assert re.search(rf"^Program terminated with signal {c.case.signal}, ", out, re.M), out

    frames = gdb_frames(out)
    want = c.case.gdb_frames
    assert frames[:len(want)] == want, out
    if name == "crash-stack":
        # Every recursion level, then the kmain that switched stacks. kmain's frame is on the boot
        # stack, below the guarded one, so gdb stops there ("previous frame inner to this frame").
        n = int(re.search(r"^#0\s+0x[0-9a-f]+ in recurse \(n=(\d+)\)", out, re.M)[1])
        assert frames == ["recurse"] * n + ["kmain"], out

    values = gdb_values(out)
    assert_rip(c, int(values[1], 16))
    value = int(values[2], 16)
    assert c.case.global_check(value), f"{c.case.global_expr} = {value:#x}\n{out}"
    if name == "crash-hh":
        assert int(values[1], 16) >= HH_BASE, out
    if name == "crash-stack":
        assert value in (n - 1, n), out   # recurse(n) faulted on its first stack access


@pytest.mark.gdb
def test_gdb_crash_smp_other_thread_is_the_spinning_bsp(crashed):
    c = crashed("crash-smp")
    out = run_gdb(c, "thread 2", "bt", "p/x $rip")
    assert re.search(r"^\[Switching to thread 2 \(LWP 1\)\]", out, re.M), out
    frames = [f for f in gdb_frames(out) if f not in ("rdtsc", "cpu_relax")]   # inlined helpers
    assert frames[:3] == ["bsp_wait", "kmain", "_start"], out
    start, code = _function(c.elf, "bsp_wait")
    assert start <= int(gdb_values(out)[1], 16) < start + len(code), out
    assert prstatus_pids(c.core) == [2, 1]


@pytest.mark.gdb
def test_gdb_names_the_signal_of_a_multi_vcpu_core(crashed):
    out = run_gdb(crashed("crash-smp"), "info threads")
    assert re.search(r"^Program terminated with signal SIGSEGV, ", out, re.M), out


# -- pykvm inspect --------------------------------------------------------------------

def inspect_json(c: Crash) -> dict:
    assert c.core is not None, c.stderr
    if c.report is None:
        r = pykvm("inspect", str(c.core), "--kernel", str(c.elf), "--json")
        assert r.returncode == 0, r.stderr.decode()
        c.report = json.loads(r.stdout)
    return c.report


def crashing(report: dict) -> dict:
    return next(v for v in report["vcpus"] if v["index"] == report["crashing_vcpu"])


def func_of(symbol: str | None) -> str | None:
    return None if symbol is None else symbol.split("+")[0]


@pytest.mark.parametrize("name", NAMES)
def test_inspect_json(crashed, name):
    c = crashed(name)
    report = inspect_json(c)
    case = c.case
    triggers = case.trigger if isinstance(case.trigger, tuple) else (case.trigger,)
    assert report["trigger"] in triggers, report["reason"]
    assert report["vector"] == case.vector
    assert report["error_code"] == case.error_code
    assert report["crashing_vcpu"] == case.crashing_vcpu
    assert len(report["vcpus"]) == (2 if name == "crash-smp" else 1)
    assert report["serial_tail"] == case.serial
    assert report["symbols_error"] is None

    v = crashing(report)
    assert v["mode"]["name"] == "long" and v["mode"]["bits"] == 64
    if case.cr2 is not None:
        assert v["cr2"] == case.cr2
    if name == "crash-idt":
        # the guest's own lidt: the core shows the empty IDT it died with
        assert (v["segments"]["idt"]["base"], v["segments"]["idt"]["limit"]) == (0, 0)
        return  # where a triple fault leaves RIP is KVM's business
    assert_rip(c, v["regs"]["rip"])
    assert func_of(v["pc_symbol"]) == case.fault_func

    current = [i for i in v["code"]["insns"] if i["current"]]
    assert len(current) == 1 and current[0]["address"] == v["pc"], v["code"]
    if case.mnemonics:
        assert current[0]["mnemonic"] in case.mnemonics, current
    if name == "crash-panic":
        before = [i for i in v["code"]["insns"] if i["address"] < v["pc"]]
        assert before and before[-1]["mnemonic"] == "out", v["code"]   # the pvpanic write

    # The symbolized backtrace starts in the faulting function and only names functions of the
    # expected call chain, in order (see test_inspect_backtrace_is_complete for the full chain).
    names = [func_of(f["symbol"]) for f in v["backtrace"]["frames"]]
    assert names[0] == case.fault_func, names
    want = [f for f in case.gdb_frames if f != "halt_forever"]   # gdb's inline frame
    if name == "crash-stack":
        assert set(names) == {"recurse"} and len(names) > 10, names
    else:
        it = iter(want)
        assert all(n in it for n in names), f"{names} is not a subsequence of {want}"
        assert names[-1] == want[-1], names


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("crash-idt", "crash-stack")])
def test_inspect_backtrace_is_complete(crashed, name):
    c = crashed(name)
    v = crashing(inspect_json(c))
    names = [func_of(f["symbol"]) for f in v["backtrace"]["frames"]]
    want = [f for f in c.case.gdb_frames if f != "halt_forever"]
    assert names == want, names
    assert v["backtrace"]["stop"] == "end of frame-pointer chain"


@pytest.mark.parametrize("name", NAMES)
def test_inspect_without_kernel_finds_the_same_frames(crashed, name):
    """Without --kernel there are no symbols, but the frames (the frameless leaf's caller too) are the same."""
    c = crashed(name)
    r = pykvm("inspect", str(c.core), "--json")
    assert r.returncode == 0, r.stderr.decode()
    bare = [f["pc"] for f in crashing(json.loads(r.stdout))["backtrace"]["frames"]]
    assert bare == [f["pc"] for f in crashing(inspect_json(c))["backtrace"]["frames"]]


@pytest.mark.parametrize("name", NAMES)
def test_inspect_text(crashed, name):
    c = crashed(name)
    assert c.core is not None, c.stderr
    r = pykvm("inspect", str(c.core), "--kernel", str(c.elf))
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    m = re.search(r"^  trigger:\s+(\S+)", out, re.M)
    triggers = c.case.trigger if isinstance(c.case.trigger, tuple) else (c.case.trigger,)
    assert m and m[1].rstrip(":") in triggers, out
    if c.case.vector is not None:
        assert f"(vector {c.case.vector})" in out, out
    if name != "crash-idt":
        assert re.search(rf"^  => 0x[0-9a-f]+ <{c.case.fault_func}(\+0x[0-9a-f]+)?>:", out, re.M), out
    assert c.case.serial.splitlines()[0] in out, out


def test_panic_crash_info_lands_in_the_core(crashed):
    c = crashed("crash-panic")
    text = "BUILD_ID=crash-panic-0001\nVERSION=1.2.3\nPANIC=deliberate panic, code 42\n"
    assert inspect_json(c)["crash_info"] == text
    assert vmcoreinfo(c.core) == text.encode()


def test_stack_overflow_faults_in_the_guard_page(crashed):
    """The #DF's RSP and CR2 (the #PF that could not be delivered) are in the unmapped guard page."""
    c = crashed("crash-stack")
    v = crashing(inspect_json(c))
    guard = _symbol(c.elf, "guarded_stack")
    assert guard % 4096 == 0
    assert guard <= v["cr2"] < guard + 4096, hex(v["cr2"])
    assert guard <= v["regs"]["rsp"] < guard + 4096 + 128, hex(v["regs"]["rsp"])
