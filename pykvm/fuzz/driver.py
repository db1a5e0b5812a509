"""`pykvm fuzz`: under afl-fuzz (the forkserver protocol), one input from stdin for AFL's tools that run a
target without a forkserver (afl-showmap on one file), or one input as a reproducer (--input)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from ..errors import EXIT_OK, UsageError
from . import dictionary
from .coverage import CoverageMap
from .forkserver import FORKSRV_FD, MAX_FILE, ProtocolError, Sentinels, ShmInput, serve
from .target import FuzzTarget


def _say(text: str) -> None:
    print(f"pykvm: {text}", file=sys.stderr, flush=True)


def reproduce(kernel, input_file, timeout: float, *, sandbox: bool = False, **opts) -> int:
    """Run one input from the snapshot; print how it ended (and its core); the exit status."""
    try:
        with open(input_file, "rb") as f:
            data = f.read(MAX_FILE)
    except OSError as e:
        raise UsageError(f"--input {input_file}: {e.strerror}") from None
    return _run_one(kernel, data, CoverageMap(), timeout, sandbox, opts).exit_status


def single_run(kernel, shm_id: int, timeout: float, *, sandbox: bool = False, **opts) -> int:
    """One input from stdin with its coverage in AFL's map, as AFL's tools run a target without a
    forkserver (afl-showmap on one file); a crash ends the process by the signal a native one would."""
    try:
        data = sys.stdin.buffer.read(MAX_FILE)          # a file or a pipe, to its end
    except (OSError, AttributeError) as e:
        raise UsageError(f"pykvm fuzz: cannot read the input from stdin: {e}") from None
    result = _run_one(kernel, data, CoverageMap(shm_id), timeout, sandbox, opts)
    if result.kind == "crash":
        sig = result.wait_status
        sys.stderr.flush()
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_kill(threading.get_ident(), sig)      # tgkill on ourselves: the sandbox allows it
    return result.exit_status


def _run_one(kernel, data: bytes, cov: CoverageMap, timeout: float, sandbox: bool, opts: dict):
    """Boot to the snapshot, run data once, say how it ended (and its core); the RunResult."""
    target = None
    try:
        target = FuzzTarget(kernel, cov, console=2, **opts)
        if sandbox:
            _sandbox(opts.get("crash_dir"))
        cov.clear()                  # the boot's coverage is not the input's (afl-fuzz clears it per run too)
        result = target.run(data, timeout=timeout)
        target.settle()
        edges = cov.edges()
    finally:
        if target is not None:
            target.close()
        cov.close()
    if result.kind == "ok":
        _say(f"input ran to completion ({edges} coverage map entries hit)")
    else:
        what = result.outcome.reason if result.outcome is not None else "hang"
        _say(f"{'guest crashed' if result.kind == 'crash' else 'input hung'}: {what}")
        if result.core is not None:
            _say(f"core: {result.core} (input beside it: {result.input_file}); pykvm inspect {result.core}")
        elif result.core_error:
            _say(f"no core: {result.core_error}")
    return result


def under_afl(kernel, *, timeout: float = 10.0, sandbox: bool = False, **opts) -> int:
    """Serve afl-fuzz's forkserver protocol until it is done with us (or, given AFL's coverage map but
    no forkserver, as afl-showmap does for one file: single_run)."""
    try:
        os.fstat(FORKSRV_FD)
        os.fstat(FORKSRV_FD + 1)
    except OSError:
        shm_id = _env_int("__AFL_SHM_ID")
        if shm_id is not None:
            return single_run(kernel, shm_id, timeout, sandbox=sandbox, **opts)
        raise UsageError("pykvm fuzz: not started by afl-fuzz (no forkserver descriptors 198/199); run it as "
                         "`afl-fuzz -i SEEDS -o OUT -- pykvm fuzz KERNEL`, or give --input FILE") from None
    shm_id = _env_int("__AFL_SHM_ID")
    fuzz_id = _env_int("__AFL_SHM_FUZZ_ID")
    sentinels = Sentinels()          # forked before any thread of the VM exists
    cov = shm = target = None
    try:
        cov = CoverageMap(shm_id)
        shm = ShmInput(fuzz_id) if fuzz_id is not None else None
        target = FuzzTarget(kernel, cov, **opts)
        tokens = dictionary.read(target.machine.config.kernel)
        if sandbox:
            _sandbox(opts.get("crash_dir"))
        serve(target, sentinels, cov.size, shm, autodict=dictionary.wire(tokens) if tokens else b"")
        target.settle()
    except ProtocolError as e:
        raise UsageError(f"pykvm fuzz: {e}") from None
    finally:
        if target is not None:
            target.close()
        if shm is not None:
            shm.close()
        if cov is not None:
            cov.close()
        sentinels.close()
    return EXIT_OK


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a shared memory id") from None


def _sandbox(crash_dir) -> None:
    """Confine the process now that the VM, AFL's memory and the sentinel helper are set up."""
    from .. import sandbox

    sandbox.install(crash_dir)
