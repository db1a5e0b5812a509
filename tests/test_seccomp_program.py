"""The sandbox's compiled seccomp program: cached once, validated before every use, rebuilt when bad."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import errors, sandbox
from pykvm.startup import cachefile, seccomp_program as sp

from .helpers import ROOT


def make(pid):
    return sandbox.policy(None, pid)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_BUILD_DIR", str(tmp_path))
    return tmp_path


def entry_path(cache) -> str:
    (path,) = (cache / "seccomp").glob("*.entry")
    return str(path)


def test_the_cached_program_is_libseccomps_with_the_pid_in_place(cache):
    program, names = sp.program_for(make, 4242)        # cold: compiled and stored
    again, names_again = sp.program_for(make, 4242)    # warm: read back
    fresh, pid_at, fresh_names = sp.compile_policy(make(sp.PID_A), make)
    assert program == again == sp.patch_pid(fresh, pid_at, 4242)
    assert names == names_again == fresh_names and names[59] == "execve"
    assert pid_at and all(sp._k(program, i) == 4242 for i in pid_at)
    # the same policy for a real pid, compiled directly, is byte for byte the patched program
    import pyseccomp

    assert program == sp._compile(pyseccomp, make(4242))


@pytest.mark.parametrize("damage", ["flip a program byte", "truncate", "garbage", "wrong key", "pid moved",
                                    "empty program", "a name that is no name", "names as a table", "extra field"])
def test_a_damaged_entry_is_never_used_and_is_rebuilt(cache, damage):
    good, _ = sp.program_for(make, 777)
    path = entry_path(cache)
    raw = open(path, "rb").read()
    entry = cachefile.loads(raw)
    if damage == "flip a program byte":
        at = raw.index(entry["program"]) + 20
        raw = raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:]     # the digest no longer matches
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = b"\x00\xff not an entry"
    else:                                                       # each self-consistent, but wrong
        if damage == "wrong key":
            entry["key"] = "0" * 32
        elif damage == "pid moved":
            entry["pid_at"] = [i + 1 for i in entry["pid_at"]]
        elif damage == "empty program":
            entry["program"] = b""
        elif damage == "a name that is no name":
            entry["names"] = entry["names"].replace("execve", "exec ve")
        elif damage == "names as a table":
            entry["names"] = {"59": "execve"}
        else:
            entry["more"] = 1
        raw = cachefile.dumps(entry)
    with open(path, "wb") as f:
        f.write(raw)
    key = os.path.basename(path)[:-len(".entry")]
    assert sp.read_entry(path, key) is None
    assert sp.program_for(make, 777)[0] == good       # compiled again ...
    assert sp.read_entry(path, key) is not None       # ... and the entry rewritten whole


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_reading_a_mutated_entry_gives_the_original_or_nothing(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("entry")
    path = str(d / "e.entry")
    program = bytes(range(16)) + sp.PID_A.to_bytes(4, "little").rjust(8, b"\x01")
    sp.write_entry(path, "k", program, [2], {0: "read", 59: "execve"})
    raw = bytearray(open(path, "rb").read())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    with open(path, "wb") as f:
        f.write(raw)
    got = sp.read_entry(path, "k")
    assert got is None or got == (program, [2], {0: "read", 59: "execve"})


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_reading_arbitrary_bytes_never_raises(tmp_path_factory, raw):
    path = str(tmp_path_factory.mktemp("entry") / "e.entry")
    with open(path, "wb") as f:
        f.write(raw)
    assert sp.read_entry(path, "k") is None


def test_a_sandboxed_process_with_a_corrupted_cache_still_stops_forbidden_calls(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        from pykvm import sandbox
        sandbox.install(None)
        print("pyseccomp" in sys.modules, flush=True)
        os.execv("/bin/true", ["true"])
    """)
    env = dict(os.environ, PYKVM_BUILD_DIR=str(tmp_path))

    def run():
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)

    r = run()                                          # cold: compiled with pyseccomp
    assert r.returncode == errors.EXIT_SANDBOX and r.stdout == "True\n", r.stderr
    assert "blocked system call execve (#59)" in r.stderr
    r = run()                                          # warm: loaded directly, names from the cache
    assert r.returncode == errors.EXIT_SANDBOX and r.stdout == "False\n", r.stderr
    assert "blocked system call execve (#59)" in r.stderr
    path = entry_path(tmp_path)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[:-20] + raw[-12:])                 # eight bytes gone: the digest catches it
    r = run()
    assert r.returncode == errors.EXIT_SANDBOX and r.stdout == "True\n", r.stderr
    assert "blocked system call execve (#59)" in r.stderr
    assert sp.read_entry(path, os.path.basename(path)[:-len(".entry")]) is not None
