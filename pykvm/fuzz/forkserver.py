"""AFL++'s forkserver protocol (as afl-fuzz 4.x speaks it), served by a snapshot-resetting VM.

AFL starts the target with descriptors 198 (control, AFL -> target) and 199 (status, target ->
AFL). The target says hello with a 4-byte options word: FS_OPT_ENABLED, FS_OPT_MAPSIZE with the
coverage map's size, and FS_OPT_SHDMEM_FUZZ when AFL offered test cases in shared memory
(__AFL_SHM_FUZZ_ID), which AFL then confirms with a word of its own, and FS_OPT_AUTODICT with it when
the guest declares dictionary tokens (fuzz/dictionary.py): afl-fuzz's answer then carries
FS_OPT_AUTODICT too when it takes them, and the target sends their length and the records. The
offer is only ever made together with shared memory: afl-fuzz answers that offer in every case
(AFL_NO_AUTODICT, afl-showmap), while an autodictionary offered alone may get no answer at all,
and the target would wait for one. Then, per input: AFL writes
4 bytes (whether it killed the last child), the target answers a child pid, runs the input and
answers a wait status: 0, or a signal number for a crash. On a timeout AFL kills the pid it was
given and still reads the status, and counts the run as a hang.

Nothing forks per input here: the "child" AFL may kill is a sleeping sentinel process, made by a
single-threaded helper forked before the VM's threads exist. When AFL kills it, the run is over
(a hang); the helper makes a new one for the next run.
"""

from __future__ import annotations

import os
import select
import signal
import struct

FORKSRV_FD = 198
FS_OPT_ENABLED = 0x80000001
FS_OPT_MAPSIZE = 0x40000000
FS_OPT_SHDMEM_FUZZ = 0x01000000
FS_OPT_AUTODICT = 0x10000000
SHM_FUZZ_HEADER = 4              # the test case's length, then its bytes
MAX_FILE = 1 << 20               # AFL's largest test case
_WORD = struct.Struct("<I")


class ProtocolError(Exception):
    """AFL said something the protocol does not allow, or went away mid-handshake."""


def fs_opt_set_mapsize(size: int) -> int:
    """FS_OPT_SET_MAPSIZE: the map size as AFL reads it back from the hello word."""
    return (size - 1) << 1


def hello_word(map_size: int, shm_input: bool, autodict: bool = False) -> int:
    """The options word the target says hello with (an autodictionary is offered only with shared memory)."""
    word = FS_OPT_ENABLED | FS_OPT_MAPSIZE | fs_opt_set_mapsize(map_size)
    if shm_input:
        word |= FS_OPT_SHDMEM_FUZZ
        if autodict:
            word |= FS_OPT_AUTODICT
    return word


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            return out
        out += chunk
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_word(fd: int, value: int) -> None:
    os.write(fd, _WORD.pack(value & 0xFFFFFFFF))


class Sentinels:
    """Sleeping processes whose pids AFL may kill, made on request by a helper forked early."""

    def __init__(self):
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the helper: single-threaded, no VM
            try:
                os.close(req_w)
                os.close(ans_r)
                for fd in (FORKSRV_FD, FORKSRV_FD + 1):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                _helper(req_r, ans_w)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(ans_w)
        self.helper = pid
        self._req, self._ans = req_w, ans_r
        self.pid = None
        self._pidfd = None
        self._poll = select.poll()

    def current(self) -> int:
        """A live sentinel's pid (a new one when AFL killed the last)."""
        if self.pid is None or self.dead():
            os.write(self._req, b"n")
            raw = _read_exact(self._ans, 4)
            if len(raw) != 4:
                raise ProtocolError("the sentinel helper went away")
            if self._pidfd is not None:
                self._poll.unregister(self._pidfd)
                os.close(self._pidfd)
            self.pid = _WORD.unpack(raw)[0]
            self._pidfd = os.pidfd_open(self.pid)
            self._poll.register(self._pidfd, select.POLLIN)
        return self.pid

    def dead(self) -> bool:
        """True once the current sentinel has died (AFL killed it: a hang)."""
        return self._pidfd is not None and bool(self._poll.poll(0))

    def close(self) -> None:
        """End the helper (it kills its sentinel) and release the descriptors."""
        for fd in (self._req, self._ans, self._pidfd):
            if fd is not None:
                os.close(fd)
        self._pidfd = None
        try:
            os.waitpid(self.helper, 0)
        except ChildProcessError:
            pass


def _helper(req: int, ans: int) -> None:
    """Make a sleeper per request; kill it when the next is asked for or when the VMM goes."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)      # sleepers are reaped by the kernel
    current = None
    while os.read(req, 1):
        if current is not None:
            try:
                os.kill(current, signal.SIGKILL)
            except ProcessLookupError:
                pass
        current = os.fork()
        if current == 0:
            os.close(req)
            os.close(ans)
            while True:
                signal.pause()
        os.write(ans, _WORD.pack(current))
    if current is not None:
        try:
            os.kill(current, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ShmInput:
    """AFL's shared-memory test cases (__AFL_SHM_FUZZ_ID): a 4-byte length, then the bytes."""

    def __init__(self, shm_id: int):
        from ..startup import ffigen
        from .coverage import _CDEF

        ffi = self._ffi = ffigen.load("shm", _CDEF)
        self._lib = ffi.dlopen(None)
        addr = self._lib.shmat(shm_id, ffi.NULL, 0)
        if int(ffi.cast("intptr_t", addr)) == -1:
            raise ProtocolError(f"cannot attach AFL's test-case memory (__AFL_SHM_FUZZ_ID={shm_id}, "
                                f"errno {ffi.errno})")
        self._addr = addr
        self._buf = ffi.buffer(addr, SHM_FUZZ_HEADER + MAX_FILE)

    def read(self) -> bytes:
        """This run's test case."""
        n = min(_WORD.unpack(self._buf[0:4])[0], MAX_FILE)
        return self._buf[SHM_FUZZ_HEADER:SHM_FUZZ_HEADER + n]

    def close(self) -> None:
        """Nothing to do: the segment stays attached until the process exits (shmdt is not in the
        sandbox's policy, and AFL removes the segment itself)."""


def read_stdin_case() -> bytes:
    """The test case AFL wrote to the file our stdin is (it rewrites it per run): read from offset 0."""
    out = []
    at = 0
    while at < MAX_FILE:
        chunk = os.pread(0, MAX_FILE - at, at)
        if not chunk:
            break
        out.append(chunk)
        at += len(chunk)
    return b"".join(out)


def serve(target, sentinels: Sentinels, map_size: int, shm_input: ShmInput | None, log=None,
          autodict: bytes = b"") -> int:
    """Answer AFL until it closes the control pipe; returns how many inputs ran. `autodict` is
    dictionary.wire()'s bytes (empty: none offered)."""
    ctl, st = FORKSRV_FD, FORKSRV_FD + 1
    offer = bool(autodict) and shm_input is not None
    _write_word(st, hello_word(map_size, shm_input is not None, offer))
    if shm_input is not None:
        raw = _read_exact(ctl, 4)
        if len(raw) != 4:
            raise ProtocolError("afl-fuzz closed the control pipe during the handshake")
        word = _WORD.unpack(raw)[0]
        if word & FS_OPT_ENABLED != FS_OPT_ENABLED or not word & FS_OPT_SHDMEM_FUZZ:
            raise ProtocolError(f"afl-fuzz answered the shared-memory offer with {word:#x}")
        if word & FS_OPT_AUTODICT:
            if not offer:
                raise ProtocolError(f"afl-fuzz took an autodictionary nobody offered ({word:#x})")
            _write_all(st, autodict)
    runs = 0
    while True:
        raw = _read_exact(ctl, 4)
        if len(raw) != 4:
            return runs                 # afl-fuzz is done with us
        _write_word(st, sentinels.current())
        data = shm_input.read() if shm_input is not None else read_stdin_case()
        target.start(data)
        result = target.wait(cancelled=sentinels.dead)
        _write_word(st, result.wait_status)
        runs += 1
        if log is not None and result.kind == "crash":
            log(result)
