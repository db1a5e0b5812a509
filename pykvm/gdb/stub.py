"""A live gdb stub: gdb's remote serial protocol over TCP or a unix socket, all-stop, one thread per vCPU.

GdbStub puts the parts together: the endpoint (who may connect), the session (one connection's
packets, session.py), the stops (vCPU threads and the server agreeing on who runs, stops.py),
the registers (vcpuregs.py), guest memory by virtual address (here), and the breakpoints
(breakpoints.py). One server thread owns the connection; a vCPU that takes a KVM_EXIT_DEBUG
records a stop and parks, and the server pauses the rest and reports it.

A guest that ends while gdb is attached ends the session with W (exit status) or X (signal),
after a console line saying why; a crash is first shown as a SIGSEGV stop at the faulting
instruction, and its core is written once gdb lets go (Machine.run calls end()), or when the
run's --timeout is reached, whatever gdb is doing.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

from .. import errors
from ..kvm import KvmError
from ..memory.pagewalk import translate, virtual_spans
from ..machine.outcome import Outcome
from . import hwdebug
from .breakpoints import Breakpoints
from .endpoint import Endpoint, listen
from .rsp import EFAULT
from .session import Session
from .stops import SIGTRAP, Stop, Stops
from .vcpuregs import VcpuRegisters

END_GRACE = 5.0                # seconds a session that is told the VM ended may take to go away


class GdbStub:
    """Serves one gdb at a time for one Machine; attach() before Machine.run(), close() after."""

    def __init__(self, machine, endpoint: Endpoint, wait: bool = False, log=None):
        self.m = machine
        self.endpoint = endpoint
        self.wait = wait
        self.log = log if log is not None else sys.stderr
        self.host = hwdebug.probe(machine.kvm)
        self.stops = Stops(machine)
        self.regs = VcpuRegisters(machine, self.stops)
        self.breaks = Breakpoints(machine, self.host, self, self.log)
        self.session: Session | None = None
        self.conn: socket.socket | None = None
        self.forced_end: str | None = None  # why the VM's end no longer waits for gdb
        self.deadline: float | None = None
        self._end_done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def sw_breaks(self) -> dict:
        """The int3 breakpoints: linear address -> (physical, original byte)."""
        return self.breaks.sw_breaks

    # ---------------------------------------------------------------- life cycle
    def attach(self) -> None:
        """Hook into the machine and start serving; with wait, no guest code runs before gdb continues."""
        m = self.m
        m.debugger = self
        if m.config.timeout is not None:
            self.deadline = time.monotonic() + m.config.timeout
        if self.wait:
            m.pauser.hold()
            for v in m.vcpus:
                v.immediate_exit = 1
        if not self.host.int3:
            print("pykvm: gdb: this host's KVM cannot take int3 breakpoints; software breakpoints use the "
                  f"{hwdebug.SLOTS} hardware breakpoint slots instead", file=self.log)
        if not self.host.data_watch:
            print("pykvm: gdb: data breakpoints do not fire on this host's KVM; write watchpoints are checked "
                  "after every single-stepped instruction instead (slow); read/access watchpoints are unavailable",
                  file=self.log)
        self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening (after Machine.run returned)."""
        with self.stops.lock:
            if self.stops.ended is None:
                self.stops.ended = Outcome(errors.EXIT_VMM_ERROR, "vmm-error", "the VMM stopped")
        self.stops.wake()
        if self._thread is not None:
            self._thread.join(2)
        if self._thread is None or not self._thread.is_alive():
            self.stops.close()
        conn = self.conn
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        self.endpoint.close()

    def end(self, outcome: Outcome) -> None:
        """The VM is over (main thread, vCPUs stopped, before any core): tell gdb, and for a crash let it look.

        A crash waits for gdb to let go, until the run's --timeout; any other end waits only
        for gdb to be told. A gdb that does not read is cut off.
        """
        with self.stops.lock:
            self.stops.ended = outcome
            attached = self.conn is not None
        self.stops.wake()
        if not attached:
            return
        limit = END_GRACE
        if outcome.kind == "crash":
            limit = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        if self._end_done.wait(limit):
            return
        if outcome.kind == "crash":
            self.forced_end = (f"--timeout {self.m.config.timeout:g}s reached while gdb held the crashed VM; "
                               "ending the run")
            print(f"pykvm: gdb: {self.forced_end}", file=self.log)
            self.stops.wake()
            if self._end_done.wait(END_GRACE):
                return
        conn = self.conn
        if conn is not None:               # gdb does not read what it is told: cut it off
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._end_done.wait(END_GRACE)

    # ---------------------------------------------------------------- vCPU threads
    def debug_exit(self, vcpu) -> None:
        """KVM_EXIT_DEBUG on a vCPU thread: stop the VM for gdb, or keep going (a step that only checks watches)."""
        arch = vcpu.run_ptr.debug.arch
        dr6, exc = arch.dr6, arch.exception
        stop = None
        if exc == 1 and dr6 & hwdebug.DR6_BS:
            hit = self.breaks.soft_watch_hit() if self.breaks.soft_watches else None
            if hit is not None:
                stop = Stop(vcpu.index, SIGTRAP, "watch", hit)
            elif vcpu.index == self.stops.step_vcpu:
                stop = Stop(vcpu.index, SIGTRAP)
            else:
                return
        elif exc == 1 and dr6 & 0xF:
            slot = self.breaks.dregs.hit(dr6)
            if slot is None:
                return  # a slot gdb removed meanwhile
            stop = Stop(vcpu.index, SIGTRAP, "hwbreak") if slot.rw == hwdebug.RW_EXEC else \
                Stop(vcpu.index, SIGTRAP, "watch", slot.addr)
        elif exc == 3:
            regs = vcpu.get_regs()
            if regs.rip != arch.pc:     # report the breakpoint's own address, as gdb expects
                regs.rip = arch.pc
                vcpu.set_regs(regs)
            stop = Stop(vcpu.index, SIGTRAP, "swbreak")
        else:
            stop = Stop(vcpu.index, SIGTRAP)
        self.stops.record(stop)
        self.m.pauser.park(vcpu)

    # ---------------------------------------------------------------- the server thread
    def _serve(self) -> None:
        stops = self.stops
        try:
            while True:
                conn = self._accept()
                if conn is None:
                    return
                try:
                    self.session = Session(self)
                    self.session.serve(conn)
                except OSError:
                    pass  # the connection broke: same as a detach
                finally:
                    self._let_go()
                    with stops.lock:
                        self.conn = None
                    conn.close()
                    if stops.ended is not None:
                        self._end_done.set()
                        return
        except Exception as e:  # a stub bug must not hang the VM: report it, release every vCPU
            print(f"pykvm: gdb stub failed: {type(e).__name__}: {e}", file=self.log)
            self._let_go()
            self._end_done.set()

    def _accept(self) -> socket.socket | None:
        import select

        stops = self.stops
        listener = self.endpoint.sock
        while True:
            if stops.ended is not None:
                return None
            ready, _, _ = select.select([listener, stops.rfd], [], [])
            if stops.rfd in ready:
                stops.drain()
                continue
            conn = self.endpoint.accept()
            if conn is None:
                continue
            with stops.lock:
                if stops.ended is not None:
                    conn.close()
                    return None
                self.conn = conn
            return conn

    def _let_go(self) -> None:
        """gdb is gone: remove every breakpoint and let the guest run on (unless the VM is over)."""
        self.breaks.clear()
        self.stops.forget()
        if self.stops.ended is None:
            try:
                self.breaks.apply(None)
            except KvmError:
                pass
        self.m.pauser.resume()

    # ---------------------------------------------------------------- guest memory for gdb
    def _current(self) -> int:
        session = self.session
        return session.current() if session is not None else 0

    def physical(self, addr: int) -> int | None:
        """The guest-physical address of a linear address under gdb's vCPU, if RAM (for breakpoints)."""
        return self._physical(addr)

    def spans(self, addr: int, length: int) -> list[tuple[int, int]]:
        """(physical, length) pieces of a linear range (for breakpoints)."""
        return self._spans(addr, length)

    # ---- memory
    def _physical(self, addr: int) -> int | None:
        """The guest-physical address of a linear address under the selected vCPU's paging, if RAM."""
        v = self.m.vcpus[self._current()]
        s = v.get_sregs()
        phys = translate(self.m.memory, s.cr0, s.cr3, s.cr4, s.efer, addr)
        return phys if phys is not None and self.m.memory.is_ram(phys) else None

    def _spans(self, addr: int, length: int) -> list[tuple[int, int]]:
        """(physical, length) pieces of a linear range, page by page, up to the first unmapped page."""
        s = self.m.vcpus[self._current()].get_sregs()
        return virtual_spans(self.m.memory, s.cr0, s.cr3, s.cr4, s.efer, addr, length)

    def _read_memory(self, addr: int, length: int) -> bytes:
        data = b"".join(self.m.memory.read(p, n) for p, n in self._spans(addr, length))
        for bp, (_phys, orig) in self.sw_breaks.items():   # gdb must never see its own int3
            if addr <= bp < addr + len(data):
                data = data[:bp - addr] + orig + data[bp - addr + 1:]
        return data

    def _write_memory(self, addr: int, data: bytes) -> bytes:
        spans = self._spans(addr, len(data))
        if sum(n for _, n in spans) != len(data):
            return EFAULT
        pos = 0
        for p, n in spans:
            self.m.memory.write(p, data[pos:pos + n])
            pos += n
        return b"OK"


def start(machine, spec: str, wait: bool = False) -> GdbStub:
    """Listen on spec (before the sandbox), probe the host, attach to the machine; say where gdb connects."""
    endpoint = listen(spec)
    stub = GdbStub(machine, endpoint, wait=wait)
    print(f"pykvm: gdb: listening on {endpoint.where}" + (" (waiting for gdb before the guest starts)" if wait else ""),
          file=sys.stderr)
    stub.attach()
    return stub
