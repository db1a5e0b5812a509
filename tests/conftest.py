"""Shared test set-up: the `kvm` marker skips locally without /dev/kvm and fails in CI."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
pytest_plugins = ["pytester"]   # tests/test_pytest_plugin.py runs pytest sessions of its own


def kvm_problem() -> str | None:
    """Why /dev/kvm cannot be used here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def require_tool(name: str) -> str:
    """Path of a host tool a test needs; skip locally, fail in CI when missing."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{msg} (CI must have it)")
        pytest.skip(msg)
    return path


def pytest_configure(config):
    """One pykvm cache (guest builds, cffi types) per session, shared by its tests and their subprocesses.

    Never the user's ~/.cache: a test run neither depends on nor litters it. Building the
    guests once costs a few seconds per session. A PYKVM_BUILD_DIR already set is kept,
    to reuse builds across sessions deliberately.
    """
    if os.environ.get("PYKVM_BUILD_DIR"):
        return
    config._pykvm_cache = tempfile.mkdtemp(prefix="pykvm-test-cache-")
    os.environ["PYKVM_BUILD_DIR"] = config._pykvm_cache


@pytest.fixture(scope="session", autouse=True)
def _built_once():
    """Build firmware and guests before any test, so no test's stderr carries the one-time build notice."""
    from pykvm.startup import artifacts
    from pykvm.errors import ToolchainError

    try:
        artifacts.firmware_path()
        artifacts.guests_dir()
    except ToolchainError:
        pass  # tests needing the guests report it themselves


def pytest_unconfigure(config):
    cache = getattr(config, "_pykvm_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        del os.environ["PYKVM_BUILD_DIR"]


def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm") is None:
        return
    problem = kvm_problem()
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{problem}: CI runs must have KVM (see docs/cli.md, Prerequisites: enabling /dev/kvm on CI runners)")
    pytest.skip(f"needs KVM: {problem}")
