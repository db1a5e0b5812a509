"""The sandbox's seccomp program, compiled by libseccomp on every run and loaded with one system call.

The program decides what a compromised VMM may do, so it is never read back from a file:
a cached copy, whatever its checksum, is only as trustworthy as the directory it sits in
(an unkeyed digest can be recomputed by whoever edits the file, and a key kept beside it
or in this process's memory is no better). Compiling costs ~1.5 ms; what made it costly
before was pyseccomp, whose import runs ldconfig through ctypes.util.find_library (~30 ms).
So libseccomp is called directly through cffi (the same library, the same calls
pyseccomp makes: seccomp_init, seccomp_rule_add_array, seccomp_export_bpf), and the
program is handed to the kernel as libseccomp's seccomp_load would (no_new_privs, then
seccomp(SET_MODE_FILTER, TSYNC)).
"""

from __future__ import annotations

import os

from . import ffigen

INSN = 8                     # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
MAX_INSNS = 4096             # BPF_MAXINSNS: the kernel refuses longer programs
MAX_NR = 512                 # system call numbers named (x86-64's are below 512; x32 calls carry bit 30, refused as a foreign ABI)

CDEF = """
    struct scmp_version { unsigned int major; unsigned int minor; unsigned int micro; };
    const struct scmp_version *seccomp_version(void);
    struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
    void *seccomp_init(uint32_t def_action);
    void seccomp_release(void *ctx);
    int seccomp_rule_add_array(void *ctx, uint32_t action, int syscall, unsigned int arg_cnt,
                               const struct scmp_arg_cmp *arg_array);
    int seccomp_export_bpf(const void *ctx, int fd);
    int seccomp_syscall_resolve_name(const char *name);
    char *seccomp_syscall_resolve_num_arch(uint32_t arch_token, int num);
    void free(void *ptr);
    struct sock_fprog_pykvm { unsigned short len; void *filter; };
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
    long syscall(long number, ...);
"""
_PR_SET_NO_NEW_PRIVS = 38
_SYS_SECCOMP = 317           # x86-64
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
# libseccomp's seccomp.h
_SCMP_ACT_TRAP = 0x00030000
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_CMP_MASKED_EQ = 7
_SCMP_ARCH_NATIVE = 0
_libseccomp = []


class ProgramError(Exception):
    """The program could not be compiled or loaded (the message says why)."""


def ffi():
    """The cffi types for libseccomp and the prctl/seccomp calls."""
    return ffigen.load("seccomp", CDEF)


def _lib():
    if not _libseccomp:
        try:
            _libseccomp.append(ffi().dlopen("libseccomp.so.2"))
        except OSError:
            raise ProgramError("libseccomp.so.2 is not installed (Debian/Ubuntu: apt-get install libseccomp2)") \
                from None
    return _libseccomp[0]


def libseccomp_version() -> str | None:
    """'major.minor.micro' of the libseccomp the dynamic linker finds, or None without one."""
    try:
        v = _lib().seccomp_version()
    except (ProgramError, AttributeError):
        return None
    return f"{v.major}.{v.minor}.{v.micro}"


def compile_policy(policy: list) -> bytes:
    """The BPF program libseccomp compiles from rules (action, system call, [(argument, mask, value)...]); trap the rest."""
    f, lib = ffi(), _lib()
    ctx = lib.seccomp_init(_SCMP_ACT_TRAP)
    if ctx == f.NULL:
        raise ProgramError("seccomp_init failed")
    try:
        for action, name, conds in policy:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue   # an older libseccomp may not know a newer call; nothing can make it then
            act = _SCMP_ACT_ALLOW if action == "allow" else _SCMP_ACT_ERRNO | (action[1] & 0xFFFF)
            cmp = f.new("struct scmp_arg_cmp[]", [(arg, _SCMP_CMP_MASKED_EQ, mask, value) for arg, mask, value in conds]
                        or 1)
            rc = lib.seccomp_rule_add_array(ctx, act, nr, len(conds), cmp)
            if rc < 0:
                raise ProgramError(f"libseccomp refused the rule for {name}: {os.strerror(-rc)}")
        fd = os.memfd_create("pykvm-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise ProgramError(f"libseccomp could not export the program: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % INSN or len(program) > MAX_INSNS * INSN:
        raise ProgramError(f"libseccomp compiled a program of {len(program)} bytes, which the kernel cannot take")
    return program


def syscall_names() -> dict[int, str]:
    """The name of every system call number libseccomp knows on this architecture."""
    f, lib = ffi(), _lib()
    names = {}
    for nr in range(MAX_NR):
        p = lib.seccomp_syscall_resolve_num_arch(_SCMP_ARCH_NATIVE, nr)
        if p != f.NULL:
            names[nr] = f.string(p).decode()
            lib.free(p)
    return names


def program_for(make_policy_for_pid, pid: int) -> tuple[bytes, dict[int, str]]:
    """(the program for this pid's policy, system call names by number), compiled now."""
    return compile_policy(make_policy_for_pid(pid)), syscall_names()


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
