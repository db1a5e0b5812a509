"""Packaging hook: guests/ and firmware/ ship as package data, with the firmware and cffi types prebuilt.

All metadata lives in pyproject.toml; this file only extends build_py. The sources stay
where developers edit them (guests/, firmware/ at the top of the tree); a wheel gets a
copy under pykvm/_data, plus _data/prebuilt/firmware/stubs.elf (so running a user's own
kernel needs no compiler) and _data/prebuilt/ffi (so no run parses C). An editable
install needs none of this: pykvm/paths.py finds the tree's own directories.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.d")


class BuildPyWithData(build_py):
    """build_py, then copy the guest/firmware sources and build what the wheel ships prebuilt."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        data = Path(self.build_lib) / "pykvm" / "_data"
        shutil.rmtree(data, ignore_errors=True)
        for name in ("guests", "firmware"):
            shutil.copytree(ROOT / name, data / name, ignore=SKIP)
        prebuilt = data / "prebuilt"
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(["make", "-s", "-C", str(data / "firmware"), f"O={tmp}"], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"building the exception-stub firmware for the wheel failed (needs gcc, binutils, make):\n"
                         f"{r.stderr or r.stdout}")
            (prebuilt / "firmware").mkdir(parents=True)
            shutil.copy2(Path(tmp) / "firmware" / "stubs.elf", prebuilt / "firmware" / "stubs.elf")
            # Importing the bindings from the built tree generates every cffi module they load
            # (whatever the header holds today) into the scratch cache; ship those.
            # (prepend: pip's isolated build env reaches cffi through PYTHONPATH itself)
            pythonpath = [os.path.abspath(self.build_lib)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
            env = dict(os.environ, PYKVM_BUILD_DIR=tmp, PYTHONPATH=os.pathsep.join(pythonpath))
            load = "import pykvm.abi, pykvm.kvm, pykvm.sandbox; pykvm.sandbox.bindings()"
            subprocess.run([sys.executable, "-c", load], check=True, env=env, cwd=tmp)
            shutil.copytree(Path(tmp) / "ffi", prebuilt / "ffi", ignore=SKIP)


setup(cmdclass={"build_py": BuildPyWithData})
