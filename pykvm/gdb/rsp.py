"""gdb's remote serial protocol: packet framing, and every request parsed and validated in one place.

Everything here is pure (no sockets, no KVM) so the fuzz tests can reach all of it. Input comes
from whoever connects to the gdb port and is untrusted: the framer bounds every packet, and
parse() turns a packet body into a Request whose numbers are range-checked, or raises
PacketError (the stub answers "E16"). Requests it does not know become "unsupported" (the stub
answers with an empty packet, which gdb reads as "not supported").
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_PACKET = 0x4000          # the PacketSize we advertise: bodies longer than this are refused
MAX_MEMORY_READ = (MAX_PACKET - 32) // 2   # bytes one 'm' reply can carry as hex
MAX_REGISTER = 64            # bytes one register value may have (xmm is 16, st 10)
U64 = (1 << 64) - 1
INTERRUPT = 0x03             # gdb sends a bare ^C byte to stop a running target
# error replies (gdb shows the errno): malformed, bad address, no room, not permitted
EINVAL, EFAULT, ENOSPC, EPERM = b"E16", b"E0e", b"E1c", b"E01"

_HEX = re.compile(rb"[0-9a-fA-F]+\Z")


class PacketError(ValueError):
    """A packet whose shape or numbers are invalid."""


class Request(NamedTuple):
    """One parsed request: kind names what gdb asked for, args are its validated operands."""

    kind: str
    args: tuple = ()


# ---------------------------------------------------------------- framing
def checksum(body: bytes) -> int:
    """The modulo-256 sum gdb puts after '#'."""
    return sum(body) & 0xFF


def escape(payload: bytes) -> bytes:
    """Escape the bytes that would end or confuse a packet ($ # } and '*', gdb's run-length marker)."""
    if not any(b in payload for b in b"$#}*"):
        return payload
    out = bytearray()
    for b in payload:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo escape() (binary data of an X packet); a trailing lone '}' is malformed."""
    if b"}" not in data:
        return data
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise PacketError("escape character at the end of binary data")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """A complete packet '$payload#cs' with the payload escaped."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


class Framer:
    """Splits the byte stream from gdb into events.

    feed() returns a list of ("packet", body), ("bad", why) (checksum mismatch, overlong or
    truncated packet: answer '-'), ("interrupt", None) and ("ack", b"+"/b"-") events.
    """

    def __init__(self, max_packet: int = MAX_PACKET):
        self.max_packet = max_packet
        self._body = bytearray()
        self._state = "idle"        # idle | body | sum1 | sum2 | skip (an overlong packet, dropped)
        self._sum = b""

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        """Consume bytes; return the events they complete."""
        events: list[tuple[str, object]] = []
        for b in data:
            st = self._state
            if st == "idle":
                if b == 0x24:           # '$'
                    self._state, self._body = "body", bytearray()
                elif b == INTERRUPT:
                    events.append(("interrupt", None))
                elif b in (0x2B, 0x2D):  # '+' '-'
                    events.append(("ack", bytes((b,))))
                # anything else between packets is noise: ignored, as gdb's own stubs do
            elif st in ("body", "skip"):
                if b == 0x23:           # '#'
                    self._state, self._sum = ("sum1" if st == "body" else "skipsum1"), b""
                elif b == 0x24:         # a new packet started inside this one: drop the partial one
                    events.append(("bad", "packet restarted before its end"))
                    self._state, self._body = "body", bytearray()
                elif st == "body":
                    if len(self._body) >= self.max_packet:
                        self._state, self._body = "skip", bytearray()
                    else:
                        self._body.append(b)
            elif st in ("sum1", "skipsum1"):
                self._sum = bytes((b,))
                self._state = "sum2" if st == "sum1" else "skipsum2"
            elif st == "skipsum2":
                self._state = "idle"
                events.append(("bad", f"packet longer than {self.max_packet} bytes"))
            else:  # sum2
                self._state = "idle"
                digits = self._sum + bytes((b,))
                body = bytes(self._body)
                self._body = bytearray()
                if not _HEX.match(digits) or int(digits, 16) != checksum(body):
                    events.append(("bad", "checksum mismatch"))
                else:
                    events.append(("packet", body))
        return events


# ---------------------------------------------------------------- parsing
def _hex_int(text: bytes, what: str, limit: int = U64) -> int:
    if not _HEX.match(text) or len(text) > 16:
        raise PacketError(f"{what}: expected a hex number")
    value = int(text, 16)
    if value > limit:
        raise PacketError(f"{what}: {value:#x} out of range")
    return value


def _hex_bytes(text: bytes, what: str, limit: int) -> bytes:
    if len(text) % 2 or len(text) // 2 > limit or (text and not _HEX.match(text)):
        raise PacketError(f"{what}: expected at most {limit} bytes of hex")
    return bytes.fromhex(text.decode())


def _thread_id(text: bytes) -> int:
    """A thread id: -1 (all), 0 (any) or a positive hex number."""
    if text == b"-1":
        return -1
    return _hex_int(text, "thread id", 0x7FFFFFFF)


def _addr_len(text: bytes, what: str) -> tuple[int, int]:
    addr, sep, length = text.partition(b",")
    if not sep:
        raise PacketError(f"{what}: expected ADDR,LENGTH")
    a = _hex_int(addr, f"{what} address")
    n = _hex_int(length, f"{what} length", MAX_PACKET)
    if a + n - 1 > U64:
        raise PacketError(f"{what}: range wraps past the top of the address space")
    return a, n


def _resume(kind: str, rest: bytes, with_signal: bool) -> Request:
    """c/s [ADDR] and C/S SIG[;ADDR] (the signal is dropped: a VM has no signal to deliver)."""
    if with_signal:
        sig, _, rest = rest.partition(b";")
        _hex_int(sig, "signal", 0xFF)
    return Request(kind, (_hex_int(rest, "resume address") if rest else None,))


def _xfer_features(body: bytes) -> Request:
    annex, sep, span = body[len(b"qXfer:features:read:"):].rpartition(b":")
    if not sep:
        raise PacketError("qXfer: expected ANNEX:OFFSET,LENGTH")
    off, n = _addr_len(span, "qXfer")
    return Request("xfer_features", (annex.decode("ascii", "replace"), off, n))


# q packets with operands, by prefix; the rest by name (the part before any ':')
_QUERY_PREFIXES = (
    (b"qXfer:features:read:", _xfer_features),
    (b"qThreadExtraInfo,", lambda body: Request("thread_extra", (_thread_id(body[len(b"qThreadExtraInfo,"):]),))),
)
_QUERY_NAMES = {b"qC": "current_thread", b"qfThreadInfo": "threads_first", b"qsThreadInfo": "threads_next",
                b"qAttached": "attached", b"qSymbol": "symbol", b"qOffsets": "unsupported"}


def _query(body: bytes) -> Request:
    for prefix, parse_one in _QUERY_PREFIXES:
        if body.startswith(prefix):
            return parse_one(body)
    name, _, rest = body.partition(b":")
    if name == b"qSupported":
        return Request("supported", (rest.decode("ascii", "replace"),))
    return Request(_QUERY_NAMES.get(name, "unsupported"), ())


def _write_register(rest: bytes) -> Request:
    reg, sep, value = rest.partition(b"=")
    if not sep:
        raise PacketError("P: expected N=VALUE")
    return Request("write_register", (_hex_int(reg, "register number", 0xFFFF),
                                      _hex_bytes(value, "register value", MAX_REGISTER)))


def _read_memory(rest: bytes) -> Request:
    addr, n = _addr_len(rest, "m")
    return Request("read_memory", (addr, min(n, MAX_MEMORY_READ)))


def _write_memory(cmd: str):
    def parse_one(rest: bytes) -> Request:
        span, sep, data = rest.partition(b":")
        if not sep:
            raise PacketError(f"{cmd}: expected ADDR,LENGTH:DATA")
        addr, n = _addr_len(span, cmd)
        raw = _hex_bytes(data, "M data", MAX_PACKET) if cmd == "M" else unescape(data)
        if len(raw) != n:
            raise PacketError(f"{cmd}: length {n} but {len(raw)} bytes of data")
        return Request("write_memory", (addr, raw))
    return parse_one


def _set_thread(rest: bytes) -> Request:
    op, tid = rest[:1], rest[1:]
    if op not in (b"g", b"c"):
        raise PacketError("H: expected Hg or Hc")
    return Request("set_thread", (op.decode(), _thread_id(tid)))


def _breakpoint(kind_name: str, cmd: str):
    def parse_one(rest: bytes) -> Request:
        fields = rest.split(b";", 1)[0].split(b",")
        if len(fields) != 3:
            raise PacketError(f"{cmd}: expected TYPE,ADDR,KIND")
        ztype = _hex_int(fields[0], "breakpoint type", 0xFF)
        if ztype > 4:
            return Request("unsupported")
        return Request(kind_name, (ztype, _hex_int(fields[1], "breakpoint address"),
                                   _hex_int(fields[2], "breakpoint kind", 0xFF)))
    return parse_one


def _fixed(kind: str):
    return lambda rest: Request(kind)


# one entry per command letter: the parser of what follows it
_BY_LETTER = {
    b"?": _fixed("stop_reason"),
    b"g": _fixed("read_registers"),
    b"G": lambda rest: Request("write_registers", (_hex_bytes(rest, "G", MAX_PACKET // 2),)),
    b"p": lambda rest: Request("read_register", (_hex_int(rest, "register number", 0xFFFF),)),
    b"P": _write_register,
    b"m": _read_memory,
    b"M": _write_memory("M"),
    b"X": _write_memory("X"),
    b"c": lambda rest: _resume("continue", rest, False),
    b"s": lambda rest: _resume("step", rest, False),
    b"C": lambda rest: _resume("continue", rest, True),
    b"S": lambda rest: _resume("step", rest, True),
    b"H": _set_thread,
    b"T": lambda rest: Request("thread_alive", (_thread_id(rest),)),
    b"Z": _breakpoint("insert_breakpoint", "Z"),
    b"z": _breakpoint("remove_breakpoint", "z"),
    b"D": _fixed("detach"),
    b"k": _fixed("kill"),
}
# whole-word packets (v and Q packets name themselves)
_BY_PREFIX = ((b"QStartNoAckMode", "no_ack"), (b"vKill", "kill"))


def parse(body: bytes) -> Request:
    """The Request a packet body asks for; PacketError when its operands are malformed."""
    if not body:
        return Request("unsupported")
    cmd = body[:1]
    if cmd == b"q":
        return _query(body)
    parse_one = _BY_LETTER.get(cmd)
    if parse_one is not None:
        return parse_one(body[1:])
    for prefix, kind in _BY_PREFIX:
        if body == prefix or (kind == "kill" and body.startswith(prefix)):
            return Request(kind)
    return Request("unsupported")
