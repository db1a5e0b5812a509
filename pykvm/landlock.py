"""Landlock: the filesystem boundary of the sandbox, enforced by the kernel on every thread of the VMM.

seccomp sees system-call numbers and integer arguments, never path strings, so it cannot stop
an absolute path from reaching anywhere the user may write. Landlock (Linux 5.13+) can: once a
thread is restricted, every access right the ruleset handles is denied except beneath the paths
a rule names. confine() handles every filesystem right the running kernel knows (its ABI
version decides which) and grants, beneath the crash directory only, what writing a core needs:
making a regular file, writing it, sizing it. Nothing can be read, executed, made, linked,
renamed, removed or truncated anywhere else; descriptors opened before are not affected (guest
memory, /dev/kvm, the serial log, sockets).

Landlock restricts the calling thread and the threads it creates later. Threads that already
run (devices, the supervisor, the serial reader) must restrict themselves: from ABI 8 the kernel
does it for all of them (LANDLOCK_RESTRICT_SELF_TSYNC); before that, each thread is sent a
signal whose handler is a few instructions of machine code, not Python (a Python handler would
need the GIL and the allocator at an arbitrary point of that thread), that sets no_new_privs and
calls landlock_restrict_self with the same ruleset, as glibc does for setuid() on every thread.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from .startup import ffigen

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446   # x86-64, every architecture since 5.13
_SYS_PRCTL, _SYS_TGKILL = 157, 234
_PR_SET_NO_NEW_PRIVS = 38
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
RESTRICT_SELF_TSYNC = 1 << 3          # ABI 8: the ruleset applies to every thread of the process

# handled_access_fs rights, with the ABI that introduced each
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER = 1 << 13          # ABI 2: linking or renaming into another directory
TRUNCATE = 1 << 14       # ABI 3
IOCTL_DEV = 1 << 15      # ABI 5: ioctl on device files opened after the restriction
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
FS_LATEST = (1 << 16) - 1                     # ABI 5 and later
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1   # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1   # ABI 6

# What a core needs beneath the crash directory: an unnamed file made there (O_TMPFILE), written,
# sized with ftruncate, then named there with linkat (MAKE_REG; the same directory needs no REFER).
CRASH_DIR_RIGHTS = MAKE_REG | WRITE_FILE | TRUNCATE

CDEF = """
    long syscall(long number, ...);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int mprotect(void *addr, size_t len, int prot);
    int munmap(void *addr, size_t length);
    struct sigaction_landlock { void *handler; unsigned long mask[16]; int flags; void *restorer; };
    int sigaction(int signum, const struct sigaction_landlock *act, struct sigaction_landlock *old);
"""

# The handler each existing thread runs (no stack use, no memory but the result word):
#   mov eax, SYS_prctl; mov edi, PR_SET_NO_NEW_PRIVS; mov esi, 1; xor edx, edx; xor r10d, r10d; xor r8d, r8d
#   syscall; test eax, eax; jnz store
#   mov eax, SYS_landlock_restrict_self; mov edi, <ruleset fd>; xor esi, esi; syscall
#   store: movabs rdx, <result word>; mov [rdx], eax; ret
_HANDLER_HEAD = bytes.fromhex("b89d000000" "bf26000000" "be01000000" "31d2" "4531d2" "4531c0" "0f05" "85c0" "750e"
                              "b8be010000" "bf")
_HANDLER_MID = bytes.fromhex("31f6" "0f05" "48ba")
_HANDLER_TAIL = bytes.fromhex("8902" "c3")
_PENDING = 0x7FFFFFFF           # the result word before the thread has answered (results are 0 or -errno)
_SIGNAL = signal.SIGRTMAX - 1   # not used elsewhere: vCPU kicks are SIGUSR2, dumps SIGUSR1
_SA_RESTART = 0x10000000
_PROT_READ, _PROT_WRITE, _PROT_EXEC = 1, 2, 4
_MAP_PRIVATE, _MAP_ANONYMOUS = 0x02, 0x20
_PAGE = 4096
_WAIT = 5.0                     # seconds a thread may take to run the handler
# Kernel workers KVM starts in the VM's thread group (kvm-nx-lpage-recovery, once a guest has run) block
# every signal and never run user code: nothing to confine, and the handler could never reach them.
_PF_KTHREAD, _PF_USER_WORKER = 0x00200000, 0x00004000


class LandlockError(Exception):
    """The ruleset could not be built or enforced (the message says why)."""


def ffi():
    """The cffi types for the system calls and the signal set-up."""
    return ffigen.load("landlock", CDEF)


def _lib():
    f = ffi()
    return f, f.dlopen(None)


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    f, libc = _lib()
    v = libc.syscall(f.cast("long", SYS_CREATE_RULESET), f.NULL, f.cast("long", 0),
                     f.cast("long", CREATE_RULESET_VERSION))
    return v if v > 0 else 0


def handled(abi: int) -> tuple[int, int, int]:
    """(filesystem rights, network rights, scopes) a ruleset handles on this ABI: all it knows of each.

    Signal scoping needs every thread in one domain (TSYNC, ABI 8): threads restricted one by one
    get separate domains, and a scope would then stop the vCPU kicks between them.
    """
    fs = FS_BY_ABI.get(abi, FS_LATEST) if abi >= 1 else 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scope = (SCOPE_ABSTRACT_UNIX_SOCKET | (SCOPE_SIGNAL if abi >= 8 else 0)) if abi >= 6 else 0
    return fs, net, scope


def _check(f, rc: int, what: str) -> int:
    if rc < 0:
        raise LandlockError(f"{what}: {os.strerror(f.errno)}")
    return rc


def confine(crash_fd: int | None, abi: int | None = None) -> int:
    """Restrict every thread of this process to making and writing files beneath crash_fd; returns the ABI used."""
    f, libc = _lib()
    abi = abi_version() if abi is None else abi
    if abi < 1:
        raise LandlockError("this kernel has no Landlock")
    fs, net, scope = handled(abi)
    attr = fs.to_bytes(8, "little") + net.to_bytes(8, "little") + scope.to_bytes(8, "little")
    size = 8 if abi < 4 else 16 if abi < 6 else 24       # older kernels know only the leading fields
    buf = f.new("char[]", attr[:size])
    ruleset = _check(f, libc.syscall(f.cast("long", SYS_CREATE_RULESET), buf, f.cast("long", size),
                                     f.cast("long", 0)), "landlock_create_ruleset")
    try:
        if crash_fd is not None:
            rule = f.new("char[]", (CRASH_DIR_RIGHTS & fs).to_bytes(8, "little") + crash_fd.to_bytes(4, "little"))
            _check(f, libc.syscall(f.cast("long", SYS_ADD_RULE), f.cast("long", ruleset),
                                   f.cast("long", RULE_PATH_BENEATH), rule, f.cast("long", 0)),
                   "landlock_add_rule (crash directory)")
        _check(f, libc.syscall(f.cast("long", _SYS_PRCTL), f.cast("long", _PR_SET_NO_NEW_PRIVS), f.cast("long", 1),
                               f.cast("long", 0), f.cast("long", 0), f.cast("long", 0)), "prctl(PR_SET_NO_NEW_PRIVS)")
        if abi >= 8:
            _check(f, libc.syscall(f.cast("long", SYS_RESTRICT_SELF), f.cast("long", ruleset),
                                   f.cast("long", RESTRICT_SELF_TSYNC)), "landlock_restrict_self")
        else:
            _restrict_every_thread(f, libc, ruleset)
    finally:
        os.close(ruleset)
    return abi


def _restrict_every_thread(f, libc, ruleset: int) -> None:
    """This thread, then every other one through the machine-code handler, until no unrestricted thread is left."""
    me = threading.get_native_id()
    done = {me}
    result = f.new("int *", _PENDING)
    code = (_HANDLER_HEAD + ruleset.to_bytes(4, "little") + _HANDLER_MID
            + int(f.cast("uintptr_t", result)).to_bytes(8, "little") + _HANDLER_TAIL)
    page = libc.mmap(f.NULL, _PAGE, _PROT_READ | _PROT_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if int(f.cast("intptr_t", page)) == -1:
        raise LandlockError(f"mmap: {os.strerror(f.errno)}")
    old = f.new("struct sigaction_landlock *")
    installed = False
    tasks = os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # listed again once restricted
    try:
        f.memmove(page, code, len(code))
        if libc.mprotect(page, _PAGE, _PROT_READ | _PROT_EXEC) != 0:
            raise LandlockError(f"mprotect: {os.strerror(f.errno)}")
        act = f.new("struct sigaction_landlock *")
        act.handler = page
        act.flags = _SA_RESTART
        _check(f, libc.sigaction(_SIGNAL, act, old), "sigaction")
        installed = True
        done |= _kernel_workers(tasks)      # read now: once restricted, this thread opens nothing
        # this thread first: its later threads (the vCPUs) inherit the domain
        _check(f, libc.syscall(f.cast("long", SYS_RESTRICT_SELF), f.cast("long", ruleset), f.cast("long", 0)),
               "landlock_restrict_self")
        pid = os.getpid()
        while True:
            # a thread not yet restricted may start another: list again until none is new
            todo = {int(t) for t in os.listdir(tasks)} - done
            if not todo:
                return
            for tid in sorted(todo):
                _restrict_thread(f, libc, result, pid, tid)
                done.add(tid)
    finally:
        os.close(tasks)
        if installed:
            libc.sigaction(_SIGNAL, old, f.NULL)
        libc.munmap(page, _PAGE)


def _tgkill(f, libc, pid: int, tid: int, sig: int) -> bool:
    return libc.syscall(f.cast("long", _SYS_TGKILL), f.cast("long", pid), f.cast("long", tid), f.cast("long", sig)) == 0


def _restrict_thread(f, libc, result, pid: int, tid: int) -> None:
    result[0] = _PENDING
    if not _tgkill(f, libc, pid, tid, _SIGNAL):
        return                                   # it has ended
    deadline = time.monotonic() + _WAIT
    delay = 0.00002
    while result[0] == _PENDING:
        if not _tgkill(f, libc, pid, tid, 0):
            return                               # it ended before the handler ran
        if time.monotonic() > deadline:
            raise LandlockError(f"thread {tid} did not take the Landlock ruleset (is {_SIGNAL} blocked there?)")
        time.sleep(delay)
        delay = min(delay * 2, 0.002)
    if result[0] != 0:
        raise LandlockError(f"thread {tid}: landlock_restrict_self: {os.strerror(-result[0])}")


def _kernel_workers(tasks: int) -> set:
    """The thread ids under /proc/self/task (the open directory `tasks`) that are kernel workers."""
    out = set()
    for name in os.listdir(tasks):
        try:
            fd = os.open(f"{name}/stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=tasks)
        except OSError:
            continue                                  # it ended
        try:
            stat = os.read(fd, 4096)
        finally:
            os.close(fd)
        # pid (comm) state ppid pgrp session tty_nr tpgid flags ...: the comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 6 and int(fields[6]) & (_PF_KTHREAD | _PF_USER_WORKER):
            out.add(int(name))
    return out
