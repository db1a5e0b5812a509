"""The live gdb stub driven by the real gdb (`gdb -batch`) against running bundled guests."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest
from elftools.elf.elffile import ELFFile

from pykvm.gdb import rsp

from .helpers import ROOT, guest
from .test_crash_support import gdb_or_skip

pytestmark = [pytest.mark.kvm, pytest.mark.gdb]


class Vmm:
    """`pykvm run NAME --gdb SPEC` (tcp::0 by default), with where it listens read from its stderr."""

    def __init__(self, name: str, *args: str, wait: bool = True, gdb: str = "tcp::0"):
        cmd = [sys.executable, "-m", "pykvm", "run", name, "--gdb", gdb, *args]
        if wait:
            cmd.append("--gdb-wait")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        self.head = []
        for line in self.proc.stderr:
            line = line.decode(errors="replace")
            self.head.append(line)
            m = re.search(r"gdb: listening on (\S+)", line)
            if m:
                self.where = m.group(1)
                self.port = int(self.where.rpartition(":")[2]) if gdb.startswith("tcp") else None
                break
        else:
            raise AssertionError("pykvm did not start its gdb server: " + "".join(self.head))

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """Wait for pykvm to end: (status, serial output, stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError("pykvm did not end: " + "".join(self.head) + err.decode(errors="replace"))
        return self.proc.returncode, out.decode(errors="replace"), "".join(self.head) + err.decode(errors="replace")


def run_gdb(vmm: Vmm, elf, *commands: str) -> str:
    cmd = [gdb_or_skip(), "-nx", "-batch", "-ex", "set confirm off", "-ex", f"target remote 127.0.0.1:{vmm.port}"]
    for c in commands:
        cmd += ["-ex", c]
    try:
        res = subprocess.run(cmd + [str(elf)], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        vmm.proc.kill()
        raise
    return res.stdout + res.stderr


def symbol(elf, name: str) -> tuple[int, int]:
    """(address, size) of a function or object in a guest ELF."""
    with open(elf, "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]
    return sym["st_value"], sym["st_size"]


def frames(out: str) -> list[str]:
    """Function names of the last backtrace in gdb's output, innermost first."""
    found: dict[int, str] = {}
    for n, fn in re.findall(r"^#(\d+)\s+(?:0x[0-9a-f]+ in )?(\w+) \(", out, re.M):
        if int(n) == 0:
            found = {}
        found[int(n)] = fn
    return [found[i] for i in sorted(found)]


def test_break_backtrace_registers_stepi_and_exit():
    elf = guest("gdb-target")
    bump, size = symbol(elf, "bump")
    vmm = Vmm("gdb-target")
    out = run_gdb(vmm, elf, "info registers rip", "break bump", "continue", "bt", "info registers rip",
                  "stepi", "info registers rip", "info registers cr3 efer", "delete", "continue")
    status, serial, err = vmm.finish()
    entry, _ = symbol(elf, "_start")
    rips = [int(x, 16) for x in re.findall(r"^rip\s+(0x[0-9a-f]+)", out, re.M)]
    assert rips[0] == entry, out                         # --gdb-wait: stopped before the first instruction
    assert "Breakpoint 1, bump (value=value@entry=1)" in out, out
    assert frames(out.split("Breakpoint 1, bump")[1]) == ["bump", "work", "kmain", "_start"], out
    assert rips[1] == bump, out
    assert bump < rips[2] < bump + size, out             # one instruction further, still in bump
    assert re.search(r"^cr3\s+0x[0-9a-f]+", out, re.M) and re.search(r"^efer\s+0x[0-9a-f]+", out, re.M), out
    assert "exited with code 0103" in out, out           # status 67, in gdb's octal
    assert status == 67, err
    assert serial == "gdb-target: start\ngdb-target: counter=2\n"
    if "cannot take int3" in err:                        # this host: the fallback is said to gdb as well
        assert "breakpoints use the 4 hardware debug registers" in out, out


def test_watch_a_global_until_it_is_written():
    elf = guest("gdb-target")
    vmm = Vmm("gdb-target")
    out = run_gdb(vmm, elf, "break work", "continue", "delete", "watch counter", "continue", "continue",
                  "delete", "continue")
    status, _serial, err = vmm.finish()
    changes = re.findall(r"Old value = (\d+)\s+New value = (\d+)", out)
    assert changes == [("0", "1"), ("1", "2")], out
    assert re.search(r"in bump \(value=value@entry=1\)", out), out   # stopped right after the store
    assert "exited with code 0103" in out, out
    assert status == 67, err


def test_info_threads_on_an_smp_guest():
    elf = guest("smp")
    vmm = Vmm("smp", "--cpus", "2")
    out = run_gdb(vmm, elf, "info threads", "break ap_main", "continue", "info threads", "bt", "delete", "continue")
    status, serial, err = vmm.finish()
    first, _, later = out.partition("Breakpoint 1 at")
    assert re.search(r"^\*\s+1\s+Thread 1 \(vCPU 0\)", first, re.M), out
    assert re.search(r"^\s+2\s+Thread 2 \(vCPU 1\)", first, re.M), out
    assert "Thread 2 hit Breakpoint 1, ap_main (cpu=1)" in later, out
    assert re.search(r"^\*\s+2\s+Thread 2 \(vCPU 1\)\s+ap_main \(cpu=1\)", later, re.M), out
    assert re.search(r"^\s+1\s+Thread 1 \(vCPU 0\)", later, re.M), out
    assert frames(later)[0] == "ap_main", out
    assert "exited with code 045" in out, out
    assert status == 37, err
    assert "smp: 2 cpus online" in serial


def test_crash_is_a_sigsegv_stop_before_the_core(tmp_path):
    elf = guest("crash-null")
    crashes = tmp_path / "crashes"
    vmm = Vmm("crash-null", "--crash-dir", str(crashes))
    out = run_gdb(vmm, elf, "continue", "bt", "info registers rip", "continue")
    status, _serial, err = vmm.finish()
    c_addr, c_size = symbol(elf, "c")
    assert "Program received signal SIGSEGV" in out, out
    assert frames(out) == ["c", "b", "a", "kmain", "_start"], out
    rip = int(re.search(r"^rip\s+(0x[0-9a-f]+)", out, re.M).group(1), 16)
    assert c_addr <= rip < c_addr + c_size, out          # the faulting load, not the firmware stub
    assert "Program terminated with signal SIGSEGV" in out, out
    assert status == 16, err
    assert len(list(crashes.glob("*.core"))) == 1, err   # the core is written once gdb let go


# ---------------------------------------------------------------- the protocol by hand


class Client:
    """A minimal remote-protocol client for what gdb -batch cannot do (^C at a chosen moment, garbage)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.framer = rsp.Framer(max_packet=1 << 20)
        self.pending: list[bytes] = []

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def reply(self) -> bytes:
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.pending += [rsp.unescape(v) for k, v in self.framer.feed(data) if k == "packet"]
        return self.pending.pop(0)

    def ask(self, body: bytes) -> bytes:
        self.send(rsp.frame(body))
        return self.reply()


def test_interrupt_a_running_guest_survive_garbage_and_kill():
    vmm = Vmm("crash-hang", "--timeout", "120", wait=False)     # attach to a guest that is already running
    elf = guest("crash-hang")
    spin, spin_size = symbol(elf, "spin_forever")
    c = Client(vmm.port)
    assert c.ask(b"?").startswith(b"T05thread:1;")
    c.send(b"$c#63")
    time.sleep(0.5)
    c.send(b"\x03")
    assert c.reply() == b"T02thread:1;"                          # SIGINT, on vCPU 0
    rip = int.from_bytes(bytes.fromhex(c.ask(b"p10").decode()), "little")
    assert spin <= rip < spin + spin_size
    # malformed packets, bad checksums and noise: error replies or '-', and the stub still answers
    assert c.ask(b"m1,zz") == b"E16"
    assert c.ask(b"Z0,1") == b"E16"
    assert c.ask(b"P999=00") == b"E16"
    c.send(b"$g#00" + bytes(range(256)).replace(b"$", b"") + b"#zz")
    assert c.ask(b"qfThreadInfo") == b"m1"
    c.send(b"$k#6b")
    status, _serial, err = vmm.finish()
    assert status == 130, err
    assert "stopped by gdb" in err
