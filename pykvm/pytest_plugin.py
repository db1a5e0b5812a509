"""pytest plugin (entry point `pykvm` in the pytest11 group): boot kernels in tests, see their crashes.

Installing pykvm enables it; `-p no:pykvm` turns it off.

Fixtures
  pykvm_vm        factory: pykvm_vm(kernel=None, **options) -> a started pykvm.VM (options as VM's).
                  Every VM it started is closed at teardown. Cores go to tmp_path/"pykvm-crashes",
                  one directory per test, so parallel runs (pytest -n) never share one.
  pykvm_config    the options of the current pykvm_matrix case ({} without the marker); pykvm_vm
                  applies them under the options a test passes itself.
  pykvm_snapshot_vm
                  factory: pykvm_snapshot_vm(kernel=None, ready=PATTERN, **options) -> a running VM
                  reset to its ready point. The kernel boots once per session (per kernel and
                  options) until `ready` appears on its serial port (bytes/str/re.Pattern, as
                  expect) or, with ready="guest", until it makes the "snapshot here" call
                  (pykvm_abi.h PYKVM_PORT_FUZZ); there it is snapshotted, and each test gets it
                  reset to that point in microseconds to milliseconds instead of a boot. Serial
                  output and input left from an earlier test are dropped. A test that ends the
                  VM (power-off, crash) makes the next one boot afresh.
Marker
  @pytest.mark.pykvm_matrix(cpus=[1, 2], mem=["64M", "128M"], trust=["trusted", "untrusted"])
                  runs the test once per combination (ids like "cpus=2-mem=64M-trust=untrusted").
Settings (command line over ini)
  --pykvm-kernel / pykvm_kernel    the kernel pykvm_vm() boots when given none (a path, relative
                                   to the ini file for the ini setting, or a bundled guest's name)
  --pykvm-timeout / pykvm_timeout  seconds before a VM is stopped with a timeout core (default 120)

When a VM a test started crashed (or hung past its timeout) and wrote a core, a failed test's
report gets a "pykvm crash" section with what `pykvm inspect` shows (reason, registers, the
faulting instruction, backtrace, serial tail) and the core's path, and the JUnit XML gets the
path as the property `pykvm_core` (as record_property would).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

_VMS = pytest.StashKey[list]()
_SEEN = pytest.StashKey[set]()
DEFAULT_TIMEOUT = 120.0


def pytest_addoption(parser):
    """The pykvm options and ini settings."""
    group = parser.getgroup("pykvm", "pykvm: booting kernels in tests")
    group.addoption("--pykvm-kernel", default=None, metavar="PATH",
                    help="kernel that pykvm_vm() boots when the test names none (or a bundled guest's name)")
    group.addoption("--pykvm-timeout", type=float, default=None, metavar="SECONDS",
                    help=f"stop a test's VM after this long, with a core (default {DEFAULT_TIMEOUT:g})")
    parser.addini("pykvm_kernel", "kernel that pykvm_vm() boots when the test names none (relative to this file)")
    parser.addini("pykvm_timeout", f"seconds before a test's VM is stopped with a core (default {DEFAULT_TIMEOUT:g})")


def pytest_configure(config):
    """Declare the marker."""
    config.addinivalue_line(
        "markers", "pykvm_matrix(**axes): run the test once per combination of VM options, e.g. "
                   "cpus=[1, 2], mem=['64M'], trust=['trusted', 'untrusted']; pykvm_vm applies them")


def pytest_generate_tests(metafunc):
    """Expand pykvm_matrix into one parametrized case per combination of its axes."""
    marker = metafunc.definition.get_closest_marker("pykvm_matrix")
    if marker is None:
        return
    axes = dict(marker.kwargs)
    if marker.args or not axes:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: pykvm_matrix takes keyword axes, "
                                "e.g. pykvm_matrix(cpus=[1, 2])")
    for name, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: pykvm_matrix({name}=...) needs a non-empty list")
    if "pykvm_config" not in metafunc.fixturenames:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: pykvm_matrix needs the pykvm_vm or pykvm_config fixture")
    names = list(axes)
    cases = [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]
    ids = ["-".join(f"{k}={v}" for k, v in case.items()) for case in cases]
    metafunc.parametrize("pykvm_config", cases, ids=ids, indirect=True)


@pytest.fixture
def pykvm_config(request) -> dict:
    """VM options of the current pykvm_matrix case ({} without the marker)."""
    return dict(getattr(request, "param", {}))


@pytest.fixture
def pykvm_vm(request, tmp_path, pykvm_config):
    """Factory: pykvm_vm(kernel=None, **options) boots a kernel and returns its pykvm.VM, closed at teardown."""
    from pykvm.api import VM

    config = request.config
    vms = request.node.stash.setdefault(_VMS, [])
    default_kernel = _default_kernel(config)
    timeout = _default_timeout(config)
    crash_dir = tmp_path / "pykvm-crashes"

    def start(kernel=None, **options) -> VM:
        kernel = kernel if kernel is not None else default_kernel
        if kernel is None:
            raise pytest.UsageError("pykvm_vm(): no kernel given and no --pykvm-kernel / pykvm_kernel setting")
        opts = {"timeout": timeout, "crash_dir": crash_dir, **pykvm_config, **options}
        vm = VM(kernel, **opts)
        vms.append(vm)
        return vm

    yield start
    for vm in vms:
        vm.close()
    _record_cores(request.node)


_POOL = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def _pykvm_snapshot_pool(request, tmp_path_factory):
    """Booted VMs with their snapshots, per (kernel, ready, options), closed at the session's end."""
    pool = request.config.stash.setdefault(_POOL, {})
    pool["_crash_dir"] = tmp_path_factory.mktemp("pykvm-snapshot-crashes")
    yield pool
    for key, entry in list(pool.items()):
        if key != "_crash_dir":
            entry[1].close()
            entry[0].close()
    pool.clear()


@pytest.fixture
def pykvm_snapshot_vm(request, _pykvm_snapshot_pool, pykvm_config):
    """Factory: pykvm_snapshot_vm(kernel=None, ready=PATTERN, **options) -> a VM reset to its ready point.

    With ready="guest" the VM comes paused at the guest's "snapshot here" call, so a test can set its
    input up before the guest reads it (vm.resume() lets it run); with a pattern it comes running.
    """
    config = request.config
    default_kernel = _default_kernel(config)
    used = request.node.stash.setdefault(_SNAP_VMS, [])

    def get(kernel=None, ready=None, **options):
        kernel = kernel if kernel is not None else default_kernel
        if kernel is None:
            raise pytest.UsageError("pykvm_snapshot_vm(): no kernel given and no --pykvm-kernel / pykvm_kernel setting")
        if ready is None:
            raise pytest.UsageError("pykvm_snapshot_vm(): give ready=PATTERN (serial output) or ready=\"guest\"")
        opts = {**pykvm_config, **options}
        key = (str(kernel), repr(ready), repr(sorted(opts.items())))
        entry = _pykvm_snapshot_pool.get(key)
        if entry is not None and entry[0].outcome is None:
            vm, snap = entry
            if ready == "guest" and not vm.paused:
                vm.pause()
            vm.reset(snap)
        else:
            if entry is not None:
                entry[1].close()
                entry[0].close()
            vm, snap = _boot_to_snapshot(kernel, ready, opts, _pykvm_snapshot_pool["_crash_dir"])
            _pykvm_snapshot_pool[key] = (vm, snap)
        used.append(vm)
        return vm

    yield get


_SNAP_VMS = pytest.StashKey[list]()


def _boot_to_snapshot(kernel, ready, opts: dict, crash_dir):
    """Boot a VM to its ready point and snapshot it there: (vm, snapshot)."""
    from pykvm.api import VM

    opts = {"crash_dir": crash_dir, **opts}
    opts.pop("timeout", None)          # the VM lives for the whole session; expect() bounds each wait
    if ready == "guest":
        from pykvm.snapshot.point import GuestSnapshotPoint

        opts["devices"] = list(opts.get("devices", ())) + ["fuzz"]
        vm = VM(kernel, start=False, **opts)
    else:
        vm = VM(kernel, **opts)
    try:
        if ready == "guest":
            point = GuestSnapshotPoint(vm.machine)
            vm.start()
            if not point.wait(60):
                raise pytest.fail(f"{kernel}: no \"snapshot here\" call within 60 s of boot", pytrace=False)
        else:
            vm.expect(ready, timeout=60)
        vm.pause()
        snap = vm.snapshot()
        if ready != "guest":
            vm.resume()
    except BaseException:
        vm.close()
        raise
    return vm, snap


def _default_kernel(config):
    if config.getoption("pykvm_kernel"):
        return _as_kernel(config.getoption("pykvm_kernel"), Path(config.invocation_params.dir))
    ini = config.getini("pykvm_kernel")
    if ini:
        return _as_kernel(ini, Path(config.inipath).parent if config.inipath else config.rootpath)
    return None


def _as_kernel(spec: str, base: Path) -> str:
    """A path relative to base, or a bundled guest's name as it is."""
    p = base / spec
    return str(p) if "/" in spec or p.exists() else spec


def _default_timeout(config) -> float:
    raw = config.getoption("pykvm_timeout") or config.getini("pykvm_timeout") or DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"pykvm_timeout {raw!r}: expected seconds") from None
    if not value > 0:
        raise pytest.UsageError(f"pykvm_timeout {raw!r}: must be positive")
    return value


def _new_cores(item) -> list:
    """Outcomes with a core among the item's VMs that were not reported yet."""
    seen = item.stash.setdefault(_SEEN, set())
    found = []
    for vm in item.stash.get(_VMS, []):
        out = vm.outcome
        if out is not None and out.core_path is not None and out.core_path not in seen:
            seen.add(out.core_path)
            found.append(out)
    return found


def _record_cores(item) -> None:
    for out in _new_cores(item):
        item.user_properties.append(("pykvm_core", str(out.core_path)))


@pytest.hookimpl(hookwrapper=True)   # old-style wrapper: pytest 7 too
def pytest_runtest_makereport(item, call):
    """Attach cores written during this phase: a JUnit property always, the inspect report on failure."""
    cores = _new_cores(item) if _VMS in item.stash else []
    for out in cores:
        item.user_properties.append(("pykvm_core", str(out.core_path)))   # before the report copies them
    result = yield
    report = result.get_result()
    if report.failed:
        for out in cores:
            report.sections.append((f"pykvm crash: {out.core_path}", _crash_text(out)))


def _crash_text(out) -> str:
    """What `pykvm inspect` says about the core, with the line to rerun it."""
    kernel = f" --kernel {out.kernel}" if out.kernel is not None and out.kernel.suffix == ".elf" else ""
    head = f"{out.kind}: {out.reason}\ncore: {out.core_path}\ninspect: pykvm inspect {out.core_path}{kernel}\n\n"
    try:
        return head + out.report_text()
    except Exception as e:  # a core the inspector cannot read must not hide the test's own failure
        return head + f"(the core could not be inspected: {type(e).__name__}: {e})\n"
