"""The seccomp sandbox: what a sandboxed VMM may still do, and that anything else stops it by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from pykvm import errors, landlock, sandbox
from pykvm.kvm import ioctls

from .helpers import ROOT, pykvm


def sandboxed(tmp_path, body: str, before: str = "", timeout: float = 60, landlock: bool = True
              ) -> subprocess.CompletedProcess:
    """Run `before`, sandbox.install(crash_dir=tmp_path/'crashes'), then `body`, in a fresh Python; no KVM needed.

    landlock=False: as on a kernel without Landlock. `crash_fd` is the crash directory's held descriptor.
    """
    code = textwrap.dedent("""
        import os, sys, threading
        from pathlib import Path
        from pykvm import sandbox
        from pykvm.crash import crashdir
        crash = Path(sys.argv[1])
    """) + textwrap.dedent(before) + "\nsandbox.install(crash)\ncrash_fd = crashdir._held.get(str(crash))\n" + \
        textwrap.dedent(body)
    env = dict(os.environ, PYKVM_SANDBOX_LANDLOCK="on" if landlock else "off")
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "crashes")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


NO_LANDLOCK_LINE = "pykvm: sandbox: Landlock is not available in this kernel, so paths are not confined"
needs_landlock = pytest.mark.skipif(landlock.abi_version() == 0, reason="this kernel has no Landlock")


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


CORE_BEFORE = """
    from tests.test_crash_support import make_memory, regs, long_sregs
    from pykvm.crash import CrashSnapshot, VcpuState, write_core
"""
CORE_BODY = """
    mem = make_memory()
    mem.write(0x300000, b"guest bytes")
    snap = CrashSnapshot("host-request", "test", [VcpuState(0, regs(rip=0x1234), long_sregs(0x200000), None)], 0, mem)
    print(write_core(snap, crash))
    print(write_core(snap, crash))
"""


@pytest.mark.parametrize("landlock_on", [
    pytest.param(True, marks=needs_landlock), False])
def test_a_core_is_written_under_the_sandbox(tmp_path, landlock_on):
    r = sandboxed(tmp_path, CORE_BODY, before=CORE_BEFORE, landlock=landlock_on)
    assert r.returncode == 0, r
    assert (NO_LANDLOCK_LINE in r.stderr) != landlock_on
    paths = r.stdout.split()
    assert len(paths) == 2 and paths[0] != paths[1]
    assert sorted(os.listdir(tmp_path / "crashes")) == sorted(os.path.basename(p) for p in paths)  # no temp left
    for p in paths:
        data = open(p, "rb").read()
        assert data[:4] == b"\x7fELF" and b"guest bytes" in data
        assert os.stat(p).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("exit_how", ["return", "os._exit after release()"])
def test_a_crash_dir_made_for_a_run_without_cores_is_gone_when_it_ends(tmp_path, exit_how):
    # the sandbox lets nothing make a directory later, so it makes the crash directory at start; a run that wrote
    # no core leaves nothing behind (a shell started before the sandbox removes it, and the VMM waits for it)
    body = "sandbox.release(); os._exit(0)" if exit_how != "return" else "pass"
    r = sandboxed(tmp_path / "a", 'import stat\nprint(stat.S_ISDIR(os.fstat(crash_fd).st_mode))\n' + body)
    assert r.returncode == 0, r
    assert r.stdout == "True\n"                               # it existed while the run ran
    assert os.listdir(tmp_path) == []                        # crashes/ and the missing a/ made for it: both gone


def test_a_crash_dir_that_existed_or_holds_a_core_stays(tmp_path):
    (tmp_path / "crashes").mkdir()
    assert sandboxed(tmp_path, "pass").returncode == 0
    assert os.listdir(tmp_path / "crashes") == []              # it was there before: left alone
    r = sandboxed(tmp_path / "b", CORE_BODY, before=CORE_BEFORE)
    assert r.returncode == 0, r
    assert len(os.listdir(tmp_path / "b" / "crashes")) == 2


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


# ------------------------------------------------------------------ the filesystem boundary (issue 19, finding 1)
# Each attacker step a compromised VMM took on the seccomp-only sandbox, now refused. A planted
# `.pth` in site-packages runs in the next Python the user starts, outside any sandbox.
PLANT_TMPFILE_LINK = """
    site = Path(sys.argv[1]).parent / "site-packages"
    try:
        fd = os.open(str(site), os.O_WRONLY | os.O_TMPFILE, 0o644, dir_fd=crash_fd)
        os.write(fd, b"import os; os.system('echo pwned')\\n")
        os.link(f"/proc/self/fd/{fd}", str(site / "zz.pth"), dst_dir_fd=crash_fd)
        print("planted")
    except OSError as e:
        print("refused", e.errno)
"""
# a file made where the VMM may make one (its crash directory), then given a name elsewhere
LINK_OUT_OF_CRASH_DIR = """
    site = Path(sys.argv[1]).parent / "site-packages"
    fd = os.open(".", os.O_WRONLY | os.O_TMPFILE, 0o644, dir_fd=crash_fd)
    os.write(fd, b"import os\\n")
    try:
        os.link(f"/proc/self/fd/{fd}", str(site / "zz.pth"), dst_dir_fd=crash_fd)
        print("planted")
    except OSError as e:
        print("refused", e.errno)
"""
LINK_EXISTING = """
    site = Path(sys.argv[1]).parent / "site-packages"
    for target in (str(site / "hostname"), "hostname"):     # elsewhere, and into the crash directory
        try:
            os.link("/etc/hostname", target, dst_dir_fd=crash_fd)
            print("linked", target)
        except OSError as e:
            print("refused", e.errno)
"""


@needs_landlock
@pytest.mark.parametrize("body", [PLANT_TMPFILE_LINK, LINK_OUT_OF_CRASH_DIR], ids=["tmpfile-outside", "from-crash-dir"])
def test_no_file_can_be_planted_outside_the_crash_dir(tmp_path, body):
    (tmp_path / "site-packages").mkdir()
    r = sandboxed(tmp_path, body)
    assert r.returncode == 0, r
    assert r.stdout.split()[0] == "refused", r
    assert os.listdir(tmp_path) == ["site-packages"] and os.listdir(tmp_path / "site-packages") == []
    assert NO_LANDLOCK_LINE not in r.stderr


@needs_landlock
def test_no_existing_file_can_be_linked_anywhere(tmp_path):
    (tmp_path / "site-packages").mkdir()
    r = sandboxed(tmp_path, LINK_EXISTING)
    assert r.returncode == 0, r
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["refused", "refused"], r
    assert os.listdir(tmp_path) == ["site-packages"] and os.listdir(tmp_path / "site-packages") == []


@pytest.mark.parametrize("landlock_on", [
    pytest.param(True, marks=needs_landlock), False])
def test_no_directory_can_be_made_even_through_the_crash_dir_descriptor(tmp_path, landlock_on):
    target = tmp_path / "made"
    r = sandboxed(tmp_path, f'os.mkdir({str(target)!r}, dir_fd=crash_fd)', landlock=landlock_on)
    assert blocked(r, "mkdirat"), r
    assert not target.exists()


STAT_WITH_EMPTY_PATH_FLAG = """
    print("fstat of a descriptor:", os.fstat(crash_fd).st_ino == crash_ino)
    buf = ffi.new("char[256]")
    for path in (b"/etc/shadow", b"/etc/hostname", b"."):
        rc = libc.fstatat(-100, path, buf, 0x1000)          # AT_FDCWD, AT_EMPTY_PATH
        print(path.decode(), rc, ffi.errno if rc else 0)
    print("through a descriptor:", libc.fstatat(crash_fd, b"/etc/shadow", buf, 0x1000), ffi.errno)
"""
STAT_BEFORE = """
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("int fstatat(int dirfd, const char *path, void *buf, int flags);")
    libc = ffi.dlopen(None)
    crash.mkdir(exist_ok=True)
    crash_ino = os.stat(crash).st_ino
"""


@pytest.mark.parametrize("landlock_on", [
    pytest.param(True, marks=needs_landlock), False])
def test_no_path_can_be_stated_whatever_the_flags_and_descriptors_still_can(tmp_path, landlock_on):
    r = sandboxed(tmp_path, STAT_WITH_EMPTY_PATH_FLAG, before=STAT_BEFORE, landlock=landlock_on)
    assert r.returncode == 0, r
    import errno as errno_

    assert r.stdout.splitlines() == ["fstat of a descriptor: True", f"/etc/shadow -1 {errno_.EACCES}",
                                     f"/etc/hostname -1 {errno_.EACCES}", f". -1 {errno_.EACCES}",
                                     f"through a descriptor: -1 {errno_.EACCES}"], r


@pytest.mark.parametrize("landlock_on", [
    pytest.param(True, marks=needs_landlock), False])
def test_no_path_can_be_opened_for_reading_whatever_the_flags(tmp_path, landlock_on):
    r = sandboxed(tmp_path, """
        for path, flags in (("/etc/hostname", os.O_RDONLY), ("/etc/hostname", os.O_PATH),
                            ("/etc", os.O_RDONLY | os.O_DIRECTORY), ("/etc/hostname", os.O_RDONLY | os.O_NOFOLLOW),
                            (".", os.O_RDONLY)):
            for dir_fd in (None, crash_fd):
                try:
                    os.close(os.open(path, flags, dir_fd=dir_fd))
                    print("opened", path)
                except PermissionError:
                    print("refused")
    """, landlock=landlock_on)
    assert r.returncode == 0, r
    assert r.stdout.split() == ["refused"] * 10, r


def test_without_landlock_the_sandbox_says_it_is_weaker_once_and_still_writes_cores(tmp_path):
    r = sandboxed(tmp_path, CORE_BODY, before=CORE_BEFORE, landlock=False)
    assert r.returncode == 0, r
    assert r.stderr.count(NO_LANDLOCK_LINE) == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert len(os.listdir(tmp_path / "crashes")) == 2


@needs_landlock
def test_threads_started_before_the_sandbox_are_confined_too(tmp_path):
    # device threads run before install(); Landlock (before ABI 8) restricts only the thread that asks
    r = sandboxed(tmp_path, """
        go.set()
        t.join()
        print(out[0])
    """, before=f"""
        out = []
        go = threading.Event()
        def plant():
            go.wait()
            try:
                fd = os.open({str(tmp_path)!r}, os.O_WRONLY | os.O_TMPFILE, 0o644, dir_fd=crashdir._held[str(crash)])
                os.link(f"/proc/self/fd/{{fd}}", {str(tmp_path / "planted")!r})
                out.append("planted")
            except OSError as e:
                out.append(f"refused {{e.errno}}")
        t = threading.Thread(target=plant)
        t.start()
    """)
    assert r.returncode == 0, r
    assert r.stdout.split()[0] == "refused", r
    assert not (tmp_path / "planted").exists()


def test_the_policy_names_only_real_requests_and_calls():
    import pyseccomp

    assert all(isinstance(getattr(ioctls, n), int) for n in sandbox.KVM_REQUESTS)
    assert not {"KVM_CREATE_VM", "KVM_CREATE_VCPU", "KVM_SET_CPUID2", "KVM_ENABLE_CAP"} & set(sandbox.KVM_REQUESTS)
    for name in sandbox.ALLOWED:
        assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) >= 0, name
    assert not {"execve", "execveat", "fork", "vfork", "socket", "connect", "unlink", "unlinkat", "open",
                "openat", "ptrace", "kill"} & set(sandbox.ALLOWED)
    # nothing that makes, links or renames a path is allowed but the core's linkat (Landlock bounds where it lands),
    # and no stat of a path: newfstatat is trapped (then answered only for an empty path) or refused
    rules = sandbox.policy(7, 1234)
    allowed = {name for action, name, _ in rules if action == "allow"}
    assert not {"mkdir", "mkdirat", "symlink", "symlinkat", "link", "rename", "renameat", "renameat2", "mknod",
                "mknodat", "newfstatat", "statx", "stat", "lstat", "openat2", "open_by_handle_at"} & allowed
    assert [conds for action, name, conds in rules if name == "linkat"] == [[(0, 0xFFFFFFFF, 0xFFFFFF9C),
                                                                           (2, 0xFFFFFFFF, 7), (4, 0xFFFFFFFF, 0x400)]]


@pytest.mark.parametrize("abi, fs, net, scope", [
    (1, 0x1FFF, 0, 0), (2, 0x3FFF, 0, 0), (3, 0x7FFF, 0, 0), (4, 0x7FFF, 3, 0), (5, 0xFFFF, 3, 0),
    (6, 0xFFFF, 3, 1), (7, 0xFFFF, 3, 1), (8, 0xFFFF, 3, 3)])
def test_landlock_handles_every_right_each_abi_knows(abi, fs, net, scope):
    # everything handled is denied but what a rule grants: handling all a kernel knows is what confines
    assert landlock.handled(abi) == (fs, net, scope)
    assert landlock.CRASH_DIR_RIGHTS & fs == (landlock.MAKE_REG | landlock.WRITE_FILE | (landlock.TRUNCATE if abi >= 3
                                                                                         else 0))


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
