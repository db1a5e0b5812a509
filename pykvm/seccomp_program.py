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
is compiled again and rewritten, never loaded.
"""

from __future__ import annotations

import json
import os

from . import digest, ffigen, paths

FORMAT = 1
# Two stand-in pids (inside the kernel's pid range, so the compiled program has the same shape
# as with a real one); the instructions where the two programs differ are where the pid goes.
PID_A, PID_B = 0x3FFFF1, 0x3FFFF2
MAX_INSNS = 4096             # BPF_MAXINSNS: the kernel refuses longer programs
INSN = 8                     # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

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
    text = json.dumps([FORMAT, os.uname().machine, version, policy], sort_keys=True)
    return digest.hexdigest(text.encode())[:32]


def _digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "digest"}
    return digest.hexdigest(json.dumps(body, sort_keys=True).encode())


def read_entry(path, key: str) -> tuple[bytes, list[int], dict[int, str]] | None:
    """(program with PID_A in place, pid positions, syscall names) from a cache file, or None if absent or bad."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        entry = json.loads(raw)
        if not isinstance(entry, dict) or entry.get("digest") != _digest(entry) or entry.get("key") != key:
            return None
        program = bytes.fromhex(entry["program"])
        pid_at, names = entry["pid_at"], entry["names"]
        if not program or len(program) % INSN or len(program) > MAX_INSNS * INSN:
            return None
        if not isinstance(pid_at, list) or not pid_at or not isinstance(names, list):
            return None
        for i in pid_at:
            if type(i) is not int or not 0 <= i < len(program) // INSN or _k(program, i) != PID_A:
                return None
        table = {}
        for item in names:
            nr, name = item
            if type(nr) is not int or not isinstance(name, str):
                return None
            table[nr] = name
        return program, pid_at, table
    except (OSError, ValueError, KeyError, TypeError, RecursionError):   # unreadable, not JSON or hex, wrong shape
        return None


def write_entry(path, key: str, program: bytes, pid_at: list[int], names: dict[int, str]) -> None:
    """Store a compiled program atomically; an unwritable cache costs speed, not correctness."""
    entry = {"key": key, "program": program.hex(), "pid_at": pid_at, "names": sorted(names.items())}
    entry["digest"] = _digest(entry)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(json.dumps(entry))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


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
    path = os.path.join(paths.cache_root(), "seccomp", f"{key}.json")
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
