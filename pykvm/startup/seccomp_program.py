"""The sandbox's seccomp program: compiled by libseccomp once, cached, and loaded with one system call.

Building the filter through pyseccomp costs ~10 ms of every `pykvm run` (ctypes finding the
library with ldconfig, a thousand name look-ups, compiling the rules), for a program that is
the same on every run but for one number: the process id tgkill is confined to. So the
program is compiled once with a stand-in pid, stored in the cache directory with the
positions of that pid, and later runs patch in their own pid and hand the program to the
kernel themselves, exactly as libseccomp's seccomp_load would (no_new_privs, then
seccomp(SET_MODE_FILTER, TSYNC)).

A cache entry is named by a hash of everything the program depends on: the rules, the
libseccomp version and the architecture. It is checked before use (its own digest, its key,
the program's size and the stand-in pid at every recorded position); anything wrong and it
is compiled again and rewritten, never loaded. Entries are pykvm/startup/cachefile.py's format, which
loads without json or re.
"""

from __future__ import annotations

import os

from .. import paths
from . import cachefile, digest, ffigen

FORMAT = 2                   # 2: cachefile entries, keyed by the policy's repr (1: JSON)
# Two stand-in pids (inside the kernel's pid range, so the compiled program has the same shape
# as with a real one); the instructions where the two programs differ are where the pid goes.
PID_A, PID_B = 0x3FFFF1, 0x3FFFF2
MAX_INSNS = 4096             # BPF_MAXINSNS: the kernel refuses longer programs
INSN = 8                     # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
MAX_NR = 1024                # system call numbers named (x86-64's are below 512)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")

CDEF = """
    struct scmp_version { unsigned int major; unsigned int minor; unsigned int micro; };
    const struct scmp_version *seccomp_version(void);
    struct sock_fprog_pykvm { unsigned short len; void *filter; };
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
    long syscall(long number, ...);
"""
_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = 317           # x86-64
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1


class ProgramError(Exception):
    """The program could not be compiled or loaded (the message says why)."""


def ffi():
    """The cffi types for libseccomp's version and the prctl/seccomp calls."""
    return ffigen.load("seccomp", CDEF)


def libseccomp_version() -> str | None:
    """'major.minor.micro' of the libseccomp the dynamic linker finds, or None without one."""
    f = ffi()
    try:
        lib = f.dlopen("libseccomp.so.2")
        v = lib.seccomp_version()
    except (OSError, AttributeError):
        return None
    return f"{v.major}.{v.minor}.{v.micro}"


def cache_key(policy: list, version: str) -> str:
    """The name of the cache entry for this policy (rules with the stand-in pid) and libseccomp version."""
    # repr of plain str/int/tuple/list data is exact and stable, and needs no json import on every run
    text = repr([FORMAT, os.uname().machine, version, policy])
    return digest.hexdigest(text.encode())[:32]


def _name_ok(name) -> bool:
    return isinstance(name, str) and name != "" and _NAME_CHARS.issuperset(name)


def read_entry(path, key: str) -> tuple[bytes, list[int], dict[int, str]] | None:
    """(program with PID_A in place, pid positions, syscall names) from a cache file, or None if absent or bad."""
    entry = cachefile.read(path)
    if type(entry) is not dict or entry.keys() != {"key", "program", "pid_at", "names"} or entry["key"] != key:
        return None
    program, pid_at, names = entry["program"], entry["pid_at"], entry["names"]
    if type(program) is not bytes or not program or len(program) % INSN or len(program) > MAX_INSNS * INSN:
        return None
    if type(pid_at) is not list or not pid_at or type(names) is not str:
        return None
    for i in pid_at:
        if type(i) is not int or not 0 <= i < len(program) // INSN or _k(program, i) != PID_A:
            return None
    # names: the name of system call N on line N, empty where there is none
    lines = names.split("\n")
    if len(lines) > MAX_NR or not _NAME_CHARS.issuperset(names.replace("\n", "")):
        return None
    return program, pid_at, {nr: name for nr, name in enumerate(lines) if name}


def write_entry(path, key: str, program: bytes, pid_at: list[int], names: dict[int, str]) -> None:
    """Store a compiled program atomically; an unwritable cache costs speed, not correctness."""
    if not all(type(nr) is int and 0 <= nr < MAX_NR and _name_ok(name) for nr, name in names.items()):
        return        # a name the entry cannot hold: compiled on every run rather than cached wrong
    lines = [""] * (max(names) + 1 if names else 0)
    for nr, name in names.items():
        lines[nr] = name
    cachefile.write(path, {"key": key, "program": bytes(program), "pid_at": list(pid_at), "names": "\n".join(lines)})


def _k(program: bytes, index: int) -> int:
    return int.from_bytes(program[index * INSN + 4:index * INSN + 8], "little")


def patch_pid(program: bytes, pid_at: list[int], pid: int) -> bytes:
    """The program with `pid` at every stand-in position."""
    out = bytearray(program)
    for i in pid_at:
        out[i * INSN + 4:i * INSN + 8] = pid.to_bytes(4, "little")
    return bytes(out)


def compile_policy(policy: list, make_policy_for_pid) -> tuple[bytes, list[int], dict[int, str]]:
    """Compile with libseccomp (pyseccomp): (program with PID_A, pid positions, syscall names by number).

    make_policy_for_pid(pid) gives the rules for a pid; `policy` is make_policy_for_pid(PID_A).
    """
    import pyseccomp as sc   # ImportError/RuntimeError/OSError without it or libseccomp: the caller says so

    a = _compile(sc, policy)
    b = _compile(sc, make_policy_for_pid(PID_B))
    if len(a) != len(b):
        raise ProgramError("libseccomp compiled a different program for another pid")
    pid_at = [i for i in range(len(a) // INSN) if a[i * INSN:(i + 1) * INSN] != b[i * INSN:(i + 1) * INSN]]
    if not pid_at or any(_k(a, i) != PID_A or _k(b, i) != PID_B or
                         a[i * INSN:i * INSN + 4] != b[i * INSN:i * INSN + 4] for i in pid_at):
        raise ProgramError("the pid's place in the compiled program is not a plain constant")
    names = {}
    for nr in range(1024):
        try:
            names[nr] = sc.resolve_syscall(sc.Arch.NATIVE, nr).decode()
        except ValueError:
            pass
    return a, pid_at, names


def _compile(sc, policy: list) -> bytes:
    flt = sc.SyscallFilter(sc.TRAP)
    for action, name, conds in policy:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            continue   # an older libseccomp may not know a newer call; nothing can make it then
        act = sc.ALLOW if action == "allow" else sc.ERRNO(action[1])
        flt.add_rule(act, name, *(sc.Arg(arg, sc.MASKED_EQ, mask, value) for arg, mask, value in conds))
    fd = os.memfd_create("pykvm-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            flt.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def program_for(make_policy_for_pid, pid: int) -> tuple[bytes, dict[int, str]]:
    """(the program for this pid, syscall names by number): from the cache when a valid entry is there."""
    policy = make_policy_for_pid(PID_A)
    version = libseccomp_version()
    if version is None:
        compiled = compile_policy(policy, make_policy_for_pid)   # pyseccomp will say what is missing
        return patch_pid(compiled[0], compiled[1], pid), compiled[2]
    key = cache_key(policy, version)
    path = os.path.join(paths.cache_root(), "seccomp", f"{key}.entry")
    cached = read_entry(path, key)
    if cached is None:
        cached = compile_policy(policy, make_policy_for_pid)
        write_entry(path, key, *cached)
    program, pid_at, names = cached
    return patch_pid(program, pid_at, pid), names


def load(program: bytes) -> None:
    """Confine every thread of this process with `program`, as libseccomp's seccomp_load with TSYNC does."""
    f = ffi()
    libc = f.dlopen(None)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(f.errno, os.strerror(f.errno))
    insns = f.from_buffer("char[]", bytearray(program))
    prog = f.new("struct sock_fprog_pykvm *", {"len": len(program) // INSN, "filter": insns})
    rc = libc.syscall(_SYS_SECCOMP, f.cast("unsigned int", _SECCOMP_SET_MODE_FILTER),
                      f.cast("unsigned int", _SECCOMP_FILTER_FLAG_TSYNC), prog)
    if rc < 0:
        raise OSError(f.errno, os.strerror(f.errno))
    if rc > 0:   # TSYNC: the id of a thread that could not be synchronised
        raise OSError(0, f"thread {rc} could not take the filter")
