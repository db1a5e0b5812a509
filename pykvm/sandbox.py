"""The sandbox: after set-up the VMM process may make only the system calls it needs, and touch no path.

install() runs once devices have started and before any vCPU runs guest code. Two kernel
mechanisms confine every thread of the process from then on:

- Landlock (pykvm/landlock.py), where the kernel has it, is the filesystem boundary: the only
  thing the VMM can still create is a new regular file in its own crash directory (which is
  therefore made at start, and removed at the end if no core went into it); nothing can be
  read, made, linked, renamed, removed or truncated anywhere else, whatever path or descriptor
  a call names.
- seccomp (TSYNC) decides which system calls run at all. A call not in the policy below is
  trapped: a SIGSYS handler writes one line naming the call (and the Python line that made it)
  to stderr and the process exits with errors.EXIT_SANDBOX. Read-only opens and path stat()s
  are refused with EACCES instead, so that Python's own lazy reads (linecache for a traceback,
  the import system probing a path) fail as on an unreadable file rather than killing the VMM.
  stat of a descriptor is newfstatat(fd, "", AT_EMPTY_PATH) in glibc, which seccomp cannot tell
  from newfstatat(fd, "/any/path", AT_EMPTY_PATH): it is trapped too, and the SIGSYS handler
  answers it with fstat(fd) when the path is empty, EACCES otherwise, so no path is looked up.

Cores are made through the crash directory's descriptor, which crash.crashdir.hold_crash_dir()
opens here: an unnamed O_TMPFILE file in it, named at the end with linkat through /proc/self/fd.
seccomp allows those two calls only with that descriptor, but an absolute path makes a
descriptor irrelevant: without Landlock (Linux before 5.13, or Landlock disabled) a compromised
VMM could still create a new file (never open, overwrite, read or remove an existing one)
wherever the user may write, and install() says so on stderr. PYKVM_SANDBOX_LANDLOCK=off
makes it act as on such a kernel (for tests).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
import termios
import threading

from . import errors
from .kvm import ioctls as K

# Unconditionally allowed, with why. Everything else is decided by the rules in _rules().
ALLOWED = {
    # I/O on descriptors opened during set-up (serial, eventfds, memfds, sockets, core files)
    "read": "serial input, eventfd counters, state-file reads",
    "write": "serial output, stderr, eventfd doorbells, the serial reader's stop pipe",
    "readv": "Python's buffered I/O",
    "writev": "Python's buffered I/O",
    "pread64": "reading back guest memory files",
    "pwrite64": "core files are written with pwrite",
    "lseek": "SEEK_DATA/SEEK_HOLE scans of sparse guest memory (cores, saves)",
    "close": "closing descriptors",
    "fstat": "Python's io and mmap check descriptors they are given",
    "fsync": "core and state files are made durable before they are published",
    "fdatasync": "as fsync",
    "ftruncate": "core files are sized first; memfds of new memory regions",
    "fallocate": "punching holes in guest memory (memory given back by a guest)",
    # memory
    "brk": "the C allocator",
    "munmap": "the allocator, thread stacks, GPADL views and device windows being torn down",
    "mremap": "the allocator growing large buffers",
    "madvise": "thread stacks released on exit, MADV_DONTNEED/REMOVE on guest memory",
    "memfd_create": "device window images and memory regions created while the VM runs",
    # threads, locks, time
    "futex": "every lock and condition variable",
    "set_robust_list": "each new thread (glibc)",
    "rseq": "each new thread registers restartable sequences (glibc 2.35+)",
    "sched_yield": "lock back-off",
    "sched_getaffinity": "glibc asks for the usable CPU set (seen with 4 vCPUs running the IOAPIC test); read-only",
    "getpid": "pthread_kill names the thread group in tgkill",
    "pidfd_open": "pykvm fuzz watches the sentinel process afl-fuzz kills on a hang (no signal can be sent)",
    "gettid": "thread identity (glibc, Python)",
    "exit": "a thread ending",
    "exit_group": "the process ending",
    "wait4": "the process ending waits for the shell removing its unused crash directory (release())",
    "clock_gettime": "monotonic time when the vDSO falls back to the system call",
    "clock_getres": "time resolution queries",
    "gettimeofday": "wall-clock time fallback",
    "clock_nanosleep": "time.sleep",
    "nanosleep": "sleeps in C code",
    "getrandom": "os.urandom and hash seeding",
    # signals
    "rt_sigreturn": "returning from every signal handler (vCPU kicks, SIGUSR1 dumps, SIGINT)",
    "rt_sigprocmask": "glibc blocks signals around thread creation",
    "rt_sigaction": "Python resets handlers when it exits",
    "sigaltstack": "fault handlers' alternate stacks",
    "restart_syscall": "the kernel restarting a call a signal interrupted",
    # waiting
    "poll": "socket timeouts",
    "ppoll": "socket timeouts",
    "select": "the serial reader waits on stdin and its stop pipe",
    "pselect6": "select in newer C libraries",
    "epoll_create1": "the bus thread's epoll set",
    "epoll_ctl": "adding and removing channel eventfds",
    "epoll_wait": "the bus thread waits for doorbells",
    "epoll_pwait": "epoll_wait in newer C libraries",
    "eventfd2": "doorbell and interrupt eventfds of channels opened while the VM runs",
    "pipe2": "a restarted serial device's stop pipe",
    # the control socket (already listening; no new sockets, no connect)
    "accept4": "accepting a control client",
    "getsockname": "Python checks the family of an accepted socket",
    "recvfrom": "reading a control request",
    "recvmsg": "a control request with a descriptor attached (save: the client's file)",
    "sendto": "control replies",
    "sendmsg": "control replies",
    "shutdown": "closing the control socket",
}

# ioctl requests allowed, by name: the KVM calls the run loop, devices, bus, dumps and saves make.
# Creating VMs or vCPUs, irqchips, TSS/identity maps, CPUID and capabilities is set-up only.
KVM_REQUESTS = (
    "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_TRANSLATE",
    "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU", "KVM_GET_LAPIC", "KVM_SET_LAPIC",
    "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "KVM_GET_VCPU_EVENTS",
    "KVM_SET_VCPU_EVENTS", "KVM_GET_CPUID2", "KVM_NMI", "KVM_INTERRUPT", "KVM_SET_GUEST_DEBUG",
    "KVM_CHECK_EXTENSION", "KVM_GET_MSR_INDEX_LIST", "KVM_GET_CLOCK", "KVM_SET_CLOCK",
    "KVM_SET_USER_MEMORY_REGION", "KVM_IRQ_LINE", "KVM_REGISTER_COALESCED_MMIO",
    "KVM_UNREGISTER_COALESCED_MMIO", "KVM_IOEVENTFD", "KVM_IRQFD", "KVM_SET_GSI_ROUTING", "KVM_SIGNAL_MSI",
    "KVM_GET_DIRTY_LOG", "KVM_CLEAR_DIRTY_LOG", "KVM_GET_XSAVE", "KVM_SET_XSAVE",   # in-memory snapshot and reset (pykvm fuzz)
)
# Terminal and descriptor requests Python itself makes: isatty (click, io.open), socket timeouts, CLOEXEC.
TTY_REQUESTS = ("TCGETS", "TIOCGWINSZ", "FIONBIO", "FIOCLEX", "FIONCLEX", "FIONREAD")  # FIONREAD: VM.reset drains serial pipes

# Modules the VMM may import on paths taken after set-up (an internal error's traceback, a crash
# report, a state save, a control command). lateimport holds them in memory while files can still
# be read, with everything their module bodies import that is not loaded yet (whatever this
# interpreter happened to import before: tests/test_lateimport.py runs them from `python -S -I`);
# each costs a read and an unmarshal at set-up and is executed only if a run takes its path.
# Named here: the entry points, and what they import only inside functions or by name (a codec).
LATE = ("traceback", "pykvm.machine.capture", "pykvm.crash.snapshot")
LATE_CORES = ("pykvm.crash.core", "pykvm.crash.crashdir", "pykvm.devices.vga", "encodings.cp437")
# C accelerators the late modules import only if they can: left out (~1 ms to load both), so json and datetime
# run their pure-Python code on the rare path that needs them
LATE_OPTIONAL = ("_json", "_datetime")
# only `ctl save` writes a state file under the sandbox (it takes the file as a descriptor); its
# digest needs hashlib, and so OpenSSL (~2 ms to load), which a run without --control never does
LATE_CONTROL = ("pykvm.snapshot.state", "hashlib", "_hashlib")
LATE_BUS = ("pykvm.bus.doorbell", "pykvm.bus.host", "pykvm.bus.transfer", "pykvm.bus.services.block",
            "pykvm.bus.services.echo", "pykvm.bus.services.shutdown", "pykvm.bus.services.heartbeat")

_O_TMPFILE_BITS = 0o20000000                                  # __O_TMPFILE (os.O_TMPFILE adds O_DIRECTORY)
_WRITE_BITS = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND | _O_TMPFILE_BITS
_IGNORED_OPEN_BITS = os.O_CLOEXEC | 0o100000                  # O_CLOEXEC, O_LARGEFILE
_AT_EMPTY_PATH = 0x1000
_AT_FDCWD = -100 & 0xFFFFFFFF
_AT_SYMLINK_FOLLOW = 0x400
_CLONE_THREAD = 0x10000
_PROT_EXEC = 0x4
_U32 = 0xFFFFFFFF    # descriptors and flags are C ints: compare their low 32 bits

_state = {"active": False}
_keep = []           # the SIGSYS callback and its cffi objects must outlive install()
_names: dict[int, str] = {}
_cleanup: list = []  # (pid, pipe) of the shell that removes a crash directory made for a run without cores


def active() -> bool:
    """Whether this process is sandboxed (so path-based work must go through descriptors)."""
    return _state["active"]


def install(crash_dir=None, landlock: bool | None = None) -> None:
    """Confine every thread of this process from now on; SandboxError when that cannot be done.

    landlock: None uses Landlock when the kernel has it (unless PYKVM_SANDBOX_LANDLOCK=off);
    False acts as on a kernel without it.
    """
    if _state["active"]:
        return
    from .startup import seccomp_program

    _hold_late_modules(crash_dir is not None)
    crash_fd = None if crash_dir is None else _hold_crash_dir(crash_dir)
    try:
        program, names = seccomp_program.program_for(lambda pid: policy(crash_fd, pid), os.getpid())
    except (ImportError, RuntimeError) as e:  # pyseccomp raises RuntimeError without libseccomp
        raise errors.SandboxError(f"the seccomp sandbox needs libseccomp2 and the pyseccomp package ({e}); "
                                  "install them, or run with --sandbox off") from None
    except (OSError, seccomp_program.ProgramError) as e:
        raise errors.SandboxError(f"cannot compile the seccomp filter: {getattr(e, 'strerror', None) or e}; "
                                  "run with --sandbox off") from None
    _names.update(names)
    try:
        _install_sigsys_handler()
    except OSError as e:
        raise errors.SandboxError(f"cannot install the SIGSYS handler: {e.strerror or e}; "
                                  "run with --sandbox off") from None
    _confine_paths(crash_fd, landlock)    # after everything above has read its files (the program's cache entry)
    try:
        seccomp_program.load(program)
    except OSError as e:
        raise errors.SandboxError(f"cannot install the seccomp filter: {e.strerror or e}; "
                                  "run with --sandbox off") from None
    from .startup import lateimport

    lateimport.serve()    # from now on a module not loaded or held is refused by name, not looked for on disk
    _state["active"] = True


def _hold_crash_dir(crash_dir) -> int | None:
    """Make the crash directory now (the sandbox lets nothing make it later) and hold it; None when unusable.

    A directory made here for a run that then writes no core is removed when the process ends, by a
    shell started now outside the sandbox, so that a run that never crashes leaves nothing behind.
    """
    from .crash.crashdir import CoreWriteError, hold_crash_dir
    from .startup.safedir import missing_ancestors

    made = missing_ancestors(os.path.abspath(os.fspath(crash_dir)))   # removed deepest first, each only if empty
    try:
        return hold_crash_dir(crash_dir, create=True)
    except CoreWriteError:
        return None   # a crash is still reported; its core's absence names the reason, as without the sandbox
    finally:
        if made:
            _remove_at_exit_if_empty(made)


# waits for the end of the VMM (end of file on stdin), then removes what it was given that is still empty;
# in its own process group and deaf to hang-ups, so a Ctrl-C or a closed terminal does not end it first
_RMDIR_WHEN_DONE = 'trap "" HUP; while read -r _; do :; done; exec rmdir -- "$@"'


def _remove_at_exit_if_empty(paths: list[str]) -> None:
    try:
        r, w = os.pipe()                  # both close-on-exec: only the shell's stdin is a copy of r
    except OSError:
        return
    try:
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", _RMDIR_WHEN_DONE, "sh", *paths], {"PATH": "/usr/bin:/bin"},
                             file_actions=[(os.POSIX_SPAWN_DUP2, r, 0),
                                           (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                                           (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)],
                             setpgroup=0)
    except OSError:
        os.close(w)                       # no shell: the empty directory stays, as it did before this was added
        return
    finally:
        os.close(r)
    # w is never written: its end of file is the shell's signal, when release() closes it or the process ends
    _cleanup[:] = [pid, w]
    import atexit

    atexit.register(release)


def release() -> None:
    """Let the crash-directory cleanup run now and wait for it (the process is ending; os._exit skips atexit)."""
    if not _cleanup:
        return
    pid, w = _cleanup
    _cleanup.clear()
    os.close(w)
    try:
        os.waitpid(pid, 0)                # so nothing is left when this process's own parent sees it end
    except ChildProcessError:
        pass


def _confine_paths(crash_fd: int | None, use: bool | None) -> None:
    """Landlock on every thread, or one line on stderr saying what the sandbox cannot stop without it."""
    from . import landlock

    if use is None:
        use = os.environ.get("PYKVM_SANDBOX_LANDLOCK", "on") != "off"
    abi = landlock.abi_version() if use else 0
    if abi:
        try:
            landlock.confine(crash_fd, abi)
        except landlock.LandlockError as e:
            raise errors.SandboxError(f"cannot install the Landlock ruleset: {e}; run with --sandbox off") from None
        _state["landlock"] = abi
        return
    _state["landlock"] = 0
    os.write(2, b"pykvm: sandbox: Landlock is not available in this kernel, so paths are not confined: a compromised VMM could "
                b"still create new files wherever you may write (Linux 5.13+ with Landlock enabled prevents it)\n")


def landlock_abi() -> int:
    """The Landlock ABI the sandbox confines paths with; 0 when it runs without Landlock (or is not active)."""
    return _state.get("landlock", 0) if _state["active"] else 0


def policy(crash_fd: int | None, pid: int) -> list:
    """Every rule as data: (action, system call, [(argument, mask, value)...]), action "allow" or ("errno", N).

    Calls no rule names are trapped. The compiled program's cache entry is keyed by this list.
    """
    return [("allow", name, []) for name in ALLOWED] + _rules(crash_fd, pid)


def _rules(crash_fd: int | None, pid: int) -> list:
    """(action, system call, argument conditions) for the calls allowed only with some arguments."""
    eq = lambda arg, value, mask=_U32: (arg, mask, value)  # noqa: E731  (argument & mask) == value
    refuse = ("errno", errno.EACCES)
    out = [
        ("allow", "mmap", [eq(2, 0, _PROT_EXEC)]),              # never new executable memory
        ("allow", "mprotect", [eq(2, 0, _PROT_EXEC)]),
        ("allow", "clone", [eq(0, _CLONE_THREAD, _CLONE_THREAD)]),   # threads, never processes
        (("errno", errno.ENOSYS), "clone3", []),                 # its flags live in memory seccomp cannot read:
                                                                 # glibc then falls back to clone
        ("allow", "tgkill", [eq(0, pid)]),                       # vCPU kicks, only within this process
        # stat of a path; with AT_EMPTY_PATH (glibc's fstat) it is trapped and answered in _on_sigsys
        (refuse, "newfstatat", [eq(3, 0, _AT_EMPTY_PATH)]),
        (refuse, "statx", []),                                   # neither Python nor glibc's fstat uses it
        (refuse, "openat", [eq(2, 0, _WRITE_BITS)]),             # read-only opens fail, not stop the VMM
        (refuse, "open", [eq(1, 0, _WRITE_BITS)]),
    ]
    for name in ("stat", "lstat", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getcwd"):
        out.append((refuse, name, []))
    for name in KVM_REQUESTS:
        out.append(("allow", "ioctl", [eq(1, getattr(K, name))]))
    for name in TTY_REQUESTS:
        out.append(("allow", "ioctl", [eq(1, getattr(termios, name))]))
    for cmd in ("F_GETFD", "F_SETFD", "F_GETFL", "F_SETFL", "F_DUPFD_CLOEXEC", "F_ADD_SEALS", "F_GET_SEALS"):
        out.append(("allow", "fcntl", [eq(1, getattr(fcntl, cmd))]))
    if crash_fd is not None:
        # a new unnamed core file in the crash directory, then its name there (crash/core.py)
        out.append(("allow", "openat", [eq(0, crash_fd),
                                        eq(2, os.O_WRONLY | os.O_TMPFILE, _U32 & ~_IGNORED_OPEN_BITS)]))
        out.append(("allow", "linkat", [eq(0, _AT_FDCWD), eq(2, crash_fd), eq(4, _AT_SYMLINK_FOLLOW)]))
    return out


def late_modules(cores: bool) -> tuple:
    """The modules to hold for this process: the bus's only when set-up wired a bus (none is added later),
    every hot-pluggable device's only when a control socket can ask for one."""
    names = LATE + (LATE_CORES if cores else ())
    if any(name.startswith("pykvm.bus.") for name in sys.modules):
        names += LATE_BUS
    if "pykvm.control.server" in sys.modules:
        names += LATE_CONTROL
        from .devices import registry

        names += tuple(t.cls.partition(":")[0] for t in registry.TYPES.values() if t.hotplug)
    return names


def _hold_late_modules(cores: bool) -> None:
    from .startup import lateimport

    lateimport.hold(late_modules(cores), optional=LATE_OPTIONAL)
    if "_hashlib" in sys.modules:
        import hashlib

        hashlib.sha256(b"").digest()   # OpenSSL loads its configuration and providers on first use


# ---------------------------------------------------------------- reporting a violation
SIGSYS_CDEF = """
    typedef struct { int si_signo; int si_errno; int si_code; int pad;
                     void *call_addr; int syscall; unsigned int arch; } sigsys_info;
    struct sigaction_glibc { void *handler; unsigned long mask[16]; int flags; void *restorer; };
    int sigaction(int signum, const struct sigaction_glibc *act, struct sigaction_glibc *old);
    typedef struct { unsigned long flags; void *link; void *ss_sp; int ss_flags; int pad; unsigned long ss_size;
                     long long gregs[23]; } ucontext_x86_64;
    long syscall(long number, ...);
"""
# x86-64: the trapped call's number and arguments in the saved registers; its result goes in rax
_NR_NEWFSTATAT, _NR_FSTAT = 262, 5
_REG_R10, _REG_RDI, _REG_RSI, _REG_RDX, _REG_RAX = 2, 8, 9, 12, 13


def bindings() -> None:
    """Load (so generate, on a cold cache) the cffi types install() uses; a wheel build ships them prebuilt."""
    from .startup import ffigen, seccomp_program

    ffigen.load("sigsys", SIGSYS_CDEF)
    seccomp_program.ffi()


def _install_sigsys_handler() -> None:
    """A SA_SIGINFO handler for SIGSYS: Python's own handlers do not see which call was trapped."""
    from .startup import ffigen

    ffi = ffigen.load("sigsys", SIGSYS_CDEF)
    libc = ffi.dlopen(None)
    callback = ffi.callback("void(int, sigsys_info *, void *)", _on_sigsys)
    act = ffi.new("struct sigaction_glibc *")
    act.handler = ffi.cast("void *", callback)
    act.flags = 0x4                                   # SA_SIGINFO; no SA_NODEFER: a second SIGSYS kills
    if libc.sigaction(signal.SIGSYS, act, ffi.NULL) != 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))
    _keep[:] = [ffi, libc, callback, act]


def _on_sigsys(_signo, info, context) -> None:
    """Runs on the thread whose call was trapped: answer an fstat, or say which call and where and end the process."""
    nr = info.syscall
    try:
        answered = nr == _NR_NEWFSTATAT and _answer_fstat(context)
    except Exception:       # noqa: BLE001  (whatever went wrong, the call is then reported as blocked)
        answered = False
    if answered:
        return
    try:
        name = _names.get(nr, "unknown")
        where = _python_location(sys._getframe(0).f_back)
        thread = threading.current_thread().name
        msg = (f"pykvm: sandbox: blocked system call {name} (#{nr}) on thread {thread}{where}; "
               f"the VMM stopped (exit status {errors.EXIT_SANDBOX}; --sandbox off to debug)\n")
        os.write(2, msg.encode(errors="replace"))
    finally:
        os._exit(errors.EXIT_SANDBOX)


def _answer_fstat(context) -> bool:
    """newfstatat(fd, "", buf, AT_EMPTY_PATH), glibc's fstat, answered with fstat(fd); any other path gets EACCES.

    The path is never given to the kernel: what it names does not matter, only whether it is empty.
    """
    ffi, libc = _keep[0], _keep[1]
    regs = ffi.cast("ucontext_x86_64 *", context).gregs
    path = ffi.cast("char *", regs[_REG_RSI])
    if not regs[_REG_R10] & _AT_EMPTY_PATH:
        return False                              # the filter refuses these itself: not an fstat
    if path == ffi.NULL or path[0] == b"\0":
        fd = regs[_REG_RDI] & _U32
        fd = fd - (1 << 32) if fd >> 31 else fd        # a C int
        rc = libc.syscall(ffi.cast("long", _NR_FSTAT), ffi.cast("long", fd), ffi.cast("void *", regs[_REG_RDX]))
        regs[_REG_RAX] = rc if rc >= 0 else -ffi.errno
    else:
        regs[_REG_RAX] = -errno.EACCES
    return True


def _python_location(frame) -> str:
    """' at file:line in function' for the innermost Python frames (no source lines: reading is refused)."""
    parts = []
    while frame is not None and len(parts) < 3:
        parts.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return (" at " + " <- ".join(parts)) if parts else ""
