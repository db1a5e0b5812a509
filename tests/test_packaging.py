"""pykvm installs like any Python package: a wheel in a fresh venv boots a bundled guest and a user's kernel, loading code only from itself."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require_tool
from .helpers import ROOT
from .test_generated import _source_calls

SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
                              "crashes", "*.core", "venv", ".venv")


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}: status {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.kvm
def test_wheel_in_fresh_venv_boots_hello_and_a_user_kernel(tmp_path):
    for tool in ("make", "gcc"):
        require_tool(tool)
    # Build from a copy so concurrent runs never share setuptools' build/ and egg-info.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)])
    (wheel,) = dist.glob("pykvm-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    # the test's own pip installs into the venv (no ensurepip: seconds saved); deps come from PyPI or pip's cache
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
          "--disable-pip-version-check", str(wheel)])
    site = next((venv / "lib").glob("python3*/site-packages"))
    (entry_points,) = site.glob("pykvm-*.dist-info/entry_points.txt")
    assert "[pytest11]\npykvm = pykvm.pytest_plugin" in entry_points.read_text()  # the plugin loads by itself
    shipped = sorted(p for p in (site / "pykvm").rglob("*") if "__pycache__" not in p.parts)

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYKVM_"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    r = subprocess.run([str(venv / "bin" / "pykvm"), "run", "hello", "--timeout", "60"], cwd=cwd, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello from pykvm!\n")
    assert "bundled guests into" in r.stderr  # a first build says what it is doing
    cache = tmp_path / "xdg" / "pykvm"
    (built,) = cache.glob("guests-*/guests/multiboot.elf")
    assert not list(cache.glob("firmware-*"))  # the wheel's prebuilt firmware served
    assert stat.S_IMODE(cache.stat().st_mode) == stat.S_IMODE((tmp_path / "xdg").stat().st_mode) == 0o700

    # Every binding ships prebuilt (the bus libc one did not, and was looked for in the cache), the
    # descriptions ship as data, and a module planted in the cache under a binding's name never runs:
    # with -X importtime, neither pycparser (C parsed at run time) nor tomllib may appear.
    prebuilt = site / "pykvm" / "_data" / "prebuilt"
    shipped_ffi = sorted(p.name for p in (prebuilt / "ffi").glob("_pykvm_*.py"))
    assert {n.rsplit("_", 1)[0].removeprefix("_pykvm_") for n in shipped_ffi} == _source_calls()
    assert (prebuilt / "_pykvm_descriptions.py").is_file()
    marker = tmp_path / "planted-code-ran"
    (cache / "ffi").mkdir()
    for name in shipped_ffi:
        (cache / "ffi" / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-X", "importtime", "-m", "pykvm", "run", "bus-echo", "--bus",
                        "--timeout", "60"], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "echo: 100 messages of 64 bytes ok" in r.stdout, r.stderr
    assert not marker.exists()
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "bus" in " ".join(imported) and not {"pycparser", "tomllib", "pyseccomp"} & imported
    shutil.rmtree(cache / "ffi")

    # A user's kernel with no compiler on PATH and a cold cache: prebuilt firmware only.
    user = tmp_path / "kernel.elf"
    shutil.copy(built, user)
    env = dict(env, PATH=str(venv / "bin"), XDG_CACHE_HOME=str(tmp_path / "xdg2"))
    r = subprocess.run([str(venv / "bin" / "pykvm"), "run", str(user), "--timeout", "60"], cwd=cwd, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # the guest's exit_code(0) through the debug port
    assert r.stdout.endswith("multiboot ok\n")
    assert not list((tmp_path / "xdg2" / "pykvm").glob("firmware-*"))

    assert list(cwd.iterdir()) == []  # nothing written into the current directory
    after = sorted(p for p in (site / "pykvm").rglob("*") if "__pycache__" not in p.parts)
    assert after == shipped  # nor into the installed package
