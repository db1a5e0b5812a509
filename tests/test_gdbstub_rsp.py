"""gdb remote protocol pieces without KVM: framing, request parsing, the register file, DR7 encoding."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.kvm.abi import ffi
from pykvm.gdb import hwdebug, registers as gdbregs, rsp

# ---------------------------------------------------------------- framing


def test_frame_is_what_gdb_sends():
    assert rsp.frame(b"OK") == b"$OK#9a"
    assert rsp.frame(b"") == b"$#00"
    # '$', '#', '}' and '*' are escaped with '}' and XOR 0x20; the checksum covers the escaped bytes
    assert rsp.frame(b"a#b") == b"$a}\x03b#" + b"%02x" % ((ord("a") + 0x7D + 3 + ord("b")) & 0xFF)


def test_framer_splits_packets_acks_and_interrupts():
    f = rsp.Framer()
    events = f.feed(b"+$g#67\x03-$m10,4#") + f.feed(b"2e")
    assert events == [("ack", b"+"), ("packet", b"g"), ("interrupt", None), ("ack", b"-"),
                      ("packet", b"m10,4")]


def test_framer_refuses_bad_checksums_and_overlong_packets():
    f = rsp.Framer(max_packet=8)
    assert f.feed(b"$g#00") == [("bad", "checksum mismatch")]
    assert f.feed(b"$g#zz") == [("bad", "checksum mismatch")]
    assert f.feed(b"$" + b"a" * 50 + b"#00") == [("bad", "packet longer than 8 bytes")]
    assert f.feed(b"$g#67") == [("packet", b"g")]     # and it recovers


@given(st.binary(max_size=64))
def test_escape_roundtrip(data):
    escaped = rsp.escape(data)
    assert not any(c in escaped.replace(b"}", b"") for c in b"$#*") or b"}" in escaped
    assert rsp.unescape(escaped) == data


@given(st.binary(max_size=200))
def test_frame_then_feed_roundtrip(payload):
    assert rsp.Framer().feed(rsp.frame(payload)) == [("packet", rsp.escape(payload))]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_framer_never_raises_on_noise(chunks):
    f = rsp.Framer(max_packet=32)
    for c in chunks:
        for kind, value in f.feed(c):
            assert kind in ("packet", "bad", "interrupt", "ack")
            if kind == "packet":
                assert len(value) <= 32


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("body,expected", [
    (b"?", rsp.Request("stop_reason")),
    (b"g", rsp.Request("read_registers")),
    (b"p10", rsp.Request("read_register", (16,))),
    (b"P10=0100000000000000", rsp.Request("write_register", (16, b"\1" + bytes(7)))),
    (b"m100000,40", rsp.Request("read_memory", (0x100000, 0x40))),
    (b"M1000,2:abcd", rsp.Request("write_memory", (0x1000, b"\xab\xcd"))),
    (b"X1000,2:}\x03*", rsp.Request("write_memory", (0x1000, b"#*"))),
    (b"c", rsp.Request("continue", (None,))),
    (b"s100000", rsp.Request("step", (0x100000,))),
    (b"C0b;1000", rsp.Request("continue", (0x1000,))),
    (b"Hg2", rsp.Request("set_thread", ("g", 2))),
    (b"Hc-1", rsp.Request("set_thread", ("c", -1))),
    (b"T3", rsp.Request("thread_alive", (3,))),
    (b"Z0,100050,1", rsp.Request("insert_breakpoint", (0, 0x100050, 1))),
    (b"z2,102000,8;X1,0", rsp.Request("remove_breakpoint", (2, 0x102000, 8))),
    (b"Z9,0,1", rsp.Request("unsupported")),
    (b"qXfer:features:read:target.xml:0,ffb", rsp.Request("xfer_features", ("target.xml", 0, 0xFFB))),
    (b"qSupported:multiprocess+;swbreak+", rsp.Request("supported", ("multiprocess+;swbreak+",))),
    (b"qfThreadInfo", rsp.Request("threads_first")),
    (b"qThreadExtraInfo,2", rsp.Request("thread_extra", (2,))),
    (b"vMustReplyEmpty", rsp.Request("unsupported")),
    (b"QStartNoAckMode", rsp.Request("no_ack")),
    (b"vKill;1", rsp.Request("kill")),
    (b"D", rsp.Request("detach")),
])
def test_parse(body, expected):
    assert rsp.parse(body) == expected


@pytest.mark.parametrize("body", [
    b"pzz", b"P10", b"P10=abc", b"m100", b"mffffffffffffffff,10", b"m1,zz", b"m11111111111111111,1",
    b"M0,2:ab", b"X0,1:}", b"Hx1", b"Hg-2", b"Z0,1", b"Zq,1,1", b"c1g", b"Cxx", b"G0", b"T",
    b"qXfer:features:read:target.xml", b"p" + b"1" * 40,
])
def test_parse_refuses_malformed(body):
    with pytest.raises(rsp.PacketError):
        rsp.parse(body)


def test_memory_reads_are_clipped_to_one_reply():
    assert rsp.parse(b"m0,4000") == rsp.Request("read_memory", (0, rsp.MAX_MEMORY_READ))


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=80),
                 st.builds(lambda c, rest: c + rest, st.sampled_from([b"g", b"G", b"p", b"P", b"m", b"M", b"X",
                                                                      b"c", b"s", b"C", b"S", b"H", b"T", b"Z",
                                                                      b"z", b"q", b"qXfer:features:read:"]),
                           st.binary(max_size=60))))
def test_parse_only_returns_requests_or_packet_errors(body):
    try:
        req = rsp.parse(body)
    except rsp.PacketError:
        return
    assert isinstance(req, rsp.Request)
    for a in req.args:
        if isinstance(a, int):
            assert -1 <= a <= rsp.U64


# ---------------------------------------------------------------- the register file


def test_target_xml_matches_the_register_table():
    root = ET.fromstring(gdbregs.TARGET_XML.split(b"?>", 1)[1].split(b">", 1)[1])  # past <?xml> and DOCTYPE
    assert root.find("architecture").text == "i386:x86-64"
    features = [f.get("name") for f in root.findall("feature")]
    assert features == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments",
                        "org.gnu.gdb.i386.sys"]
    regs = [(r.get("name"), int(r.get("bitsize")), int(r.get("regnum"))) for r in root.iter("reg")]
    assert [n for n, _, _ in regs][:18] == list(gdbregs.GPRS) + ["rip", "eflags"]
    assert [(n, b) for n, b, _ in regs] == [(r.name, r.bits) for r in gdbregs.REGS]
    assert [i for _, _, i in regs] == list(range(len(regs)))
    for name in ("fs_base", "gs_base", "cr0", "cr3", "cr4", "efer", "mxcsr", "xmm15", "st7"):
        assert name in gdbregs.INDEX
    assert gdbregs.G_SIZE == 16 * 8 + 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8 + 6 * 8


def _structs():
    regs, sregs, fpu = ffi.new("struct kvm_regs *"), ffi.new("struct kvm_sregs *"), ffi.new("struct kvm_fpu *")
    regs.rax, regs.r15, regs.rip, regs.rflags = 0x1111, 0xF0F0, 0x100052, 0x10246
    sregs.cs.selector, sregs.fs.base, sregs.cr3, sregs.efer = 0x8, 0x5000, 0x9000, 0x500
    fpu.fcw, fpu.ftwx, fpu.mxcsr = 0x37F, 0x81, 0x1F80
    fpu.xmm[3][0:16] = list(range(16))
    return regs, sregs, fpu


def test_read_values_put_each_register_where_gdb_looks():
    values = gdbregs.read_values(*_structs())
    assert [len(v) for v in values] == list(gdbregs.REG_SIZES)
    at = gdbregs.INDEX
    assert values[at["rax"]] == (0x1111).to_bytes(8, "little")
    assert values[at["rip"]] == (0x100052).to_bytes(8, "little")
    assert values[at["eflags"]] == (0x10246).to_bytes(4, "little")
    assert values[at["cs"]] == (8).to_bytes(4, "little")
    assert values[at["fs_base"]] == (0x5000).to_bytes(8, "little")
    assert values[at["cr3"]] == (0x9000).to_bytes(8, "little")
    assert values[at["efer"]] == (0x500).to_bytes(8, "little")
    assert values[at["xmm3"]] == bytes(range(16))
    # abridged tag 0x81: st0 and st7 in use (00), the rest empty (11)
    assert int.from_bytes(values[at["ftag"]], "little") == 0b0011111111111100


@given(st.sampled_from(range(len(gdbregs.REGS))), st.binary(min_size=16, max_size=16))
def test_write_then_read_back(index, raw):
    regs, sregs, fpu = _structs()
    size = gdbregs.REG_SIZES[index]
    value = raw[:size] if size <= 16 else raw + bytes(size - 16)
    name = gdbregs.REGS[index].name
    gdbregs.write_value(index, value, regs, sregs, fpu)
    back = gdbregs.read_values(regs, sregs, fpu)[index]
    if name in gdbregs.SEGMENTS:
        assert back == value[:2] + b"\0\0"          # selectors are 16 bits
    elif name in ("fiseg", "foseg"):
        assert back == bytes(4)                       # no place for them in KVM's FPU state
    elif name == "ftag":
        pass                                          # only empty/in-use survives the abridged form
    elif name in ("fctrl", "fstat", "fop"):
        assert back == value[:2] + b"\0\0"
    else:
        assert back == value


def test_write_value_refuses_the_wrong_size():
    with pytest.raises(ValueError):
        gdbregs.write_value(gdbregs.INDEX["rip"], b"\0" * 4, *_structs())


# ---------------------------------------------------------------- debug registers


def test_dr7_encodes_breakpoints_and_watchpoints():
    d = hwdebug.DebugRegs()
    assert d.add(hwdebug.Slot(0x100050, hwdebug.RW_EXEC, 1, 1))
    assert d.add(hwdebug.Slot(0x102000, hwdebug.RW_WRITE, 8, 2))
    assert d.add(hwdebug.Slot(0x102010, hwdebug.RW_ACCESS, 2, 4))
    # slot 0: G0, exec, len 0; slot 1: G1, write, len 8 (0b10); slot 2: G2, access, len 2 (0b01)
    assert d.dr7() == (1 << 10) | 0b10 | 0b1000 | 0b100000 | (1 << 20) | (0b10 << 22) | (0b11 << 24) | (0b01 << 26)
    assert d.values()[:3] == [0x100050, 0x102000, 0x102010]
    assert d.hit(0b010) == hwdebug.Slot(0x102000, hwdebug.RW_WRITE, 8, 2)
    assert d.hit(0) is None
    assert d.add(hwdebug.Slot(0x1, hwdebug.RW_EXEC, 1, 1))
    assert not d.add(hwdebug.Slot(0x2, hwdebug.RW_EXEC, 1, 1))     # four slots only
    assert d.remove(hwdebug.Slot(0x102000, hwdebug.RW_WRITE, 8, 2))
    assert d.free() == 1
    assert not d.remove(hwdebug.Slot(0x102000, hwdebug.RW_WRITE, 8, 2))


@pytest.mark.parametrize("addr,length,ok", [(0x1000, 8, True), (0x1004, 8, False), (0x1002, 2, True),
                                            (0x1001, 1, True), (0x1000, 3, False), (0x1000, 16, False)])
def test_watch_alignment(addr, length, ok):
    assert hwdebug.watch_ok(addr, length) is ok
