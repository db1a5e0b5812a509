"""Generated modules (cffi types, description data): every binding is found for the wheel, and none comes from the cache."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm import paths
from pykvm.devices import description
from pykvm.startup import ffigen, generated, prebuild

from .helpers import ROOT


def _source_calls() -> set[str]:
    """Binding names of every ffigen.load call, and a check that nothing reaches load() another way."""
    names = set()
    for path in Path(paths.PACKAGE).rglob("*.py"):
        text = path.read_text()
        assert "from .ffigen import" not in text and "ffigen import load" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "ffigen":
                names.add(node.args[0].value)
    return names


def test_every_binding_in_the_source_is_generated_for_the_wheel(tmp_path):
    # the bus libc binding was missing from the wheel, so an installed pykvm looked for it in the cache
    found = _source_calls()
    assert {"abi", "kvm", "kvmrun", "buslibc", "sigsys", "seccomp"} <= found
    r = subprocess.run([sys.executable, "-m", "pykvm.startup.prebuild", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    made = {p.name.rsplit("_", 1)[0].removeprefix("_pykvm_") for p in tmp_path.glob("_pykvm_*.py")}
    assert made == found


def test_a_binding_declared_inside_a_function_is_a_build_error(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "late.py").write_text("from pykvm.startup import ffigen\n\ndef f(text):\n"
                                 "    return ffigen.load('late', text + 'int x;')\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from pykvm.startup import prebuild; "
            f"prebuild.bindings({str(pkg)!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "pkg.late line 4: cannot find the declarations of binding 'late'" in r.stderr, \
        r.stderr


def test_two_bindings_of_one_name_loaded_in_functions_both_ship(tmp_path):
    pkg = tmp_path / "pkg2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for mod, decl in (("a", "int shm_a(int);"), ("b", "int shm_b(void);")):
        (pkg / f"{mod}.py").write_text(f"from pykvm.startup import ffigen\n\nCDEF = {decl!r}\n\n\n"
                                       "def f():\n    return ffigen.load('shm', CDEF)\n")
    out = tmp_path / "out"
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from pykvm.startup import prebuild; "
            f"prebuild.build({str(out)!r}, {str(pkg)!r})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.py")) == sorted(
        f"{ffigen.module_name('shm', d)}.py" for d in ("int shm_a(int);", "int shm_b(void);"))


def test_a_source_tree_generates_into_its_own_checked_directory_not_the_cache(tmp_path):
    env = dict(os.environ, PYKVM_BUILD_DIR=str(tmp_path))
    code = ("import pykvm.kvm, pykvm.bus._libc; from pykvm.startup import generated; "
            "from pykvm.devices import description; description.shipped()['serial']; print(generated.directory())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    where = Path(r.stdout.strip())
    assert where == Path(generated.TREE_DIR).resolve()
    assert list(tmp_path.iterdir()) == []              # nothing generated into (or read from) the cache
    assert not stat.S_IMODE(where.stat().st_mode) & 0o022
    assert list((where / "ffi").glob("_pykvm_buslibc_*.py")) and (where / f"{description.GENERATED}.py").is_file()


def test_the_description_data_is_what_tomllib_reads_and_is_remade_when_a_file_changes(tmp_path):
    raw = description.read_files(description.HERE)
    docs = description.documents(raw)
    namespace: dict = {}
    exec(description.module_text(raw, docs), namespace)
    import tomllib

    assert namespace["DATA"] == {stem: tomllib.loads(b.decode()) for stem, b in raw.items()}
    changed = dict(raw, serial=raw["serial"] + b"\n# edited\n")
    assert description.module_text(changed, docs) != description.module_text(raw, docs)   # SOURCE differs
    # every shipped description validates from the data, as the wheel's build step insists
    assert description.write_generated(str(tmp_path)) == str(tmp_path / f"{description.GENERATED}.py")
    assert all(description.from_data(d, s).name == s for s, d in docs.items())


def test_ffigen_never_looks_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_BUILD_DIR", str(tmp_path))
    ffigen.load("testonly", "int testonly_fn(int);")
    assert list(tmp_path.iterdir()) == []
    assert generated.find("ffi", ffigen.module_name("testonly", "int testonly_fn(int);")) is not None


def test_a_generated_directory_others_can_write_is_refused(tmp_path, monkeypatch):
    from pykvm import errors

    shared = tmp_path / "generated"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(generated, "TREE_DIR", str(shared))
    monkeypatch.setattr(generated, "_where", [])
    monkeypatch.setattr(paths, "INSTALLED", False)
    with pytest.raises(errors.UnsafeCacheError, match="refusing the generated-code directory .* writable by group"):
        generated.directory()
