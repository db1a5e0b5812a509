"""Modules held in memory before the sandbox: imported from there later, and nothing else imported at all."""

from __future__ import annotations

import json
import os
import py_compile
import site
import subprocess
import sys
import textwrap

import pytest

from .helpers import ROOT


def python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter from the tree root (held modules and the finder are per process).

    Without site (-S; site-packages on PYTHONPATH instead): .pth files can import modules at start (certifi,
    say) that would hide a late module's missing dependency here but not for a user.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *site.getsitepackages()]))
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("cores, control", [(False, False), (True, False), (False, True), (True, True)])
def test_every_late_module_imports_from_memory_after_the_run_paths_imports(cores, control):
    # What a plain `pykvm run` has loaded when the sandbox goes on, then every module the sandbox holds, imported
    # with nothing but memory to import from: a dependency missing from sandbox.py's lists fails here by name.
    # A first process generates the cffi modules (a cold cache imports cffi and pycparser, which a run does not).
    warm = python("import pykvm.machine, pykvm.sandbox; pykvm.sandbox.bindings()")
    assert warm.returncode == 0, warm.stderr
    r = python("""
        import sys
        import pykvm.runcmd, pykvm.api, pykvm.machine, pykvm.sandbox as sb
        assert "cffi" not in sys.modules, "the cffi modules were generated in this process"
        if sys.argv[2] == "True":
            import pykvm.control.server
        from pykvm.startup import lateimport
        names = sb.late_modules(cores=sys.argv[1] == "True")
        lateimport.hold(names)
        lateimport.serve()
        for name in names:
            __import__(name)
            print(name, type(sys.modules[name].__spec__.loader).__name__)
        if sys.argv[1] == "True":
            "x".encode("cp437")   # the core writer's screen text: codecs look encodings up by import
    """, str(cores), str(control))
    assert r.returncode == 0, r.stderr
    loaders = dict(line.split() for line in r.stdout.splitlines())
    assert loaders["traceback"] == "_MemoryFinder"
    assert ("pykvm.devices.mailbox" in loaders) == control      # hot-pluggable: held when a control socket exists
    # only `ctl save` writes state under the sandbox: its writer (and OpenSSL, for the digest) only with control
    assert loaders.get("pykvm.snapshot.state") == ("_MemoryFinder" if control else None)
    assert ("_hashlib" in loaders) == control


def test_a_module_not_held_is_refused_by_name_and_a_held_one_runs_only_when_imported():
    r = python("""
        import sys
        from pykvm.startup import lateimport
        lateimport.hold(["colorsys"])
        lateimport.serve()
        print("colorsys" in sys.modules)
        import colorsys
        print(colorsys.rgb_to_hsv(1.0, 0.0, 0.0))
        try:
            import wave
        except ModuleNotFoundError as e:
            print(e.name, "|", e)
    """)
    assert r.returncode == 0, r.stderr
    first, second, third = r.stdout.splitlines()
    assert first == "False" and second == "(0.0, 1.0, 1.0)"
    assert third.startswith("wave | No module named 'wave': pykvm did not read it before its sandbox was installed")


@pytest.fixture
def package(tmp_path):
    """A package dir with module m.py (VALUE = 42) and its cached bytecode."""
    src = tmp_path / "m.py"
    src.write_text("VALUE = 42\n")
    cached = py_compile.compile(str(src), doraise=True)
    return tmp_path, cached


HOLD_M = """
    import sys
    sys.path.insert(0, sys.argv[1])
    from pykvm.startup import lateimport
    lateimport.hold(["m"])
    lateimport.serve()
    try:
        import m
        print("imported", m.VALUE)
    except ImportError as e:
        print("refused", e)
"""


def test_bytecode_damaged_after_its_header_fails_its_import_clearly(package):
    root, cached = package
    data = open(cached, "rb").read()
    open(cached, "wb").write(data[:16] + data[16:][: len(data[16:]) // 2])     # header intact, code truncated
    r = python(HOLD_M, str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused cannot import m: its bytecode ") and "is damaged" in r.stdout


@pytest.mark.parametrize("damage", [
    lambda d: b"\0\0\0\0" + d[4:],                 # not this interpreter's magic number
    lambda d: d[:4] + b"\x07\0\0\0" + d[8:],       # unknown flags
    lambda d: d[:8] + b"\0\0\0\0" + d[12:],        # another source's mtime
    lambda d: d[:10],                              # shorter than a header
])
def test_bytecode_with_a_bad_header_is_not_used_and_the_source_is(package, damage):
    root, cached = package
    open(cached, "wb").write(damage(open(cached, "rb").read()))
    r = python(HOLD_M, str(root))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "imported 42\n"


@pytest.mark.kvm
def test_a_vmm_bug_under_the_sandbox_reports_its_traceback_and_writes_a_core(tmp_path):
    # The traceback, the crash capture and the core writer are imported only now, from memory: the process can
    # no longer open a file.
    image = tmp_path / "g.bin"
    # movabs r12, 0xabcdef; mov dx, 0x700; out dx, al; hlt
    image.write_bytes(bytes.fromhex("49bcefcdab0000000000" "66ba0007" "ee" "f4"))
    r = python("""
        import sys
        from pathlib import Path
        from pykvm.devices import Device
        from pykvm.machine import Machine, MachineConfig

        class Exploding(Device):
            name = "exploding"
            ports = [(0x700, 1)]

            def io_write(self, offset, size, value):
                raise RuntimeError("model bug")

        cfg = MachineConfig(kernel=Path(sys.argv[1]), flat_addr=0x100000, timeout=20, crash_dir=Path(sys.argv[2]),
                            sandbox=True)
        assert "traceback" not in sys.modules
        with Machine(cfg) as m:
            m.devices.add(Exploding())
            outcome = m.run()
        print(outcome.status, outcome.kind, outcome.core_path)
        print(type(sys.modules["traceback"].__spec__.loader).__name__)
        print(outcome.details["traceback"].splitlines()[-1])
    """, str(image), str(tmp_path / "cores"))
    assert r.returncode == 0, r.stderr
    status_line, loader, last = r.stdout.splitlines()
    status, kind, core = status_line.split()
    assert status == "20" and kind == "vmm-error" and os.path.exists(core)
    assert loader == "_MemoryFinder"
    assert last == "RuntimeError: model bug"


@pytest.mark.kvm
@pytest.mark.parametrize("name, cores", [("multiboot", False), ("crash-ud", True)])
def test_a_plain_run_never_imports_pathlib_not_even_to_write_a_core(tmp_path, name, cores):
    # pathlib and what it pulls in (urllib.parse, ipaddress, ntpath) cost ~4 ms of every run; the run path
    # works on str paths, and the API builds a Path only for a caller who asks (Outcome.core_path, VM.kernel)
    from .helpers import guest

    crash_dir = tmp_path / "cores"
    r = python("""
        import os, sys
        exit_ = os._exit
        def leave(status):
            print("pathlib loaded:", "pathlib" in sys.modules, file=sys.stderr, flush=True)
            exit_(status)
        os._exit = leave
        sys.argv = ["pykvm", "run", *sys.argv[1:]]
        from pykvm.__main__ import entry
        entry()
    """, str(guest(name)), "--serial", "none", "--crash-dir", str(crash_dir), *(() if cores else ("--no-dump",)))
    assert r.stderr.splitlines()[-1] == "pathlib loaded: False", r.stderr
    if cores:
        assert r.returncode == 16, r.stderr
        (core,) = os.listdir(crash_dir)
        assert f"core written to {crash_dir}/{core} " in r.stderr


# ------------------------------------------------------------------ late paths from a bare interpreter (issue 19, 7)
# `python -S -I`: no site (no .pth file imports anything), no PYTHON* variables, no user site. What the sandbox holds
# must then still cover every late path, whatever the interpreter happened to import before.
BARE_PRELUDE = """
import sys
sys.path[:0] = {path!r}
"""


def bare(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run code in `python -S -I` with only the tree and the installed packages' directories on sys.path."""
    prelude = BARE_PRELUDE.format(path=[str(ROOT), *site.getsitepackages()])
    return subprocess.run([sys.executable, "-S", "-I", "-c", prelude + textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """Fill the caches first (the cffi modules, the compiled seccomp program): on a cold cache, generating them
    imports cffi, pycparser and pyseccomp, whose imports (collections.abc among them) hide what a late path lacks."""
    # the program's cache key holds the crash directory's descriptor number: warm it as each test opens it
    for before in ("pass", "from tests.test_crash_support import make_memory; mem = make_memory()"):
        r = bare(f"import pykvm.machine, pykvm.sandbox; {before}; pykvm.sandbox.bindings(); "
                 "pykvm.sandbox.install(sys.argv[1])", str(tmp_path_factory.mktemp("warm") / "crashes"))
        assert r.returncode == 0, r.stderr


def test_a_traceback_after_the_sandbox_with_nothing_else_imported(tmp_path, warm):
    r = bare("""
        from pykvm import sandbox
        sandbox.install(sys.argv[1])
        assert "cffi" not in sys.modules and "pyseccomp" not in sys.modules
        import traceback
        try:
            1 / 0
        except ZeroDivisionError:
            print(traceback.format_exc().splitlines()[-1])
        print(type(sys.modules["traceback"].__spec__.loader).__name__)
    """, str(tmp_path / "crashes"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ZeroDivisionError: division by zero", "_MemoryFinder"]


def test_a_core_is_written_after_the_sandbox_from_a_bare_interpreter(tmp_path, warm):
    r = bare("""
        from pykvm import sandbox
        from tests.test_crash_support import make_memory, regs, long_sregs
        from pykvm.crash.snapshot import CrashSnapshot, VcpuState
        import pykvm.abi     # a VMM has always read the guest ABI header (its import reads a file) before the sandbox
        mem = make_memory()
        mem.write(0x300000, b"guest bytes")
        snap = CrashSnapshot("host-request", "test", [VcpuState(0, regs(rip=0x1234), long_sregs(0x200000), None)], 0, mem)
        assert "pykvm.crash.core" not in sys.modules
        sandbox.install(sys.argv[1])
        assert "pyseccomp" not in sys.modules     # (the test helpers import cffi themselves)
        from pykvm.crash.core import write_core_file
        print(write_core_file(snap, sys.argv[1]))
    """, str(tmp_path / "crashes"))
    assert r.returncode == 0, r.stderr
    core = r.stdout.strip()
    data = open(core, "rb").read()
    assert data[:4] == b"\x7fELF" and b"guest bytes" in data


RUN_BARE = """
from pykvm.__main__ import entry
sys.argv = ["pykvm", "run", *sys.argv[1:]]
entry()
"""


@pytest.mark.kvm
def test_a_vmm_from_a_bare_interpreter_writes_its_core(tmp_path, warm):
    from .helpers import guest

    crash_dir = tmp_path / "cores"
    r = bare(RUN_BARE, str(guest("crash-ud")), "--serial", "none", "--crash-dir", str(crash_dir))
    assert r.returncode == 16, r.stderr
    (core,) = os.listdir(crash_dir)
    assert open(crash_dir / core, "rb").read(4) == b"\x7fELF"


@pytest.mark.kvm
def test_a_vmm_from_a_bare_interpreter_saves_through_its_control_socket(tmp_path, warm):
    import time

    from pykvm.control.client import request

    from .helpers import WINDOW_POLL_ARGS, guest

    sock, serial = str(tmp_path / "vm.sock"), tmp_path / "serial.log"
    prelude = BARE_PRELUDE.format(path=[str(ROOT), *site.getsitepackages()])
    proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", prelude + RUN_BARE, str(guest("window-poll")),
                             *WINDOW_POLL_ARGS, "--device", "mailbox", "--cmdline", "save", "--control", sock,
                             "--serial", str(serial), "--timeout", "60", "--no-dump"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (serial.exists() and b"save: configured" in serial.read_bytes() and os.path.exists(sock)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        assert request(sock, {"cmd": "stats"})["ok"]
        state = tmp_path / "vm.state"
        saved = request(sock, {"cmd": "save", "path": str(state), "stop": False})  # the client passes a descriptor
        assert saved["ok"] and saved.get("fd"), saved
        assert proc.wait(timeout=60) == 39, proc.stderr.read()           # the guest ran on to its end
        assert state.stat().st_size == saved["bytes"]
    finally:
        proc.kill()
        proc.wait()


def test_what_a_held_module_body_imports_is_held_and_what_its_functions_import_is_not(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .sub import c as _c\nimport pkg.d\n"
                              "class K:\n    import pkg.e\n"
                              "try:\n    import pkg_absent_accelerator\nexcept ImportError:\n    pass\n"
                              "def later():\n    import pkg.f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    for name in ("b", "sub/c", "d", "e", "f"):
        (pkg / f"{name}.py").write_text(f"NAME = {name!r}\n")
    r = python("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from pykvm.startup import lateimport
        lateimport.hold(["pkg.a"])
        print(" ".join(sorted(lateimport.held())))
        lateimport.serve()
        import pkg.a
        print(pkg.a.b.NAME, pkg.a._c.NAME, pkg.d.NAME, pkg.e.NAME)
        try:
            pkg.a.later()
        except ModuleNotFoundError as e:
            print("refused", e.name)
    """, str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["pkg pkg.a pkg.b pkg.d pkg.e pkg.sub pkg.sub.c", "b sub/c d e", "refused pkg.f"]


@pytest.mark.parametrize("package, level, name, expected", [
    ("pykvm.crash", 0, "json", "json"),
    ("pykvm.crash", 1, "core", "pykvm.crash.core"),
    ("pykvm.crash", 2, "paths", "pykvm.paths"),
    ("pykvm.crash", 2, "", "pykvm"),
    ("pykvm", 2, "x", None),          # above the top-level package: importlib refuses it too
    ("", 1, "x", None),
])
def test_relative_imports_resolve_as_importlib_does(package, level, name, expected):
    from pykvm.startup.lateimport import _resolve

    assert _resolve(name, package, level) == expected


def test_the_shipped_standard_library_imports_match_a_fresh_scan_for_this_interpreter():
    # late_imports.KNOWN stands in for scanning a standard-library module whose source has the recorded size: every
    # entry this interpreter has must say what scanning says, and every module the late paths reach must have one
    # (a missing one costs set-up time: run scripts/late_imports.py)
    r = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "scripts" / "late_imports.py"), "--walk", *late_roots()],
                       capture_output=True, text=True, timeout=120)     # as the script records them
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    magic, opcodes = found.pop("")
    from pykvm.startup.late_imports import KNOWN, OPCODES

    assert OPCODES.get(bytes.fromhex(magic)) == tuple(opcodes), "run scripts/late_imports.py"
    for name, (size, imports) in found.items():
        assert KNOWN.get(name, {}).get(size) == tuple(imports), f"{name}: run scripts/late_imports.py"


def late_roots() -> list:
    import importlib.util

    spec = importlib.util.spec_from_file_location("late_imports_script", ROOT / "scripts" / "late_imports.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.late_roots()
