"""The cache is not a way in: another user's directory is refused (status 36), and nothing planted there is used.

Issue 19 finding 2: a planted cffi module in the cache ran, a planted "allow everything"
seccomp program loaded, device descriptions came from cache entries, and a shared 1777
PYKVM_BUILD_DIR was used. Each test here plants or shares exactly that.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from pykvm import errors, paths, sandbox
from pykvm.startup import safedir

from .helpers import ROOT, guest

NOBODY = 65534


def run_pykvm(cache: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env["PYKVM_BUILD_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "pykvm", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == errors.EXIT_UNSAFE_CACHE == 36, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvm: error: refusing the cache directory"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ------------------------------------------------------------------ ownership and permissions
def test_a_shared_1777_build_dir_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert_refused(run_pykvm(shared, "guests"), str(shared), "writable by group and others (mode 1777)")
    assert list(shared.iterdir()) == []                  # nothing built into it, nothing read from it


def test_a_group_writable_cache_is_refused_also_for_run(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    cache.chmod(0o770)
    assert_refused(run_pykvm(cache, "run", "hello", "--timeout", "30"), "writable by group (mode 0770)")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_cache_owned_by_another_user_is_refused(tmp_path):
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o700)
    os.chown(cache, NOBODY, NOBODY)
    assert_refused(run_pykvm(cache, "guests"), f"owned by uid {NOBODY}")


def test_a_cache_inside_a_directory_others_can_write_is_refused(tmp_path):
    # another user could rename ours away and put theirs in its place
    parent = tmp_path / "open"
    parent.mkdir()
    cache = parent / "mine"
    cache.mkdir(mode=0o700)
    parent.chmod(0o777)
    assert_refused(run_pykvm(cache, "guests"), f"lies in {parent}", "writable by group and others")


def test_a_new_cache_is_made_0700_even_under_a_sticky_shared_directory(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)                                  # like /tmp: others may add, not rename or remove
    root = safedir.ensure(str(shared / "a" / "pykvm"))
    built = safedir.subdir(root, "guests-0123")
    for d in (shared / "a", Path(root), Path(built)):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_the_default_cache_under_xdg_is_made_0700(tmp_path, monkeypatch):
    monkeypatch.delenv("PYKVM_BUILD_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = safedir.ensure(paths.cache_root())
    assert root == str(tmp_path / "xdg" / "pykvm")
    assert stat.S_IMODE((tmp_path / "xdg").stat().st_mode) == stat.S_IMODE(Path(root).stat().st_mode) == 0o700


@pytest.mark.parametrize("kind", ["group-writable", "symlink"])
def test_a_build_directory_someone_else_could_have_made_is_refused(tmp_path, kind):
    root = safedir.ensure(str(tmp_path / "c"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    target = Path(root) / "guests-0123"
    if kind == "symlink":
        target.symlink_to(elsewhere)
    else:
        target.mkdir()
        target.chmod(0o775)
    with pytest.raises(errors.UnsafeCacheError, match="symbolic link" if kind == "symlink" else "writable by group"):
        safedir.subdir(root, "guests-0123")


# ------------------------------------------------------------------ planted files
def _cache_with_firmware(tmp_path: Path) -> Path:
    """A fresh cache holding a copy of the session's firmware build (so a run builds nothing)."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for fw in Path(os.environ["PYKVM_BUILD_DIR"]).glob("firmware-*"):
        shutil.copytree(fw, cache / fw.name)
    return cache


def _binding_modules() -> list[str]:
    """The module name of every cffi binding a bus run loads, as the loader names them."""
    code = textwrap.dedent("""
        from pykvm.startup import ffigen
        names, real = [], ffigen.load
        def record(name, cdef):
            names.append(ffigen.module_name(name, cdef))
            return real(name, cdef)
        ffigen.load = record
        import pykvm.abi, pykvm.kvm, pykvm.kvm.vcpu, pykvm.bus._libc, pykvm.sandbox
        pykvm.sandbox.bindings()
        print(*sorted(set(names)))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.kvm
def test_a_planted_binding_module_in_the_cache_never_runs(tmp_path):
    cache = _cache_with_firmware(tmp_path)
    marker = tmp_path / "planted-code-ran"
    modules = _binding_modules()
    assert any(m.startswith("_pykvm_buslibc_") for m in modules), modules
    (cache / "ffi").mkdir()
    for m in modules:
        (cache / "ffi" / f"{m}.py").write_text(f"open({str(marker)!r}, 'a').write({m!r} + '\\n')\n"
                                               "raise SystemExit(99)\n")
    r = run_pykvm(cache, "run", str(guest("bus-echo")), "--bus", "--timeout", "60")
    assert not marker.exists(), marker.read_text()
    assert r.returncode == 0 and "echo: 100 messages of 64 bytes ok" in r.stdout, r.stderr


def _old_entry(value) -> bytes:
    """An entry in the format pykvm's former caches accepted: magic, an unkeyed BLAKE2b of the body, the body."""
    def put(v):
        if type(v) is bool:
            return b"T" if v else b"F"
        if type(v) is int:
            n = v.bit_length() // 8 + 1
            return b"i" + bytes((n,)) + v.to_bytes(n, "little", signed=True)
        if type(v) is str:
            return b"s" + struct.pack("<I", len(v.encode())) + v.encode()
        if type(v) is bytes:
            return b"b" + struct.pack("<I", len(v)) + v
        if type(v) is list:
            return b"l" + struct.pack("<I", len(v)) + b"".join(put(x) for x in v)
        return b"d" + struct.pack("<I", len(v)) + b"".join(
            struct.pack("<I", len(k.encode())) + k.encode() + put(x) for k, x in v.items())

    body = put(value)
    return b"pykvm-cache 1\n" + hashlib.blake2b(body, digest_size=32).hexdigest().encode() + body


def test_a_planted_allow_everything_seccomp_program_is_not_used(tmp_path):
    # the entry the former cache would have loaded for this policy: "ret ALLOW", digest recomputed
    from pykvm.startup import seccomp_program as sp

    stand_in = 0x3FFFF1
    program = struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000) + struct.pack("<HBBI", 0x06, 0, 0, stand_in)
    key = hashlib.blake2b(repr([2, os.uname().machine, sp.libseccomp_version(), sandbox.policy(None, stand_in)])
                          .encode(), digest_size=32).hexdigest()[:32]
    (tmp_path / "seccomp").mkdir(mode=0o700)
    (tmp_path / "seccomp" / f"{key}.entry").write_bytes(
        _old_entry({"key": key, "program": program, "pid_at": [1], "names": "read"}))
    code = "import os\nfrom pykvm import sandbox\nsandbox.install(None)\nos.execv('/bin/true', ['true'])\n"
    env = dict(os.environ, PYKVM_BUILD_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == errors.EXIT_SANDBOX, r.stderr
    assert "blocked system call execve (#59)" in r.stderr


def test_a_planted_device_description_entry_is_not_used(tmp_path):
    # a description decides what an untrusted guest may touch: plant an altered one where the former
    # cache looked it up (by the file's hash), its summary marked so a use of it shows
    text = (Path(paths.PACKAGE) / "devices" / "serial.toml").read_text()
    data = tomllib.loads(text)
    data["summary"] = "PLANTED"
    text_hash = hashlib.blake2b(text.encode(), digest_size=32).hexdigest()
    (tmp_path / "toml").mkdir(mode=0o700)
    (tmp_path / "toml" / f"{text_hash[:40]}.entry").write_bytes(_old_entry({"text": text_hash, "data": data}))
    code = "from pykvm.devices import description\nprint(description.shipped()['serial'].summary)\n"
    env = dict(os.environ, PYKVM_BUILD_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "PLANTED" not in r.stdout and r.stdout.startswith("16550A UART"), r.stdout
