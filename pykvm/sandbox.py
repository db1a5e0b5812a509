"""The seccomp sandbox: after set-up the VMM process may make only the system calls it needs.

install() runs once devices have started and before any vCPU runs guest code. From then on
every thread of the process (TSYNC) is filtered: a call not in the policy below is trapped,
a SIGSYS handler writes one line naming the call (and the Python line that made it) to
stderr, and the process exits with errors.EXIT_SANDBOX. Read-only opens and path stat()s
are refused with EACCES instead, so that Python's own lazy reads (linecache for a traceback,
the import system probing a path) fail the way they would on an unreadable file rather than
killing the VMM; nothing can be opened for writing, created, deleted or executed.

The filesystem is reachable only through the crash directory's descriptor, which
crash.crashdir.hold_crash_dir() opens here: a core is an unnamed O_TMPFILE file in it, named at
the end with linkat through /proc/self/fd. seccomp sees descriptors and flags, never path
strings: an absolute path makes the dirfd irrelevant, so a compromised VMM could still create
a new file (never open, overwrite, read or remove an existing one) where the user may write.
Closing that gap needs Landlock or a broker process; see README "Sandbox".
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
    "KVM_GET_DIRTY_LOG", "KVM_GET_XSAVE", "KVM_SET_XSAVE",      # in-memory snapshot and reset (pykvm fuzz)
)
# Terminal and descriptor requests Python itself makes: isatty (click, io.open), socket timeouts, CLOEXEC.
TTY_REQUESTS = ("TCGETS", "TIOCGWINSZ", "FIONBIO", "FIOCLEX", "FIONCLEX", "FIONREAD")  # FIONREAD: VM.reset drains serial pipes

# Modules the VMM may import on paths taken after set-up (an internal error's traceback, a crash
# report, a state save, a control command), with every pure-Python module they import that a
# plain run has not loaded. lateimport holds them in memory while files can still be read: each
# costs a read at set-up and is executed only if a run takes its path. Extension modules among
# them are imported at once (loading one opens a file); optional ones left out (_json, _datetime)
# make their module fall back to its pure-Python code.
LATE = ("traceback", "linecache", "textwrap", "tokenize", "token", "pykvm.machine.capture", "pykvm.crash.snapshot",
        "datetime", "math",
        # textwrap and tokenize need re, and traceback contextlib, which a plain run no longer imports itself
        "re", "re._compiler", "re._parser", "re._constants", "re._casefix", "copyreg", "contextlib")
LATE_CORES = ("pykvm.crash.core", "pykvm.crash.crashdir", "pykvm.memory.sparse", "pykvm.crash.layout",
              "pykvm.crash.notes", "pykvm.crash.x86", "pykvm.devices.vga", "encodings.cp437",
              "json", "json.decoder", "json.scanner", "json.encoder")
LATE_BUS = ("pykvm.bus.doorbell", "pykvm.bus.host", "pykvm.bus.transfer", "pykvm.bus.services.block",
            "pykvm.bus.services.echo", "pykvm.bus.services.shutdown", "pykvm.bus.services.heartbeat")

_O_TMPFILE_BITS = 0o20000000                                  # __O_TMPFILE (os.O_TMPFILE adds O_DIRECTORY)
_WRITE_BITS = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND | _O_TMPFILE_BITS
_IGNORED_OPEN_BITS = os.O_CLOEXEC | 0o100000                  # O_CLOEXEC, O_LARGEFILE
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_FOLLOW = 0x400
_CLONE_THREAD = 0x10000
_PROT_EXEC = 0x4
_U32 = 0xFFFFFFFF    # descriptors and flags are C ints: compare their low 32 bits

_state = {"active": False}
_keep = []           # the SIGSYS callback and its cffi objects must outlive install()
_names: dict[int, str] = {}


def active() -> bool:
    """Whether this process is sandboxed (so path-based work must go through descriptors)."""
    return _state["active"]


def install(crash_dir=None) -> None:
    """Filter every thread of this process from now on; SandboxError when that cannot be done."""
    if _state["active"]:
        return
    from .startup import seccomp_program

    _hold_late_modules(crash_dir is not None)
    crash_fd = None
    if crash_dir is not None:
        from .crash.crashdir import CoreWriteError, hold_crash_dir

        try:
            crash_fd = hold_crash_dir(crash_dir)
        except CoreWriteError:
            pass  # a crash is still reported; its core's absence names the reason, as without the sandbox
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
        seccomp_program.load(program)
    except OSError as e:
        raise errors.SandboxError(f"cannot install the seccomp filter: {e.strerror or e}; "
                                  "run with --sandbox off") from None
    from .startup import lateimport

    lateimport.serve()    # from now on a module not loaded or held is refused by name, not looked for on disk
    _state["active"] = True


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
        ("allow", "newfstatat", [eq(3, _AT_EMPTY_PATH, _AT_EMPTY_PATH)]),   # fstat of a descriptor
        (refuse, "newfstatat", [eq(3, 0, _AT_EMPTY_PATH)]),      # stat of a path
        ("allow", "statx", [eq(2, _AT_EMPTY_PATH, _AT_EMPTY_PATH)]),
        (refuse, "statx", [eq(2, 0, _AT_EMPTY_PATH)]),
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
        out.append(("allow", "linkat", [eq(2, crash_fd), eq(4, _AT_SYMLINK_FOLLOW)]))
        # a crash directory that does not exist yet is created by the first core, under the held ancestor
        out.append(("allow", "mkdirat", [eq(0, crash_fd)]))
    return out


def late_modules(cores: bool) -> tuple:
    """The modules to hold for this process: the bus's only when set-up wired a bus (none is added later),
    every hot-pluggable device's only when a control socket can ask for one."""
    names = LATE + (LATE_CORES if cores else ())
    if any(name.startswith("pykvm.bus.") for name in sys.modules):
        names += LATE_BUS
    if "pykvm.control.server" in sys.modules:
        # only `ctl save` writes a state file under the sandbox (it takes the file as a descriptor); its
        # digest needs hashlib, and so OpenSSL (~2 ms to load), which a run without --control never does
        names += ("pykvm.snapshot.state", "pykvm.memory.sparse", "hashlib", "_hashlib")
        from .devices import registry

        names += tuple(t.cls.partition(":")[0] for t in registry.TYPES.values() if t.hotplug)
    return names


def _hold_late_modules(cores: bool) -> None:
    from .startup import lateimport

    lateimport.hold(late_modules(cores))
    if "_hashlib" in sys.modules:
        import hashlib

        hashlib.sha256(b"").digest()   # OpenSSL loads its configuration and providers on first use


# ---------------------------------------------------------------- reporting a violation
SIGSYS_CDEF = """
    typedef struct { int si_signo; int si_errno; int si_code; int pad;
                     void *call_addr; int syscall; unsigned int arch; } sigsys_info;
    struct sigaction_glibc { void *handler; unsigned long mask[16]; int flags; void *restorer; };
    int sigaction(int signum, const struct sigaction_glibc *act, struct sigaction_glibc *old);
"""


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


def _on_sigsys(_signo, info, _context) -> None:
    """Runs on the thread whose call was trapped: say which call and where, then end the process."""
    try:
        nr = info.syscall
        name = _names.get(nr, "unknown")
        where = _python_location(sys._getframe(0).f_back)
        thread = threading.current_thread().name
        msg = (f"pykvm: sandbox: blocked system call {name} (#{nr}) on thread {thread}{where}; "
               f"the VMM stopped (exit status {errors.EXIT_SANDBOX}; --sandbox off to debug)\n")
        os.write(2, msg.encode(errors="replace"))
    finally:
        os._exit(errors.EXIT_SANDBOX)


def _python_location(frame) -> str:
    """' at file:line in function' for the innermost Python frames (no source lines: reading is refused)."""
    parts = []
    while frame is not None and len(parts) < 3:
        parts.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return (" at " + " <- ".join(parts)) if parts else ""
