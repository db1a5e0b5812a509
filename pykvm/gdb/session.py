"""One gdb connection: packets in, replies and stop replies out, dispatched through one table.

While the guest runs the session waits on the socket (for ^C) and on the stops' wake pipe;
while it is stopped it answers requests. Every request kind has one handler (HANDLERS); a
request that cannot be carried out is answered with an error packet, never an exception.
When the VM ends while gdb holds it stopped (a timeout, Ctrl-C, a host request), gdb is told
why in a console packet and gets the exit packet; only a crash waits for gdb to look at it.
"""

from __future__ import annotations

import select

from ..kvm import KvmError
from ..machine.outcome import Outcome
from ..memory import GuestMemoryError
from . import registers, rsp
from .rsp import EFAULT, EINVAL
from .stops import SIGINT, SIGSEGV, SIGTRAP, Stop, exit_packet, stop_reply


def console(text: str) -> bytes:
    """An O packet: a line on gdb's console."""
    return rsp.frame(b"O" + (text + "\n").encode().hex().encode())


class Session:
    """The state of one connection (threads gdb selected, acks, features) and its packet handlers."""

    def __init__(self, stub):
        self.stub = stub
        self.stops = stub.stops
        self.m = stub.m
        self.no_ack = False
        self.features: set[str] = set()
        self.g_thread = self.c_thread = 0

    # ---------------------------------------------------------------- the loop
    def serve(self, conn) -> None:
        """Answer gdb until it detaches, kills, leaves, or the VM ends."""
        framer = rsp.Framer()
        stops = self.stops
        stops.halt(Stop(0, SIGTRAP))
        stops.last = stops.take() or stops.last
        while True:
            ready, _, _ = select.select([conn, stops.rfd], [], [])
            if stops.rfd in ready:
                stops.drain()
                if self._woken(conn):
                    return
            if conn in ready:
                data = conn.recv(65536)
                if not data:
                    return
                for kind, value in framer.feed(data):
                    if kind == "interrupt" and stops.running:
                        stops.halt(Stop(self.current(), SIGINT))
                        self._report(conn)
                    elif kind == "bad":
                        conn.sendall(b"-")
                    elif kind == "packet" and not stops.running:
                        if self.packet(conn, value):
                            return
                    # acks, and packets while running (gdb sends none), are ignored

    def _woken(self, conn) -> bool:
        """A stop or the end happened; True when the session is over."""
        stops = self.stops
        ended = stops.ended
        if ended is not None:
            if stops.running:
                return self._report_end(conn)
            if ended.kind != "crash" or self.stub.forced_end:
                self._say_end(conn, ended)
                return True
            return False               # a crash gdb is looking at: it sees it at its next resume
        if stops.running and stops.has_pending():
            stops.halt(None)
            self._report(conn)
        return False

    def _say_end(self, conn, out: Outcome) -> None:
        """Tell gdb, while it holds the VM stopped, that the VM is over and why."""
        why = self.stub.forced_end or out.reason
        conn.sendall(console(f"pykvm: the VM is over: {why}") + rsp.frame(exit_packet(out)))

    def packet(self, conn, body: bytes) -> bool:
        """Answer one packet; True when the session is over."""
        out = b"" if self.no_ack else b"+"
        try:
            req = rsp.parse(body)
        except rsp.PacketError:
            conn.sendall(out + rsp.frame(EINVAL))
            return False
        control = CONTROL.get(req.kind)
        if control is not None:
            return control(self, conn, out, req)
        handler = HANDLERS.get(req.kind)
        try:
            reply = handler(self, *req.args) if handler is not None else b""
        except (KvmError, GuestMemoryError, ValueError, OverflowError):
            reply = EFAULT
        conn.sendall(out + rsp.frame(reply))
        if req.kind == "no_ack":
            self.no_ack = True
        return False

    # ---------------------------------------------------------------- packets that change who runs
    def _continue(self, conn, out: bytes, req) -> bool:
        if out:
            conn.sendall(out)
        try:
            return self._resume(conn, req.kind == "step", req.args[0])
        except (KvmError, GuestMemoryError, ValueError):
            self.stops.running = False
            conn.sendall(rsp.frame(EFAULT))
            return False

    def _kill(self, conn, out: bytes, req) -> bool:
        if out:
            conn.sendall(out)
        self.m.finish(Outcome(130, "interrupted", "stopped by gdb (kill)"))
        return True

    def _detach(self, conn, out: bytes, req) -> bool:
        conn.sendall(out + rsp.frame(b"OK"))
        return True

    def _resume(self, conn, step: bool, addr: int | None) -> bool:
        """c/s: send queued console notes, apply breakpoints, let the vCPUs run; True when the session is over."""
        breaks, stops = self.stub.breaks, self.stops
        while breaks.notes:
            conn.sendall(console(breaks.notes.popleft()))
        if stops.ended is not None:
            return self._report_end(conn)
        if stops.has_pending():           # another vCPU stopped meanwhile: report it without running
            self._report(conn)
            return False
        m = self.m
        target = self._vcpu_index(self.c_thread) if self.c_thread > 0 else self.current()
        if addr is not None:
            v = m.vcpus[target]
            regs = v.get_regs()
            regs.rip = addr
            v.set_regs(regs)
        stops.step_vcpu = target if step else None
        breaks.snapshot_watches()
        breaks.apply(stops.step_vcpu)
        stops.running = True
        held = frozenset(i for i in range(len(m.vcpus)) if i != target) if step else frozenset()
        m.pauser.resume(held)
        return False

    # ---------------------------------------------------------------- stop replies
    def _report(self, conn) -> None:
        """Send the recorded stop as gdb's stop reply."""
        stops = self.stops
        stop = stops.take() or stops.last or Stop(0, SIGTRAP)
        stops.last = stop
        self.g_thread = stop.vcpu + 1
        conn.sendall(rsp.frame(stop_reply(stop, self.features)))

    def _report_end(self, conn) -> bool:
        """The VM ended while gdb had it running: a crash becomes a SIGSEGV stop, anything else W/X."""
        stops = self.stops
        out = stops.ended
        if out.kind == "crash" and not self.stub.forced_end and (stops.last is None or stops.last.signal != SIGSEGV):
            stops.running = False
            stops.last = Stop(out.vcpu or 0, SIGSEGV)
            self.g_thread = stops.last.vcpu + 1
            conn.sendall(rsp.frame(stop_reply(stops.last, self.features)))
            return False
        if out.kind not in ("exit", "poweroff", "reset"):
            conn.sendall(console(f"pykvm: {self.stub.forced_end or out.reason}"))
        conn.sendall(rsp.frame(exit_packet(out)))
        return True

    # ---------------------------------------------------------------- threads
    def current(self) -> int:
        """The vCPU gdb's register and memory requests are about."""
        if self.g_thread > 0:
            return self._vcpu_index(self.g_thread)
        last = self.stops.last
        return last.vcpu if last else 0

    def _vcpu_index(self, tid: int) -> int:
        n = len(self.m.vcpus)
        if tid <= 0:
            last = self.stops.last
            return last.vcpu if last else 0
        if tid > n:
            raise ValueError(f"no thread {tid}")
        return tid - 1

    # ---------------------------------------------------------------- requests while stopped
    def _supported(self, theirs: str) -> bytes:
        self.features = {f[:-1] for f in theirs.split(";") if f.endswith("+")}
        return (f"PacketSize={rsp.MAX_PACKET:x};qXfer:features:read+;QStartNoAckMode+;"
                "swbreak+;hwbreak+").encode()

    def _stop_reason(self) -> bytes:
        return stop_reply(self.stops.last or Stop(0, SIGTRAP), self.features)

    @staticmethod
    def _xfer_features(annex: str, off: int, length: int) -> bytes:
        if annex != "target.xml":
            return b"E00"
        chunk = registers.TARGET_XML[off:off + length]
        return (b"m" if off + length < len(registers.TARGET_XML) else b"l") + chunk

    def _threads_first(self) -> bytes:
        return b"m" + ",".join(f"{i + 1:x}" for i in range(len(self.m.vcpus))).encode()

    def _thread_extra(self, tid: int) -> bytes:
        return f"vCPU {self._vcpu_index(tid)}".encode().hex().encode()

    def _thread_alive(self, tid: int) -> bytes:
        return b"OK" if 0 < tid <= len(self.m.vcpus) else EFAULT

    def _set_thread(self, op: str, tid: int) -> bytes:
        if tid > len(self.m.vcpus):
            return EFAULT
        if op == "g":
            self.g_thread = tid
        else:
            self.c_thread = tid
        return b"OK"

    def _read_registers(self) -> bytes:
        return b"".join(self.stub.regs.read(self.current())).hex().encode()

    def _read_memory(self, addr: int, length: int) -> bytes:
        data = self.stub._read_memory(addr, length)
        return data.hex().encode() if data or not length else EFAULT


# request kind -> handler(session, *args) returning the reply body
HANDLERS = {
    "supported": Session._supported,
    "no_ack": lambda s: b"OK",
    "stop_reason": Session._stop_reason,
    "xfer_features": lambda s, *a: Session._xfer_features(*a),
    "threads_first": Session._threads_first,
    "threads_next": lambda s: b"l",
    "current_thread": lambda s: f"QC{s.current() + 1:x}".encode(),
    "attached": lambda s: b"1",
    "symbol": lambda s: b"OK",
    "thread_extra": Session._thread_extra,
    "thread_alive": Session._thread_alive,
    "set_thread": Session._set_thread,
    "read_registers": Session._read_registers,
    "read_register": lambda s, reg: s.stub.regs.read_one(s.current(), reg),
    "write_registers": lambda s, raw: s.stub.regs.write_all(s.current(), raw),
    "write_register": lambda s, reg, raw: s.stub.regs.write_one(s.current(), reg, raw),
    "read_memory": Session._read_memory,
    "write_memory": lambda s, addr, data: s.stub._write_memory(addr, data),
    "insert_breakpoint": lambda s, *a: s.stub.breaks.insert(*a),
    "remove_breakpoint": lambda s, *a: s.stub.breaks.remove(*a),
}
# request kind -> handler(session, conn, ack, request) for packets that resume or end the session
CONTROL = {
    "continue": Session._continue,
    "step": Session._continue,
    "kill": Session._kill,
    "detach": Session._detach,
}
