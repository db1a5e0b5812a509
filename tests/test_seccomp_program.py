"""The sandbox's seccomp program: libseccomp's own compilation, made on every run, never read from a file."""

from __future__ import annotations

import os
import tempfile

import pytest

from pykvm import sandbox
from pykvm.startup import seccomp_program as sp


def _pyseccomp_program(policy: list) -> bytes:
    """The same rules compiled through pyseccomp, the ctypes binding of the same library."""
    sc = pytest.importorskip("pyseccomp")
    flt = sc.SyscallFilter(sc.TRAP)
    for action, name, conds in policy:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            continue
        act = sc.ALLOW if action == "allow" else sc.ERRNO(action[1])
        flt.add_rule(act, name, *(sc.Arg(arg, sc.MASKED_EQ, mask, value) for arg, mask, value in conds))
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


@pytest.mark.parametrize("crash_fd", [None, 7])
def test_the_program_is_libseccomps_for_the_policy_with_this_pid(crash_fd):
    program, names = sp.program_for(lambda pid: sandbox.policy(crash_fd, pid), 4242)
    assert program == _pyseccomp_program(sandbox.policy(crash_fd, 4242))
    assert len(program) % sp.INSN == 0 and 4242 .to_bytes(4, "little") in program
    assert names[59] == "execve" and names[0] == "read" and all(0 <= nr < sp.MAX_NR for nr in names)


def test_an_unknown_call_is_left_out_and_an_errno_rule_compiles():
    with_unknown = sp.compile_policy([("allow", "read", []), ("allow", "no_such_call", []),
                                      (("errno", 13), "openat", [(2, 3, 0)])])
    assert with_unknown == sp.compile_policy([("allow", "read", []), (("errno", 13), "openat", [(2, 3, 0)])])
    assert (0x00050000 | 13).to_bytes(4, "little") in with_unknown      # SECCOMP_RET_ERRNO | EACCES


def test_nothing_of_the_program_is_kept_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_BUILD_DIR", str(tmp_path))
    sp.program_for(lambda pid: sandbox.policy(None, pid), 1)
    assert list(tmp_path.iterdir()) == []


def test_without_libseccomp_the_sandbox_says_what_to_install(monkeypatch):
    monkeypatch.setattr(sp, "_libseccomp", [])
    real = sp.ffi()

    class NoLib:
        def __getattr__(self, name):
            return getattr(real, name)

        def dlopen(self, name):
            raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(sp, "ffi", lambda: NoLib())
    with pytest.raises(sp.ProgramError, match="libseccomp.so.2 is not installed"):
        sp.compile_policy([("allow", "read", [])])
    assert sp.libseccomp_version() is None
