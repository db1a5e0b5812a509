"""`pykvm fuzz`: under afl-fuzz (the forkserver protocol), or one input as a reproducer (--input)."""

from __future__ import annotations

import os
import sys

from ..errors import EXIT_OK, UsageError
from . import dictionary
from .coverage import CoverageMap
from .forkserver import FORKSRV_FD, ProtocolError, Sentinels, ShmInput, serve
from .target import FuzzTarget


def _say(text: str) -> None:
    print(f"pykvm: {text}", file=sys.stderr, flush=True)


def reproduce(kernel, input_file, timeout: float, *, sandbox: bool = False, **opts) -> int:
    """Run one input from the snapshot; print how it ended (and its core); the exit status."""
    try:
        with open(input_file, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"--input {input_file}: {e.strerror}") from None
    cov = CoverageMap()
    target = None
    try:
        target = FuzzTarget(kernel, cov, console=2, **opts)
        if sandbox:
            _sandbox(opts.get("crash_dir"))
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
    return result.exit_status


def under_afl(kernel, *, sandbox: bool = False, **opts) -> int:
    """Serve afl-fuzz's forkserver protocol until it is done with us."""
    try:
        os.fstat(FORKSRV_FD)
        os.fstat(FORKSRV_FD + 1)
    except OSError:
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
