"""The seccomp sandbox: what a sandboxed VMM may still do, and that anything else stops it by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from pykvm import errors, sandbox
from pykvm.kvm import ioctls

from .helpers import ROOT, pykvm


def sandboxed(tmp_path, body: str, before: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `before`, sandbox.install(crash_dir=tmp_path/'crashes'), then `body`, in a fresh Python; no KVM needed."""
    code = textwrap.dedent("""
        import os, sys, threading
        from pathlib import Path
        from pykvm import sandbox
        crash = Path(sys.argv[1])
    """) + textwrap.dedent(before) + "\nsandbox.install(crash)\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "crashes")], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def blocked(r: subprocess.CompletedProcess, call: str) -> bool:
    return r.returncode == errors.EXIT_SANDBOX and f"blocked system call {call} (#" in r.stderr


def test_execve_stops_the_process_naming_the_call(tmp_path):
    r = sandboxed(tmp_path, 'os.execv("/bin/true", ["true"])')
    assert blocked(r, "execve"), r
    assert "<string>:" in r.stderr and "on thread MainThread" in r.stderr   # where it came from


def test_creating_a_file_stops_the_process_and_creates_nothing(tmp_path):
    target = tmp_path / "new"
    r = sandboxed(tmp_path, f'open({str(target)!r}, "w")')
    assert blocked(r, "openat"), r
    assert not target.exists()


@pytest.mark.parametrize("body, call", [
    ('os.open("/etc/hostname", os.O_RDWR)', "openat"),                    # an existing file, for writing
    ('os.unlink(str(crash))', "unlink"),
    ('import socket; socket.socket()', "socket"),
    ('os.fork()', "clone"),                    # processes, never; threads below
    ('os.kill(1, 0)', "kill"),
    ('import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)', "mmap"),
])
def test_other_forbidden_calls_stop_the_process(tmp_path, body, call):
    r = sandboxed(tmp_path, body, before="import socket")   # modules cannot be imported once sandboxed
    assert blocked(r, call), r


def test_reads_are_refused_without_stopping_and_threads_still_run(tmp_path):
    r = sandboxed(tmp_path, """
        try:
            open("/etc/hostname").read()
        except PermissionError:
            print("read refused")
        try:
            os.stat("/etc/hostname")
        except PermissionError:
            print("stat refused")
        out = []
        t = threading.Thread(target=lambda: out.append(os.fstat(1).st_mode))
        t.start(); t.join()
        print("thread ran", bool(out))
        import traceback
        try:
            1 / 0
        except ZeroDivisionError:
            traceback.print_exc()      # source lines cannot be read: the traceback still prints
        print("done")
    """)
    assert r.returncode == 0, r
    assert r.stdout.split("\n") == ["read refused", "stat refused", "thread ran True", "done", ""]
    assert "ZeroDivisionError" in r.stderr


def test_a_core_is_written_under_the_sandbox(tmp_path):
    r = sandboxed(tmp_path, before="""
        from tests.test_crash_support import make_memory, regs, long_sregs
        from pykvm.crash import CrashSnapshot, VcpuState, write_core
    """, body="""
        mem = make_memory()
        mem.write(0x300000, b"guest bytes")
        snap = CrashSnapshot("host-request", "test", [VcpuState(0, regs(rip=0x1234), long_sregs(0x200000), None)], 0, mem)
        print(write_core(snap, crash))
        print(write_core(snap, crash))
    """)
    assert r.returncode == 0, r
    paths = r.stdout.split()
    assert len(paths) == 2 and paths[0] != paths[1]
    assert sorted(os.listdir(tmp_path / "crashes")) == sorted(os.path.basename(p) for p in paths)  # no temp left
    for p in paths:
        data = open(p, "rb").read()
        assert data[:4] == b"\x7fELF" and b"guest bytes" in data
        assert os.stat(p).st_mode & 0o777 == 0o600


def test_an_unusable_crash_dir_is_reported_when_a_core_is_due(tmp_path):
    (tmp_path / "crashes").write_text("a file, not a directory")
    # the core writer is held in memory beside what a run has imported (the machine), not imported up front
    r = sandboxed(tmp_path, """
        from pykvm.crash import CoreWriteError, write_core
        try:
            write_core(None, crash)
        except CoreWriteError as e:
            print("no core:", e)
    """, before="import pykvm.machine")
    assert r.returncode == 0, r
    assert r.stdout.startswith("no core: cannot create crash directory")


def test_the_policy_names_only_real_requests_and_calls():
    import pyseccomp

    assert all(isinstance(getattr(ioctls, n), int) for n in sandbox.KVM_REQUESTS)
    assert not {"KVM_CREATE_VM", "KVM_CREATE_VCPU", "KVM_SET_CPUID2", "KVM_ENABLE_CAP"} & set(sandbox.KVM_REQUESTS)
    for name in sandbox.ALLOWED:
        assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) >= 0, name
    assert not {"execve", "execveat", "fork", "vfork", "socket", "connect", "unlink", "unlinkat", "open",
                "openat", "ptrace", "kill"} & set(sandbox.ALLOWED)


# ------------------------------------------------------------------ a whole VMM (needs KVM)
EVIL_SERIAL = """
import os, sys
from pykvm import record
from pykvm.cli import main
from pykvm.devices import registry
from pykvm.devices.serial import Serial16550

class Evil(Serial16550):
    def io_write(self, offset, size, value):
        what = os.environ["EVIL"]
        if what == "execve":
            os.execv("/bin/true", ["true"])
        elif what == "create":
            os.close(os.open(os.environ["EVIL_PATH"], os.O_WRONLY | os.O_CREAT, 0o644))
        super().io_write(offset, size, value)

# a device model gone bad: the first byte the guest prints triggers it
registry.TYPES["serial"] = record.replace(registry.TYPES["serial"], build=lambda ctx, o: Evil(
    out_fd=ctx.serial_out, in_fd=ctx.serial_in, irq=None))
main(sys.argv[1:])
"""


def run_evil(tmp_path, what: str, *extra):
    env = dict(os.environ, EVIL=what, EVIL_PATH=str(tmp_path / "planted"))
    return subprocess.run([sys.executable, "-c", EVIL_SERIAL, "run", "hello", "--serial", "none", "--timeout", "60",
                           "--crash-dir", str(tmp_path / "c"), *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.kvm
@pytest.mark.parametrize("what, call", [("execve", "execve"), ("create", "openat")])
def test_a_device_model_that_misbehaves_after_set_up_is_stopped(tmp_path, what, call):
    r = run_evil(tmp_path, what)
    assert blocked(r, call), r
    assert "on thread vcpu0" in r.stderr and "in io_write" in r.stderr
    assert not (tmp_path / "planted").exists()


@pytest.mark.kvm
def test_sandbox_off_lets_the_same_model_through(tmp_path):
    r = run_evil(tmp_path, "create", "--sandbox", "off")
    assert r.returncode == 0, r
    assert (tmp_path / "planted").exists()


@pytest.mark.kvm
def test_a_sandboxed_vmm_refuses_a_save_path_it_would_have_to_open(tmp_path):
    from pykvm.control.client import _exchange

    sock = str(tmp_path / "vm.sock")
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "mailbox", "--cmdline", "work", "--device", "mailbox",
                             "--control", sock, "--timeout", "60", "--no-dump", "--serial", "none"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        raw = _exchange(sock, {"cmd": "save", "path": str(tmp_path / "x.state")}, 30)   # no descriptor attached
        assert not raw["ok"] and "sandboxed" in raw["error"], raw
        assert not (tmp_path / "x.state").exists()
        stats = pykvm("ctl", sock, "stats")
        assert stats.returncode == 0 and json.loads(stats.stdout)["ok"]
    finally:
        proc.kill()
        proc.wait()
