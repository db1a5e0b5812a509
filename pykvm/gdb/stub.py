"""A live gdb stub: gdb's remote serial protocol over TCP or a unix socket, all-stop, one thread per vCPU.

One server thread owns the connection. While the guest runs it waits on the socket (for ^C)
and on a wake pipe; vCPU threads that take a KVM_EXIT_DEBUG record a stop, start a pause
(Pauser.hold) and park, and the wake pipe makes the server pause the rest and report the stop.
While the guest is stopped the server answers gdb's requests: registers through KVM's
get/set ioctls, memory by guest virtual address through the page walk of the selected vCPU,
breakpoints and watchpoints in DR0-DR3 (KVM_SET_GUEST_DEBUG, applied to every vCPU at resume).

A guest that ends while gdb is attached ends the session with W (exit status) or X (signal);
a crash is first shown as a SIGSEGV stop at the faulting instruction, and its core is written
once gdb lets go (Machine.run calls end()). Every byte gdb sends goes through rsp.parse; a
request that cannot be carried out is answered with an error packet, never an exception.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from typing import NamedTuple

from .. import errors
from ..kvm import KvmError
from ..kvm import constants as C
from ..memory import GuestMemoryError
from ..memory.pagewalk import translate, virtual_spans
from . import hwdebug, registers, rsp
from ..machine.outcome import Outcome

SIGINT, SIGTRAP, SIGKILL, SIGSEGV, SIGALRM = 2, 5, 9, 11, 14
EINVAL, EFAULT, ENOSPC, EPERM = b"E16", b"E0e", b"E1c", b"E01"
MAX_SOFT_WATCH = 64            # bytes one watchpoint checked after single steps may cover


class Stop(NamedTuple):
    """Why the guest stopped: on which vCPU, the signal gdb sees, and the stop reason's extra field."""

    vcpu: int
    signal: int
    reason: str = ""            # "", "hwbreak", "swbreak" or "watch"
    addr: int = 0               # the watched address for "watch"


def parse_address(spec: str) -> tuple[int, object]:
    """'tcp::1234', 'tcp:HOST:1234', ':1234', '1234', 'unix:PATH' or a path -> (family, address)."""
    text = spec.strip()
    if text.startswith("unix:") or "/" in text:
        path = text[5:] if text.startswith("unix:") else text
        if not path:
            raise errors.UsageError(f"--gdb {spec!r}: unix: needs a socket path")
        return socket.AF_UNIX, path
    if text.startswith("tcp:"):
        text = text[4:]
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.UsageError(f"--gdb {spec!r}: expected tcp::PORT, tcp:HOST:PORT or unix:PATH")
    return socket.AF_INET, (host or "127.0.0.1", int(port))


def listen(spec: str) -> socket.socket:
    """A listening socket for --gdb (created before the sandbox, which allows only accepting)."""
    family, addr = parse_address(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            if os.path.exists(addr):
                os.unlink(addr)  # a stale socket from a dead pykvm
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise errors.UsageError(f"--gdb {spec}: {e.strerror or e}") from None
    return sock


class GdbStub:
    """Serves one gdb at a time for one Machine; attach() before Machine.run(), close() after."""

    def __init__(self, machine, listener: socket.socket, wait: bool = False, log=None):
        self.m = machine
        self.listener = listener
        self.wait = wait
        self.log = log if log is not None else sys.stderr
        self.host = hwdebug.probe(machine.kvm)
        self.dregs = hwdebug.DebugRegs()
        self.sw_breaks: dict[int, tuple[int, bytes]] = {}    # linear address -> (physical, original byte)
        self.soft_watches: dict[tuple[int, int], list] = {}  # (addr, len) -> [[(phys, n), ...], last bytes]
        self.notes: list[str] = []        # for gdb's console: sent as O packets at the next resume
        self._lock = threading.Lock()
        self._stop: Stop | None = None    # recorded by a vCPU thread, not yet reported
        self._last: Stop | None = None    # the stop gdb is looking at
        self._ended: Outcome | None = None
        self._end_done = threading.Event()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        self._thread: threading.Thread | None = None
        self.conn: socket.socket | None = None
        self.step_vcpu: int | None = None
        self.g_thread = self.c_thread = 0
        self.running = False
        self._no_ack = False
        self._gdb_features: set[str] = set()
        self._said_fallback = False
        self.path = listener.getsockname() if listener.family == socket.AF_UNIX else None

    # ---------------------------------------------------------------- life cycle
    def attach(self) -> None:
        """Hook into the machine and start serving; with wait, no guest code runs before gdb continues."""
        m = self.m
        m.debugger = self
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
        with self._lock:
            if self._ended is None:
                self._ended = Outcome(errors.EXIT_VMM_ERROR, "vmm-error", "the VMM stopped")
        self._wake()
        if self._thread is not None:
            self._thread.join(2)
        for s in (self.conn, self.listener):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        if self.path:
            from .. import sandbox

            if not sandbox.active():  # a sandboxed VMM cannot remove paths: the next run replaces it
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    def end(self, outcome: Outcome) -> None:
        """The VM is over (main thread, vCPUs stopped, before any core): tell gdb, and for a crash let it look."""
        with self._lock:
            self._ended = outcome
            attached = self.conn is not None
        self._wake()
        if attached:
            self._end_done.wait()

    def _wake(self) -> None:
        try:
            os.write(self._wfd, b"!")
        except BlockingIOError:
            pass  # the pipe is full: the server is already due to wake

    # ---------------------------------------------------------------- vCPU threads
    def debug_exit(self, vcpu) -> None:
        """KVM_EXIT_DEBUG on a vCPU thread: stop the VM for gdb, or keep going (a step that only checks watches)."""
        arch = vcpu.run_ptr.debug.arch
        dr6, exc = arch.dr6, arch.exception
        stop = None
        if exc == 1 and dr6 & hwdebug.DR6_BS:
            hit = self._soft_watch_hit() if self.soft_watches else None
            if hit is not None:
                stop = Stop(vcpu.index, SIGTRAP, "watch", hit)
            elif vcpu.index == self.step_vcpu:
                stop = Stop(vcpu.index, SIGTRAP)
            else:
                return
        elif exc == 1 and dr6 & 0xF:
            slot = self.dregs.hit(dr6)
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
        with self._lock:
            if self._stop is None:
                self._stop = stop
        self.m.pauser.hold()
        self._wake()
        self.m.pauser.park(vcpu)

    def _soft_watch_hit(self) -> int | None:
        """The first software-checked watchpoint whose bytes changed since the last check, or None."""
        mem = self.m.memory
        for (addr, _n), entry in self.soft_watches.items():
            try:
                now = b"".join(mem.read(p, n) for p, n in entry[0])
            except GuestMemoryError:
                continue
            if now != entry[1]:
                entry[1] = now
                return addr
        return None

    # ---------------------------------------------------------------- the server thread
    def _serve(self) -> None:
        try:
            while True:
                conn = self._accept()
                if conn is None:
                    return
                try:
                    self._session(conn)
                except OSError:
                    pass  # the connection broke: same as a detach
                finally:
                    self._let_go()
                    with self._lock:
                        self.conn = None
                    conn.close()
                    if self._ended is not None:
                        self._end_done.set()
                        return
        except Exception as e:  # a stub bug must not hang the VM: report it, release every vCPU
            print(f"pykvm: gdb stub failed: {type(e).__name__}: {e}", file=self.log)
            self._let_go()
            self._end_done.set()

    def _accept(self) -> socket.socket | None:
        while True:
            if self._ended is not None:
                return None
            ready, _, _ = select.select([self.listener, self._rfd], [], [])
            if self._rfd in ready:
                os.read(self._rfd, 4096)
                continue
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with self._lock:
                if self._ended is not None:
                    conn.close()
                    return None
                self.conn = conn
            return conn

    def _session(self, conn: socket.socket) -> None:
        framer = rsp.Framer()
        self._no_ack = False
        self._gdb_features = set()
        self.g_thread = self.c_thread = 0
        self._halt(Stop(0, SIGTRAP))
        self._last = self._take_stop() or self._last
        while True:
            ready, _, _ = select.select([conn, self._rfd], [], [])
            if self._rfd in ready:
                os.read(self._rfd, 4096)
                if self.running and self._check_running(conn):
                    return
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    return
                for kind, value in framer.feed(data):
                    if kind == "interrupt" and self.running:
                        self._halt(Stop(self._current(), SIGINT))
                        self._report(conn)
                    elif kind == "bad":
                        conn.sendall(b"-")
                    elif kind == "packet" and not self.running:
                        if self._packet(conn, value):
                            return
                    # acks, and packets while running (gdb sends none), are ignored

    def _check_running(self, conn) -> bool:
        """Woken while the guest runs: report a stop or the end; True when the session is over."""
        if self._ended is not None:
            return self._report_end(conn)
        with self._lock:
            pending = self._stop is not None
        if pending:
            self._halt(None)
            self._report(conn)
        return False

    def _packet(self, conn, body: bytes) -> bool:
        """Answer one packet; True when the session is over."""
        out = b"" if self._no_ack else b"+"
        try:
            req = rsp.parse(body)
        except rsp.PacketError:
            conn.sendall(out + rsp.frame(EINVAL))
            return False
        if req.kind in ("continue", "step"):
            if out:
                conn.sendall(out)
            try:
                return self._resume(conn, req.kind == "step", req.args[0])
            except (KvmError, GuestMemoryError, ValueError):
                self.running = False
                conn.sendall(rsp.frame(EFAULT))
                return False
        if req.kind == "kill":
            if out:
                conn.sendall(out)
            self.m.finish(Outcome(130, "interrupted", "stopped by gdb (kill)"))
            return True
        if req.kind == "detach":
            conn.sendall(out + rsp.frame(b"OK"))
            return True
        try:
            reply = self._answer(req)
        except (KvmError, GuestMemoryError, ValueError, OverflowError):
            reply = EFAULT
        conn.sendall(out + rsp.frame(reply))
        if req.kind == "no_ack":
            self._no_ack = True
        return False

    # ---------------------------------------------------------------- stopping and resuming
    def _halt(self, stop: Stop | None) -> None:
        """Pause every vCPU; stop is what to report when no vCPU recorded a reason of its own."""
        m = self.m
        while not m.pause():
            if m.stopping:
                break
        with self._lock:
            if self._stop is None and stop is not None:
                self._stop = stop
        self.running = False

    def _take_stop(self) -> Stop | None:
        with self._lock:
            stop, self._stop = self._stop, None
        return stop

    def _report(self, conn) -> None:
        """Send the recorded stop as gdb's stop reply."""
        stop = self._take_stop() or self._last or Stop(0, SIGTRAP)
        self._last = stop
        self.g_thread = stop.vcpu + 1
        conn.sendall(rsp.frame(self._stop_reply(stop)))

    def _stop_reply(self, stop: Stop) -> bytes:
        text = f"T{stop.signal:02x}thread:{stop.vcpu + 1:x};"
        if stop.reason == "watch":
            text += f"watch:{stop.addr:x};"
        elif stop.reason in self._gdb_features:
            text += f"{stop.reason}:;"
        return text.encode()

    def _report_end(self, conn) -> bool:
        """The VM ended while gdb had it running: a crash becomes a SIGSEGV stop, anything else W/X."""
        out = self._ended
        if out.kind == "crash" and (self._last is None or self._last.signal != SIGSEGV):
            self.running = False
            self._last = Stop(out.vcpu or 0, SIGSEGV)
            self.g_thread = self._last.vcpu + 1
            conn.sendall(rsp.frame(self._stop_reply(self._last)))
            return False
        conn.sendall(rsp.frame(self._exit_packet(out)))
        return True

    @staticmethod
    def _exit_packet(out: Outcome) -> bytes:
        if out.kind in ("exit", "poweroff", "reset"):
            return b"W%02x" % (out.status & 0xFF)
        signal = {"crash": SIGSEGV, "timeout": SIGALRM}.get(out.kind, SIGKILL)
        return b"X%02x" % signal

    def _resume(self, conn, step: bool, addr: int | None) -> bool:
        """c/s: send queued console notes, apply breakpoints, let the vCPUs run; True when the session is over."""
        for note in self.notes:
            conn.sendall(rsp.frame(b"O" + (note + "\n").encode().hex().encode()))
        self.notes.clear()
        if self._ended is not None:
            return self._report_end(conn)
        with self._lock:
            pending = self._stop is not None
        if pending:                       # another vCPU stopped meanwhile: report it without running
            self._report(conn)
            return False
        m = self.m
        target = self._vcpu_index(self.c_thread) if self.c_thread > 0 else self._current()
        if addr is not None:
            v = m.vcpus[target]
            regs = v.get_regs()
            regs.rip = addr
            v.set_regs(regs)
        self.step_vcpu = target if step else None
        self._snapshot_watches()
        self._apply_debug()
        self.running = True
        held = frozenset(i for i in range(len(m.vcpus)) if i != target) if step else frozenset()
        m.pauser.resume(held)
        return False

    def _apply_debug(self) -> None:
        base = 0
        if self.dregs.any():
            base |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_HW_BP
        if self.sw_breaks:
            base |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_USE_SW_BP
        if self.soft_watches:
            base |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP
        dr = self.dregs.values() if base & C.KVM_GUESTDBG_USE_HW_BP else None
        for v in self.m.vcpus:
            control = base
            if v.index == self.step_vcpu:
                control |= C.KVM_GUESTDBG_ENABLE | C.KVM_GUESTDBG_SINGLESTEP
                if self.host.blockirq and not self.soft_watches:
                    control |= C.KVM_GUESTDBG_BLOCKIRQ
            v.set_guest_debug(control, dr)

    def _let_go(self) -> None:
        """gdb is gone: remove every breakpoint and let the guest run on (unless the VM is over)."""
        for addr in list(self.sw_breaks):
            self._remove_sw(addr)
        self.dregs.clear()
        self.soft_watches.clear()
        self.step_vcpu = None
        with self._lock:
            self._stop = None
        self._last = None
        if self._ended is None:
            try:
                self._apply_debug()
            except KvmError:
                pass
        self.running = False
        self.m.pauser.resume()

    def _snapshot_watches(self) -> None:
        mem = self.m.memory
        for entry in self.soft_watches.values():
            entry[1] = b"".join(mem.read(p, n) for p, n in entry[0])

    # ---------------------------------------------------------------- requests while stopped
    def _current(self) -> int:
        if self.g_thread > 0:
            return self._vcpu_index(self.g_thread)
        return self._last.vcpu if self._last else 0

    def _vcpu_index(self, tid: int) -> int:
        n = len(self.m.vcpus)
        if tid <= 0:
            return self._last.vcpu if self._last else 0
        if tid > n:
            raise ValueError(f"no thread {tid}")
        return tid - 1

    def _answer(self, req: rsp.Request) -> bytes:
        k, a = req.kind, req.args
        n = len(self.m.vcpus)
        if k == "supported":
            self._gdb_features = {f[:-1] for f in a[0].split(";") if f.endswith("+")}
            return (f"PacketSize={rsp.MAX_PACKET:x};qXfer:features:read+;QStartNoAckMode+;"
                    "swbreak+;hwbreak+").encode()
        if k == "no_ack":
            return b"OK"
        if k == "stop_reason":
            return self._stop_reply(self._last or Stop(0, SIGTRAP))
        if k == "xfer_features":
            annex, off, length = a
            if annex != "target.xml":
                return b"E00"
            chunk = registers.TARGET_XML[off:off + length]
            return (b"m" if off + length < len(registers.TARGET_XML) else b"l") + chunk
        if k == "threads_first":
            return b"m" + ",".join(f"{i + 1:x}" for i in range(n)).encode()
        if k == "threads_next":
            return b"l"
        if k == "current_thread":
            return f"QC{self._current() + 1:x}".encode()
        if k == "attached":
            return b"1"
        if k == "symbol":
            return b"OK"
        if k == "thread_extra":
            idx = self._vcpu_index(a[0])
            return f"vCPU {idx}".encode().hex().encode()
        if k == "thread_alive":
            return b"OK" if 0 < a[0] <= n else EFAULT
        if k == "set_thread":
            op, tid = a
            if tid > n:
                return EFAULT
            if op == "g":
                self.g_thread = tid
            else:
                self.c_thread = tid
            return b"OK"
        if k == "read_registers":
            return b"".join(self._registers(self._current())).hex().encode()
        if k == "read_register":
            if a[0] >= len(registers.REGS):
                return EFAULT
            return self._registers(self._current())[a[0]].hex().encode()
        if k == "write_registers":
            return self._write_registers(a[0])
        if k == "write_register":
            return self._write_register(a[0], a[1])
        if k == "read_memory":
            data = self._read_memory(a[0], a[1])
            return data.hex().encode() if data or not a[1] else EFAULT
        if k == "write_memory":
            return self._write_memory(a[0], a[1])
        if k == "insert_breakpoint":
            return self._insert(*a)
        if k == "remove_breakpoint":
            return self._remove(*a)
        return b""

    # ---- registers
    @staticmethod
    def _state(v):
        """(regs, sregs, fpu or None) of a stopped vCPU; some hosts cannot read the FPU."""
        try:
            fpu = v.get_fpu()
        except KvmError:
            fpu = None
        return v.get_regs(), v.get_sregs(), fpu

    def _registers(self, index: int) -> list[bytes]:
        v = self.m.vcpus[index]
        values = registers.read_values(*self._state(v))
        out = self._ended
        frame = out.details.get("frame") if out is not None and out.kind == "crash" else None
        if frame is not None and (out.vcpu or 0) == index:
            # a crash caught by the firmware stubs: show the faulting instruction, not the stub
            for name in registers.GPRS + ("rip",):
                values[registers.INDEX[name]] = (frame[name] & rsp.U64).to_bytes(8, "little")
            values[registers.INDEX["eflags"]] = (frame["rflags"] & 0xFFFFFFFF).to_bytes(4, "little")
            for name in ("cs", "ss"):
                values[registers.INDEX[name]] = (frame[name] & 0xFFFF).to_bytes(4, "little")
        return values

    def _write_registers(self, raw: bytes) -> bytes:
        if self._ended is not None:
            return EPERM
        if len(raw) != registers.G_SIZE:
            return EINVAL
        v = self.m.vcpus[self._current()]
        regs, sregs, fpu = self._state(v)
        changed = set()
        pos = 0
        current = b"".join(registers.read_values(regs, sregs, fpu))
        for i, size in enumerate(registers.REG_SIZES):
            part = raw[pos:pos + size]
            if part != current[pos:pos + size]:
                changed.add(registers.write_value(i, part, regs, sregs, fpu))
            pos += size
        self._store(v, changed, regs, sregs, fpu)
        return b"OK"

    def _write_register(self, index: int, raw: bytes) -> bytes:
        if self._ended is not None:
            return EPERM
        if index >= len(registers.REGS) or len(raw) != registers.REG_SIZES[index]:
            return EINVAL
        v = self.m.vcpus[self._current()]
        regs, sregs, fpu = self._state(v)
        self._store(v, {registers.write_value(index, raw, regs, sregs, fpu)}, regs, sregs, fpu)
        return b"OK"

    @staticmethod
    def _store(v, changed, regs, sregs, fpu) -> None:
        if "regs" in changed:
            v.set_regs(regs)
        if "sregs" in changed:
            v.set_sregs(sregs)
        if "fpu" in changed and fpu is not None:
            v.set_fpu(fpu)

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

    # ---- breakpoints and watchpoints
    def _insert(self, ztype: int, addr: int, kind: int) -> bytes:
        if ztype == 0 and self.host.int3:
            return self._insert_sw(addr)
        if ztype in (0, 1):
            if ztype == 0 and not self._said_fallback:
                self._said_fallback = True
                self._note("pykvm: this host's KVM cannot take int3; breakpoints use the 4 hardware debug "
                           "registers instead", stderr=False)   # stderr heard it at start-up
            if self.dregs.add(hwdebug.Slot(addr, hwdebug.RW_EXEC, 1, 1)):
                return b"OK"
            self._note(f"pykvm: no free hardware debug register for the breakpoint at {addr:#x} (4 in use)")
            return ENOSPC
        if ztype == 2 and not self.host.data_watch:
            return self._insert_soft_watch(addr, kind)
        if not self.host.data_watch:
            return b""                     # read/access watchpoints need working data breakpoints
        if not hwdebug.watch_ok(addr, kind):
            return EINVAL
        rw = hwdebug.RW_WRITE if ztype == 2 else hwdebug.RW_ACCESS
        return b"OK" if self.dregs.add(hwdebug.Slot(addr, rw, kind, ztype)) else ENOSPC

    def _remove(self, ztype: int, addr: int, kind: int) -> bytes:
        if ztype == 0 and self.host.int3:
            return b"OK" if self._remove_sw(addr) else EINVAL
        if ztype in (0, 1):
            return b"OK" if self.dregs.remove(hwdebug.Slot(addr, hwdebug.RW_EXEC, 1, 1)) else EINVAL
        if ztype == 2 and not self.host.data_watch:
            return b"OK" if self.soft_watches.pop((addr, kind), None) is not None else EINVAL
        rw = hwdebug.RW_WRITE if ztype == 2 else hwdebug.RW_ACCESS
        return b"OK" if self.dregs.remove(hwdebug.Slot(addr, rw, kind, ztype)) else EINVAL

    def _insert_sw(self, addr: int) -> bytes:
        if addr in self.sw_breaks:
            return b"OK"
        phys = self._physical(addr)
        if phys is None:
            return EFAULT
        self.sw_breaks[addr] = (phys, self.m.memory.read(phys, 1))
        self.m.memory.write(phys, b"\xcc")
        return b"OK"

    def _remove_sw(self, addr: int) -> bool:
        entry = self.sw_breaks.pop(addr, None)
        if entry is None:
            return False
        self.m.memory.write(entry[0], entry[1])
        return True

    def _insert_soft_watch(self, addr: int, length: int) -> bytes:
        if not 0 < length <= MAX_SOFT_WATCH:
            return EINVAL
        spans = self._spans(addr, length)
        if sum(n for _, n in spans) != length:
            return EFAULT
        if not self.soft_watches:
            self._note("pykvm: data breakpoints do not fire on this host's KVM; the watchpoint is checked after "
                       "every single-stepped instruction instead (slow)", stderr=False)
        self.soft_watches[(addr, length)] = [spans, b""]
        return b"OK"

    def _note(self, text: str, stderr: bool = True) -> None:
        """Say something on gdb's console (at the next resume, when O packets are allowed) and on stderr."""
        self.notes.append(text)
        if stderr:
            print(text, file=self.log)


def start(machine, spec: str, wait: bool = False) -> GdbStub:
    """Listen on spec (before the sandbox), probe the host, attach to the machine; say where gdb connects."""
    sock = listen(spec)
    stub = GdbStub(machine, sock, wait=wait)
    name = sock.getsockname()
    where = name if isinstance(name, str) else f"{name[0]}:{name[1]}"
    print(f"pykvm: gdb: listening on {where}" + (" (waiting for gdb before the guest starts)" if wait else ""),
          file=sys.stderr)
    stub.attach()
    return stub


