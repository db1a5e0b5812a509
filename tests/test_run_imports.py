"""A plain `pykvm run` loads neither json nor re: its caches, header scans and command script do without them."""

from __future__ import annotations

import pytest

from .helpers import guest
from .test_lateimport import python


@pytest.mark.kvm
def test_a_plain_run_imports_neither_json_nor_re(tmp_path):
    # json and re cost ~3 ms of every run; the importers are named so a regression says who brought them back
    # a cold cache generates the cffi modules and compiles the seccomp program (cffi, pycparser and pyseccomp
    # import re): one run first, as every run after a user's first finds them cached
    warm = python("import sys; from pykvm.__main__ import entry; sys.argv = ['pykvm', 'run', *sys.argv[1:]]; entry()",
                  str(guest("multiboot")), "--serial", "none", "--no-dump")
    assert warm.returncode == 1, warm.stderr
    r = python("""
        import os, sys
        importers = []
        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name in ("re", "json"):
                    f = sys._getframe(1)
                    while f.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
                        f = f.f_back
                    importers.append(f"{name}<-{f.f_globals.get('__name__')}")
                return None
        sys.meta_path.insert(0, Watch())
        exit_ = os._exit
        def leave(status):
            loaded = [m for m in ("json", "re") if m in sys.modules]
            print("loaded:", *loaded, "|", *importers, file=sys.stderr, flush=True)
            exit_(status)
        os._exit = leave
        sys.argv = ["pykvm", "run", *sys.argv[1:]]
        from pykvm.__main__ import entry
        entry()
    """, str(guest("multiboot")), "--serial", "none", "--no-dump")
    last = r.stderr.splitlines()[-1]
    assert last.startswith("loaded:"), r.stderr
    loaded, importers = last[len("loaded:"):].split("|")
    # the sandbox's lateimport looks the modules up to hold them in memory (it does not run them)
    assert loaded.split() == [] and all(i.endswith("<-pykvm.startup.lateimport") for i in importers.split()), last


def test_the_installed_command_is_our_script_not_a_generated_wrapper():
    # pip's wrapper for a [project.scripts] entry imports re before pykvm runs; bin/pykvm does not
    from .helpers import ROOT

    text = (ROOT / "bin" / "pykvm").read_text()
    assert text.startswith("#!/usr/bin/env python3\n") and "import re" not in text
    assert 'script-files = ["bin/pykvm"]' in (ROOT / "pyproject.toml").read_text()
    assert "[project.scripts]" not in (ROOT / "pyproject.toml").read_text().splitlines()
