"""examples/calc builds with its own Makefile and its tests pass under the pytest plugin."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import require_tool
from .test_pytest_plugin import plugin_args

CALC = Path(__file__).resolve().parent.parent / "examples" / "calc"


@pytest.mark.kvm
def test_calc_example_builds_and_its_tests_pass(pytester, tmp_path):
    require_tool("make")
    build = tmp_path / "build"
    r = subprocess.run(["make", "-s", "-C", str(CALC), f"BUILD={build}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kernel = build / "kernel.elf"
    assert kernel.read_bytes()[:4] == b"\x7fELF"
    result = pytester.runpytest_subprocess(
        *plugin_args(), "-c", str(CALC / "pytest.ini"), "-p", "no:cacheprovider", "-rs",
        "--pykvm-kernel", str(kernel), str(CALC / "tests"), timeout=600)
    result.assert_outcomes(passed=14, skipped=1)
    assert not (CALC / "build").exists()   # everything went to tmp_path
