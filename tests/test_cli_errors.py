"""Bad input gets one line naming the problem, a distinct exit status, and no traceback."""


import pytest

from pykvm import errors
from pykvm.cli import parse_size

from .helpers import pykvm
from .test_boot_image import elf


def one_line_error(r, status, *needles):
    err = r.stderr.decode()
    assert r.returncode == status, err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_guest_name():
    one_line_error(pykvm("run", "no-such-guest"), errors.EXIT_UNKNOWN_GUEST, "no-such-guest", "hello")


def test_truncated_elf(tmp_path):
    k = tmp_path / "trunc.elf"
    k.write_bytes(elf()[:40])
    one_line_error(pykvm("run", str(k)), errors.EXIT_BAD_IMAGE, "truncated")


def test_non_x86_elf(tmp_path):
    k = tmp_path / "arm.elf"
    k.write_bytes(elf(machine=183))
    one_line_error(pykvm("run", str(k)), errors.EXIT_BAD_IMAGE, "not an x86 ELF")


def test_not_a_kernel_at_all(tmp_path):
    k = tmp_path / "notes.txt"
    k.write_bytes(b"hello world\n" * 10)
    one_line_error(pykvm("run", str(k)), errors.EXIT_BAD_IMAGE, "not an ELF")


@pytest.mark.kvm
def test_kernel_does_not_fit(tmp_path):
    k = tmp_path / "big.elf"
    k.write_bytes(elf(segments=((0x100000, 0x100000, b"\x90" * 16, 64 << 20),)))
    one_line_error(pykvm("run", str(k), "--mem", "16M"), errors.EXIT_IMAGE_DOES_NOT_FIT, "--mem")


@pytest.mark.kvm
def test_kernel_over_firmware_area(tmp_path):
    k = tmp_path / "low.elf"
    k.write_bytes(elf(segments=((0x20000, 0x20000, b"\x90" * 16, 16),), entry=0x20000))
    one_line_error(pykvm("run", str(k)), errors.EXIT_IMAGE_DOES_NOT_FIT, "firmware area")


@pytest.mark.parametrize("mem", ["4097K", "1M", "0"])
def test_bad_memory_sizes(mem):
    one_line_error(pykvm("run", "hello", "--mem", mem), errors.EXIT_BAD_MEMORY_SIZE, "memory size")


def test_memory_size_syntax():
    assert parse_size("128M") == 128 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("64") == 64 << 20
    with pytest.raises(errors.MemorySizeError):
        parse_size("lots")


@pytest.mark.kvm
def test_overlapping_device_ranges():
    one_line_error(pykvm("run", "hello", "--exit-port", "0x3f8"), errors.EXIT_DEVICE_CONFIG,
                   "already belongs to serial")


def test_missing_dev_kvm():
    r = pykvm("run", "hello", env={"PYKVM_DEV_KVM": "/nonexistent/kvm"})
    one_line_error(r, errors.EXIT_KVM_UNAVAILABLE, "/nonexistent/kvm")


def test_unreadable_dev_kvm(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    r = pykvm("info", env={"PYKVM_DEV_KVM": str(fake)})
    one_line_error(r, errors.EXIT_KVM_UNAVAILABLE, str(fake))


def test_bogus_option_is_usage_error():
    r = pykvm("run", "hello", "--frobnicate")
    assert r.returncode == errors.EXIT_USAGE
    assert b"Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path):
    k = tmp_path / "trunc.elf"
    k.write_bytes(elf()[:40])
    r = pykvm("run", str(k), "--debug")
    assert r.returncode == errors.EXIT_BAD_IMAGE
    assert b"Traceback" in r.stderr


def test_statuses_are_distinct():
    names = [n for n in dir(errors) if n.startswith("EXIT_")]
    values = [getattr(errors, n) for n in names]
    assert len(set(values)) == len(values)
    assert all(v % 2 == 0 for v in values), "odd statuses belong to the guest's debug-exit codes"


# -- found trying pykvm as a new user would (issue 9) ---------------------------------------------


@pytest.mark.parametrize("where", ["/proc/nope/x", "DIR"])
def test_unopenable_serial_file(tmp_path, where):
    path = str(tmp_path) if where == "DIR" else where
    one_line_error(pykvm("run", "hello", "--serial", path), errors.EXIT_OUTPUT_UNWRITABLE, "--serial", path)


@pytest.mark.parametrize("where", ["/proc/nope/cores", "FILE/cores", "/proc"])
def test_unwritable_crash_dir_is_refused_at_start(tmp_path, where):
    (tmp_path / "FILE").write_bytes(b"")
    path = where.replace("FILE", str(tmp_path / "FILE"))
    one_line_error(pykvm("run", "hello", "--crash-dir", path), errors.EXIT_OUTPUT_UNWRITABLE, "--crash-dir", path)
    assert not list(tmp_path.glob("**/.pykvm-probe*")) and not list(tmp_path.glob("**/.probe-*"))


def test_crash_dir_check_creates_nothing(tmp_path):
    from pykvm.crash.core import check_crash_dir

    check_crash_dir(tmp_path / "a" / "b")
    check_crash_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (("run", "hello", "--bogus"), "--bogus"),
    (("run", "hello", "--exit-port", "0x10000"), "--exit-port"),
    (("run",), "KERNEL"),
    (("no-such-command",), "no-such-command"),
    (("run", "hello", "--cpus", "0"), "--cpus"),
])
def test_bad_options_are_one_line(args, needle):
    one_line_error(pykvm(*args), errors.EXIT_USAGE, needle, "--help")


def test_closed_stdout_ends_quietly_like_other_tools():
    """`pykvm guests | head -1`: the reader goes away; pykvm dies of SIGPIPE with nothing on stderr."""
    import os
    import signal
    import subprocess
    import sys

    from .helpers import ROOT

    r, w = os.pipe()
    os.close(r)   # the reader is gone before pykvm writes a byte
    try:
        p = subprocess.run([sys.executable, "-m", "pykvm", "guests"], cwd=ROOT, stdout=w, stderr=subprocess.PIPE,
                           timeout=60)
    finally:
        os.close(w)
    assert p.returncode == -signal.SIGPIPE, p.stderr.decode()
    assert p.stderr == b""


def test_dump_refuses_a_process_that_is_not_a_pykvm_vm():
    import os

    for pid in (1, os.getpid()):
        one_line_error(pykvm("dump", str(pid)), errors.EXIT_USAGE, str(pid), "not a `pykvm run`")  # no announcement
    one_line_error(pykvm("dump", "999999999"), errors.EXIT_USAGE, "no process")
    one_line_error(pykvm("dump", "0"), errors.EXIT_USAGE)


def test_dump_check_reads_owner_and_handler(tmp_path):
    """check_vm against a fake /proc: other users, and a process not catching SIGUSR1."""
    import os

    from pykvm.vmproc import NotAVmError, check_vm

    def fake(pid, uid, sigcgt):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "status").write_text(f"Name:\tpython3\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nSigCgt:\t{sigcgt:016x}\n")

    me, usr1 = os.getuid(), 1 << 9
    fake(10, me, usr1)
    fake(11, me, usr1 | 2)
    fake(12, me + 1, usr1)
    fake(14, me, 0)
    check_vm(10, str(tmp_path))
    check_vm(11, str(tmp_path))
    for pid, why in ((12, "another user"), (14, "does not take dump requests"), (16, "no process")):
        with pytest.raises(NotAVmError, match=why):
            check_vm(pid, str(tmp_path))


IMPOSTOR = r"""
import os, signal, socket, sys, time
signal.signal(signal.SIGUSR1, lambda *_: open(sys.argv[1], "a").write("signalled\n"))
if sys.argv[2] == "other-pid":       # claims a pid that is not its own: the name of its parent
    s = socket.socket(socket.AF_UNIX)
    s.bind("\0pykvm-vm-%d" % os.getppid())
    s.listen(1)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["argv", "other-pid"])
def test_dump_does_not_signal_a_look_alike(tmp_path, how):
    """A process that looks like `pykvm run` by its argv, catches SIGUSR1, or announces a VM in another
    process's name is not signalled: only the process listening on pykvm-vm-<its own pid> is."""
    import os
    import subprocess
    import sys

    marker = tmp_path / "signalled"
    argv = [sys.executable, "-c", IMPOSTOR, str(marker), how, "-m", "pykvm", "run", "hello"]
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
                               "p.wait()", *argv], stdout=subprocess.PIPE)
    try:
        assert parent.stdout.readline() == b"ready\n"
        children = [int(p) for p in os.listdir("/proc") if p.isdigit()
                    and _ppid(int(p)) == parent.pid]
        assert len(children) == 1
        target = parent.pid if how == "other-pid" else children[0]
        r = pykvm("dump", str(target))
        assert r.returncode == errors.EXIT_USAGE, r.stderr
        assert b"not a" in r.stderr
        r = pykvm("dump", str(children[0]))
        assert r.returncode == errors.EXIT_USAGE, r.stderr
    finally:
        parent.kill()
        for p in [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == parent.pid]:
            os.kill(p, 9)
        parent.wait()
    assert not marker.exists()


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_program_is_not_a_kernel(tmp_path):
    """A host PIE (ET_DYN with PT_INTERP), like /bin/ls, is refused before anything boots."""
    import struct

    from .test_boot_image import elf as make_elf

    blob = bytearray(make_elf(segments=((0, 0, b"/lib64/ld-linux-x86-64.so.2\0", 28),
                                        (0x100000, 0x100000, b"\x90" * 16, 32))))
    struct.pack_into("<H", blob, 16, 3)                     # e_type = ET_DYN
    struct.pack_into("<I", blob, 64, 3)                     # the first phdr becomes PT_INTERP
    k = tmp_path / "prog"
    k.write_bytes(bytes(blob))
    one_line_error(pykvm("run", str(k), "--timeout", "5"), errors.EXIT_BAD_IMAGE, "this is a program, not a kernel")
    import shutil

    ls = shutil.which("ls")
    if ls:
        one_line_error(pykvm("run", ls, "--timeout", "5"), errors.EXIT_BAD_IMAGE, "this is a program, not a kernel")


@pytest.mark.kvm
def test_ram_whose_kvm_metadata_would_exhaust_the_host_is_refused_up_front():
    # 64 TiB of guest RAM needs ~128 GiB of KVM page metadata in the host kernel: refused before
    # any memory is registered, instead of driving the host out of memory
    r = pykvm("run", "hello", "--mem", "64T", "--no-dump")
    assert r.returncode == 22, r
    assert b"host kernel memory" in r.stderr and r.stderr.count(b"\n") == 1
