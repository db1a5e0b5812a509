"""The device access policy, driven directly (no KVM): descriptions, the authority's wrapped callbacks,
the DMA engine under both trust levels, and `pykvm devices`."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.devices import Device, DeviceManager
from pykvm.devices import description as D
from pykvm.devices.dma import Dma
from pykvm.devices.fwcfg import FwCfg
from pykvm.devices.identity import Identity
from pykvm.devices.mailbox import Mailbox
from pykvm.devices.policy import UNDESCRIBED, UNLISTED, PolicyAuthority
from pykvm.devices.power import PowerControl
from pykvm.devices.serial import Serial16550
from pykvm.devices.simple import DebugExit, FirmwareTrapPort, PostCode, PowerOff, PvPanic
from pykvm.errors import DeviceConfigError, UsageError

from .helpers import pykvm

DMA = abi.PYKVM_PORT_DMA
SRC_LO, SRC_HI, DST_LO, DST_HI = (abi.PYKVM_DMA_SRC_LO, abi.PYKVM_DMA_SRC_HI, abi.PYKVM_DMA_DST_LO,
                                  abi.PYKVM_DMA_DST_HI)
LEN, CTRL, STATUS, RESET, SCRATCH = (abi.PYKVM_DMA_LEN, abi.PYKVM_DMA_CTRL, abi.PYKVM_DMA_STATUS,
                                     abi.PYKVM_DMA_RESET, abi.PYKVM_DMA_SCRATCH)
START, ENABLE, IRQ_EN = abi.PYKVM_DMA_CTRL_START, abi.PYKVM_DMA_CTRL_ENABLE, abi.PYKVM_DMA_CTRL_IRQ_EN


class FakeRam:
    """Guest RAM at [base, base + size) with GuestMemory's interface, for the engine without KVM."""

    def __init__(self, base: int, size: int, seed: int = 1):
        self.base = base
        rnd = random.Random(seed)
        self.buf = bytearray(rnd.randbytes(size))

    def region_of(self, gpa, length=1):
        ok = length >= 0 and self.base <= gpa and gpa + length <= self.base + len(self.buf)
        return self if ok else None

    def read(self, gpa, n):
        assert self.region_of(gpa, n), "the engine read outside RAM"
        o = gpa - self.base
        return bytes(self.buf[o:o + n])

    def write(self, gpa, data):
        assert self.region_of(gpa, len(data)), "the engine wrote outside RAM"
        o = gpa - self.base
        self.buf[o:o + len(data)] = data


class Lines:
    """Collects the authority's log lines."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line):
        self.lines.append(line)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def wrapped(dev, trust, **kw):
    kw.setdefault("log", Lines())
    auth = PolicyAuthority(trust, **kw)
    kind, (base, _n) = ("port", dev.ports[0]) if dev.ports else ("mmio", dev.mmio[0])
    rd, wr = auth.wrap(dev, kind, base, dev.io_read if kind == "port" else dev.mmio_read,
                       dev.io_write if kind == "port" else dev.mmio_write)
    return auth, rd, wr


def default_devices():
    """The models machine.py builds by default, constructed without a VM."""
    return [Serial16550(out_fd=None), DebugExit(), PvPanic(), PowerOff(), PostCode(), FwCfg(128 << 20, 128 << 20, 1),
            FirmwareTrapPort(), PowerControl(), Mailbox(), Identity(), Dma()]


# ------------------------------------------------------------------ shipped descriptions
def test_every_shipped_description_loads_and_matches_its_model():
    table = D.shipped()
    devs = default_devices()
    assert {d.name for d in devs} <= set(table), "a default device has no description"
    for dev in devs:
        desc = D.for_device(dev)
        assert desc is table[dev.name] and desc.path.endswith(".toml")
        desc.check_ranges(dev)
    for desc in table.values():     # each file re-read on its own validates too
        assert D.load(Path(D.HERE).parent.parent / desc.path) == desc


def test_serial_description_has_eight_registers_including_the_dlab_aliases():
    regs = D.shipped()["serial"].registers
    assert [r.offset for r in regs] == list(range(8)) and all(r.width == 1 for r in regs)
    assert regs[0].name == "rbr_thr_dll" and regs[1].name == "ier_dlm"


def test_system_scope_registers_are_never_plainly_allowed_to_untrusted_guests():
    for desc in D.shipped().values():
        for r in desc.registers:
            if r.scope == "system":
                assert r.untrusted.action != "allow", (desc.name, r.name)


def test_instance_names_fall_back_to_the_model_class_name():
    assert D.for_device(Mailbox(name="mailbox2")) is D.shipped()["mailbox"]


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(alphabet="aZ09_.-\n \xe9\u0131/", max_size=6), st.text(max_size=6), st.integers()))
def test_register_names_are_the_pattern_without_re(name):
    import re

    assert D.is_register_name(name) == (isinstance(name, str) and bool(re.fullmatch(r"[A-Za-z0-9_.-]+", name)))


# ------------------------------------------------------------------ validation errors
GOOD_REG = """
[[registers]]
name = "a"
space = "port"
offset = 0
width = 1
access = "rw"
scope = "local"
trusted = { action = "allow" }
untrusted = { action = "allow" }
"""


def desc_text(*registers: str, head: str = 'name = "x"\nsummary = "test"\n') -> str:
    return head + "".join(textwrap.dedent(r) for r in registers)


def reg(**over) -> str:
    fields = {"name": '"r"', "space": '"port"', "offset": "0", "width": "1", "access": '"rw"', "scope": '"local"',
              "trusted": '{ action = "allow" }', "untrusted": '{ action = "allow" }'}
    fields.update(over)
    return "[[registers]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)


@pytest.mark.parametrize("text, message", [
    ("name = \n", r"bad\.toml: not valid TOML"),
    (desc_text(GOOD_REG, head='name = "x"\nsummary = "s"\ncolour = 1\n'), r"bad\.toml: unknown key 'colour'"),
    ('summary = "s"\n' + GOOD_REG, r"`name` .* must be a non-empty string"),
    ('name = "x"\nsummary = "s"\n', r"no \[\[registers\]\]"),
    (desc_text(reg(colour='"red"')), r"register 'r': unknown key 'colour' \(allowed: name, space"),
    (desc_text(reg(scope=None)), r"register 'r': missing scope"),
    (desc_text(reg(name='"a b"')), r"name must be letters, digits"),
    (desc_text(reg(name='"a\\n"')), r"name must be letters, digits"),   # the old pattern's $ let a final newline by
    (desc_text(reg(trusted='{ action = "permit" }')), r"register 'r': trusted: action 'permit' is not one of "
                                                       r"allow, deny, translate"),
    (desc_text(reg(untrusted='{ action = "allow", read_value = 1 }')), r"untrusted: unknown key 'read_value'"),
    (desc_text(reg(untrusted='{ action = "translate" }')), r"translate needs exactly one of mask, clamp, shadow"),
    (desc_text(reg(untrusted='{ action = "translate", mask = 1, shadow = true }')), r"exactly one of"),
    (desc_text(reg(untrusted='{ action = "translate", mask = 0x100 }')), r"mask 256 must be an integer in 0\.\.0xff"),
    (desc_text(reg(untrusted='{ action = "translate", clamp = [9, 2] }')), r"clamp \[0x9, 0x2\] has lo > hi"),
    (desc_text(reg(untrusted='{ action = "translate", shadow = false }')), r"shadow must be true"),
    (desc_text(reg(access='"r"', untrusted='{ action = "translate", mask = 1 }')), r"the register is read-only"),
    (desc_text(reg(access='"w"', untrusted='{ action = "deny", read_value = 0 }')), r"read_value on a write-only"),
    (desc_text(reg(width="3")), r"register 'r': width 3 must be one of 1, 2, 4 for port registers"),
    (desc_text(reg(width="8")), r"width 8 must be one of 1, 2, 4 for port"),
    (desc_text(reg(width="true")), r"width True must be one of"),
    (desc_text(reg(offset="-1")), r"offset -1 must be a non-negative integer"),
    (desc_text(reg(space='"pci"')), r"space 'pci' is not one of port, mmio"),
    (desc_text(reg(access='"x"')), r"access 'x' is not one of r, w, rw"),
    (desc_text(reg(scope='"global"')), r"scope 'global' is not one of local, system"),
    (desc_text(reg(scope='"system"')), r"register 'r': a system-scope register must be denied or translated"),
    (desc_text(reg(name='"a"'), reg(name='"a"', offset="1")), r"register 'a' is defined twice"),
    (desc_text(reg(name='"a"', width="4"), reg(name='"b"', offset="2")),
     r"register 'b' \(port 0x2\+1\) overlaps register 'a' \(port 0x0\+4\)"),
])
def test_invalid_descriptions_are_refused_with_a_clear_message(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(D.DescriptionError, match=message) as e:
        D.load(p)
    assert str(p) in str(e.value) or "bad.toml" in str(e.value)
    assert isinstance(e.value, DeviceConfigError)   # exit status 10, like other device configuration errors


def test_registers_of_different_spaces_may_share_offsets():
    d = D.parse(desc_text(reg(name='"a"'), reg(name='"b"', space='"mmio"', width="8")))
    assert [r.space for r in d.registers] == ["port", "mmio"]


def test_register_outside_the_models_range_is_an_error():
    desc = D.parse(desc_text(reg(name='"a"', width="4"), reg(name='"far"', offset="4", width="2")), "far.toml")

    class Small(Device):
        name = "x"
        ports = [(0x100, 4)]

    with pytest.raises(D.DescriptionError, match=r"far\.toml: register 'far' \(offset 0x4, width 2\) lies outside "
                                                 r"device x's I/O ports 0x100\+0x4"):
        desc.check_ranges(Small())

    class NoMmio(Device):
        name = "x"
        ports = [(0x100, 8)]

    mm = D.parse(desc_text(reg(space='"mmio"')), "m.toml")
    with pytest.raises(D.DescriptionError, match=r"m\.toml: register 'r' is in mmio space, but device x decodes no MMIO"):
        mm.check_ranges(NoMmio())
    # the authority refuses to link such a device, and Machine checks every device up front
    auth = PolicyAuthority("trusted", {"x": desc})
    with pytest.raises(D.DescriptionError, match="lies outside"):
        auth.check([Small()])
    # a device plugged in later is failed closed rather than raising out of dispatch
    lines = Lines()
    auth = PolicyAuthority("trusted", {"x": desc}, log=lines)
    writes = []
    rd, wr = auth.wrap(Small(), "port", 0x100, lambda o, s: 0, lambda o, s, v: writes.append(v))
    wr(0, 1, 5)
    assert rd(0, 4) == 0xFFFFFFFF and writes == []
    assert "x: every access denied: far.toml: register 'far'" in lines.lines[0]
    assert auth.stats() == {"x": {"<invalid-description>": {"deny": 2}}}


def test_two_files_describing_one_device_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text(desc_text(GOOD_REG))
    (tmp_path / "b.toml").write_text(desc_text(GOOD_REG))
    with pytest.raises(D.DescriptionError, match=r"b\.toml: describes device 'x', already described by .*a\.toml"):
        D.load_dir(tmp_path)


# ------------------------------------------------------------------ the authority
def test_unknown_trust_level_is_a_usage_error():
    with pytest.raises(UsageError, match="trust level 'paranoid'"):
        PolicyAuthority("paranoid")


@pytest.mark.parametrize("trust", ["trusted", "untrusted"])
def test_fully_allowed_ranges_are_linked_unwrapped(trust):
    auth = PolicyAuthority(trust, log=Lines())
    for dev in (Serial16550(out_fd=None), PostCode(), DebugExit(), PvPanic(), PowerOff(), FwCfg(1 << 20, 1 << 20, 1),
                FirmwareTrapPort(), Mailbox()):
        base = dev.ports[0][0]
        rd, wr = auth.wrap(dev, "port", base, dev.io_read, dev.io_write)
        assert rd == dev.io_read and wr == dev.io_write, dev.name   # the model's own bound methods: zero cost
        assert auth.decisions[(dev.name, "port", base)] == "static"
    assert auth.stats() == {}


def test_dma_is_wrapped_at_both_levels_and_power_control_only_when_untrusted():
    for trust in ("trusted", "untrusted"):
        auth, rd, wr = wrapped(Dma(), trust)
        assert getattr(rd, "policy_wrapped", False) and auth.decisions[("dma", "port", DMA)] == "wrapped"
    pc = PowerControl()
    for trust, want in (("trusted", "static"), ("untrusted", "wrapped")):
        auth = PolicyAuthority(trust)
        auth.wrap(pc, "port", pc.ports[0][0], pc.io_read, pc.io_write)
        assert auth.decisions[("power-control", "port", pc.ports[0][0])] == want


def test_device_manager_links_through_the_authority():
    auth = PolicyAuthority("untrusted", log=Lines())
    dm = DeviceManager(access_filter=auth)
    post = dm.add(PostCode())
    dma = dm.add(Dma(memory=FakeRam(0, 0x4000)))
    dm.start_all()
    assert dm.live_port_writes[0x80][0] == post.io_write          # static: the hot table holds the model itself
    dm.port_access(DMA + SCRATCH, 4, True, 0x1234)
    assert dm.port_access(DMA + SCRATCH, 4, False) == 0x1234 and dma.scratch == 0x1234
    dm.port_access(DMA + RESET, 4, True, 1)
    assert dma.resets == 0 and dma.scratch == 0x1234
    assert auth.stats() == {"dma": {"scratch": {"allow": 2}, "reset": {"deny": 1}}}
    dm.set_power(dma, False)      # out of D0: unlinked; back in: wrapped again, counts carry on
    dm.set_power(dma, True)
    dm.port_access(DMA + SCRATCH, 4, False)
    assert auth.stats()["dma"]["scratch"] == {"allow": 3}
    dm.stop_all()


def test_undescribed_device_static_when_trusted_and_denied_when_untrusted():
    class Plain(Device):
        name = "plain"
        ports = [(0x700, 4)]
        written = []

        def io_read(self, offset, size):
            return 0x42

        def io_write(self, offset, size, value):
            self.written.append(value)

    dev = Plain()
    auth = PolicyAuthority("trusted")
    assert auth.wrap(dev, "port", 0x700, dev.io_read, dev.io_write) == (dev.io_read, dev.io_write)
    auth, rd, wr = wrapped(dev, "untrusted")
    assert rd(0, 1) == 0xFF and rd(2, 2) == 0xFFFF
    wr(0, 4, 7)
    assert dev.written == [] and auth.stats() == {"plain": {UNDESCRIBED: {"deny": 3}}}


class Rec(Device):
    """A device that records what reaches it."""

    name = "rec"

    def __init__(self, ports=((0x40, 16),), mmio=()):
        super().__init__()
        self.ports, self.mmio = list(ports), list(mmio)
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def io_read(self, offset, size):
        self.reads.append((offset, size))
        return 0x11223344 & ((1 << (8 * size)) - 1)

    def io_write(self, offset, size, value):
        self.writes.append((offset, size, value))

    mmio_read, mmio_write = io_read, io_write


REC = desc_text(
    reg(name='"allowed"', width="4", untrusted='{ action = "allow" }'),
    reg(name='"masked"', offset="4", width="2", scope='"system"', untrusted='{ action = "translate", mask = 0x0ff0 }'),
    reg(name='"clamped"', offset="6", width="2", untrusted='{ action = "translate", clamp = [16, 4096] }'),
    reg(name='"shadowed"', offset="8", width="4", scope='"system"', untrusted='{ action = "translate", shadow = true }'),
    reg(name='"denied"', offset="12", width="2", scope='"system"', untrusted='{ action = "deny", read_value = 0xbeef }'),
    reg(name='"ro"', offset="14", width="1", access='"r"'),
    head='name = "rec"\nsummary = "recorder"\n')   # offset 15 is unlisted


def rec_wrapped(trust="untrusted", **kw):
    dev = Rec()
    auth, rd, wr = wrapped(dev, trust, descriptions={"rec": D.parse(REC, "rec.toml")}, **kw)
    return dev, auth, rd, wr


def test_actions_on_writes_and_reads():
    dev, auth, rd, wr = rec_wrapped()
    wr(0, 4, 0xAABBCCDD)                       # allow
    wr(4, 2, 0xFFFF)                           # mask: 0x0ff0
    wr(5, 1, 0xFF)                             # mask on the high byte: 0x0f
    wr(6, 2, 5)                                # clamp up
    wr(6, 2, 0xFFFF)                           # clamp down
    wr(6, 1, 0x99)                             # partial write to a clamped register: denied
    wr(8, 4, 0x12345678)                       # shadow: the device never sees it
    wr(9, 1, 0xAB)                             # partial shadow write
    wr(12, 2, 0x1)                             # deny
    wr(14, 1, 0x1)                             # read-only register
    wr(15, 1, 0x1)                             # unlisted
    wr(2, 4, 0x1)                              # straddles allowed/masked
    assert dev.writes == [(0, 4, 0xAABBCCDD), (4, 2, 0x0FF0), (5, 1, 0x0F), (6, 2, 16), (6, 2, 4096)]
    assert rd(8, 4) == 0x1234AB78 and rd(10, 2) == 0x1234 and rd(9, 1) == 0xAB   # the shadow, not the device
    assert rd(12, 2) == 0xBEEF and rd(13, 1) == 0xBE                           # read_value, per byte
    assert rd(15, 1) == 0xFF and rd(14, 2) == 0xFFFF                           # unlisted; wider than ro
    assert rd(0, 2) == 0x3344 and rd(4, 2) == 0x3344 and rd(6, 2) == 0x3344    # allow/mask/clamp reads reach it
    assert dev.reads == [(0, 2), (4, 2), (6, 2)]
    assert auth.stats() == {"rec": {
        "allowed": {"allow": 2, "deny": 1},            # the straddling write is charged to where it starts
        "masked": {"allow": 1, "translate": 2},
        "clamped": {"allow": 1, "deny": 1, "translate": 2},
        "shadowed": {"translate": 5},
        "denied": {"deny": 3},
        "ro": {"deny": 2},
        UNLISTED: {"deny": 2}}}
    assert auth.totals() == {"allow": 4, "deny": 9, "translate": 9}
    assert auth.get_state() == {"rec/port/shadowed": 0x1234AB78}


def test_trusted_level_allows_every_listed_register_but_keeps_checking():
    dev, auth, rd, wr = rec_wrapped("trusted")   # offset 15 is unlisted, so the range stays wrapped
    wr(4, 2, 0xFFFF)
    wr(8, 4, 7)
    wr(15, 1, 1)
    wr(14, 1, 1)
    assert dev.writes == [(4, 2, 0xFFFF), (8, 4, 7)]
    assert rd(12, 2) == 0x3344


def test_denials_are_audited_and_logged_rate_limited():
    clock, log = Clock(), Lines()
    dev, auth, rd, wr = rec_wrapped(log=log, clock=clock, log_limit=3, audit_size=5)
    for i in range(10):
        wr(12, 2, i)
    assert len(log.lines) == 3 and all("rec: denied 2-byte write" in s and "to denied (port 0x4c)" in s
                                       for s in log.lines)
    assert [d.value for d in auth.audit] == [5, 6, 7, 8, 9] and auth.denied == 10
    assert auth.audit[-1].reason == "untrusted: deny" and auth.audit[-1].register == "denied"
    clock.t += 1.5
    rd(15, 1)
    assert log.lines[3] == "pykvm: policy: rec: ... 7 more denials suppressed"
    assert log.lines[4].endswith("denied 1-byte read of <unlisted> (port 0x4f): no register at this offset")
    for _ in range(4):
        rd(15, 1)
    summary = auth.summary()         # flushes what is still suppressed, then one line
    assert log.lines[-1] == "pykvm: policy: rec: ... 2 more denials suppressed"
    assert summary == ("pykvm: policy (untrusted): 15 accesses denied: rec (denied 10, <unlisted> 5); "
                       "0 translated, 0 allowed (counted ranges only)")


def test_summary_is_none_without_denials():
    dev, auth, rd, wr = rec_wrapped()
    wr(0, 4, 1)
    assert auth.summary() is None


def test_shadow_state_round_trips_and_survives_relinking():
    dev, auth, rd, wr = rec_wrapped()
    wr(8, 4, 0xCAFE)
    rd2, _wr2 = auth.wrap(dev, "port", 0x40, dev.io_read, dev.io_write)   # a re-link (power cycle)
    assert rd2(8, 4) == 0xCAFE
    other = PolicyAuthority("untrusted", {"rec": D.parse(REC)})
    other.set_state(auth.get_state())
    rd3, _ = other.wrap(dev, "port", 0x40, dev.io_read, dev.io_write)
    assert rd3(8, 4) == 0xCAFE
    with pytest.raises(ValueError, match="bad shadow entry"):
        other.set_state({"nonsense": 1})


def test_large_mmio_ranges_use_sparse_tables():
    big = desc_text(reg(name='"lo"', space='"mmio"', width="8"),
                    reg(name='"hi"', space='"mmio"', offset="0x1fff0", width="4"),
                    head='name = "rec"\nsummary = "big"\n')
    dev = Rec(ports=(), mmio=((0xE0000000, 0x20000),))
    auth, rd, wr = wrapped(dev, "trusted", descriptions={"rec": D.parse(big)})
    wr(0, 8, 1)
    wr(0x1FFF0, 4, 2)
    wr(0x100, 4, 3)                      # unlisted
    assert dev.writes == [(0, 8, 1), (0x1FFF0, 4, 2)]
    assert rd(0x1FFF2, 2) == 0x3344 and rd(0x8000, 4) == 0xFFFFFFFF
    assert auth.stats() == {"rec": {"lo": {"allow": 1}, "hi": {"allow": 2}, UNLISTED: {"deny": 2}}}


# ------------------------------------------------------------------ the DMA engine itself
def test_dma_copies_within_ram_and_refuses_anything_else():
    ram = FakeRam(0x1000, 0x8000)
    dev = Dma(memory=ram)
    w = dev.io_write
    w(SRC_LO, 4, 0x1000)
    w(DST_LO, 4, 0x5000)
    w(LEN, 4, 0x100)
    before = bytes(ram.buf[:0x100])
    w(CTRL, 4, START)                                   # not enabled
    assert dev.io_read(STATUS, 4) == 0x102 and dev.transfers == []
    w(CTRL, 4, (3 << 8) | IRQ_EN | ENABLE | START)
    assert dev.io_read(STATUS, 4) == 1 and bytes(ram.buf[0x4000:0x4100]) == before
    assert dev.interrupts == [3] and dev.io_read(CTRL, 4) == 0x306          # START reads 0
    w(DST_LO, 4, 0x8F80)                                # runs past the end of RAM
    w(CTRL, 4, ENABLE | START)
    assert dev.io_read(STATUS, 4) == 0x202 and len(dev.transfers) == 1
    w(SRC_HI, 4, 1)
    assert dev.src == 0x1_0000_1000
    w(LEN, 4, 0xFFFFFFFF)
    assert dev.length == abi.PYKVM_DMA_MAX_LEN          # the engine's own cap
    w(SCRATCH + 1, 1, 0xAB)
    assert dev.scratch == 0xAB00 and dev.io_read(SCRATCH, 2) == 0xAB00 and dev.io_read(0x24, 4) == 0xFFFFFFFF
    state = dev.get_state()
    w(RESET, 4, 0)
    assert dev.resets == 1 and dev.get_state() == dict.fromkeys(state, 0)
    dev.set_state(state)
    assert dev.get_state() == state
    with pytest.raises(ValueError):
        dev.set_state({"length": 1 << 20})
    assert Dma().io_write(CTRL, 4, ENABLE | START) is None     # no memory at all: an error, not a crash


def test_dma_irq_callback():
    lines = []
    dev = Dma(memory=FakeRam(0, 0x100), irq=lines.append)
    dev.io_write(CTRL, 4, (9 << 8) | IRQ_EN | ENABLE | START)
    assert lines == [9]


_offsets = st.integers(0, abi.PYKVM_DMA_PORTS - 1)
_access = st.tuples(st.sampled_from(["r", "w"]), _offsets, st.sampled_from([1, 2, 4]),
                    st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([START, ENABLE | START, 0xFFF, 0x1000,
                                                                           0x2000, 0x10000, 0xFFFFFFFF])))
RAM_BASE, RAM_SIZE = 0x10000, 0x10000


@settings(max_examples=300, deadline=None)
@given(host=st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
       accesses=st.lists(_access, max_size=60))
def test_untrusted_guest_cannot_change_system_state_of_the_dma_engine(host, accesses):
    """Random accesses under `untrusted`: the addresses the engine acts on, its enable and routing bits and its
    reset count never change, no byte of RAM is touched, LEN stays within the clamp, and nothing raises."""
    ram = FakeRam(RAM_BASE, RAM_SIZE)
    before = bytes(ram.buf)
    dev = Dma(memory=ram)
    src, dst, scratch = host
    dev.set_state({"src_lo": src, "dst_lo": dst, "scratch": scratch})   # what the host left there
    auth, rd, wr = wrapped(dev, "untrusted")
    for kind, off, size, value in accesses:
        if kind == "r":
            assert 0 <= rd(off, size) < 1 << (8 * size)
        else:
            wr(off, size, value & ((1 << (8 * size)) - 1))
        assert (dev.src, dev.dst) == (src, dst)
        assert dev.ctrl & ~START == 0 and dev.resets == 0 and dev.interrupts == []
        assert dev.transfers == [] and dev.length <= 4096
        dev.check()
    assert bytes(ram.buf) == before
    assert sum(auth.totals().values()) == len(accesses)      # every access is exactly one counted decision


@settings(max_examples=200, deadline=None)
@given(accesses=st.lists(_access, max_size=60), src=st.integers(0, 0x30000), dst=st.integers(0, 0x30000))
def test_trusted_dma_only_ever_copies_inside_ram(accesses, src, dst):
    ram = FakeRam(RAM_BASE, RAM_SIZE)
    dev = Dma(memory=ram)
    auth, rd, wr = wrapped(dev, "trusted")
    wr(SRC_LO, 4, src)
    wr(DST_LO, 4, dst)
    for kind, off, size, value in accesses:
        if kind == "r":
            rd(off, size)
        else:
            wr(off, size, value & ((1 << (8 * size)) - 1))
    for s, d, n in dev.transfers:
        assert n == 0 or (ram.region_of(s, n) and ram.region_of(d, n))
    assert sum(auth.totals().values()) == len(accesses) + 2


# ------------------------------------------------------------------ the command line
def test_cli_describe_serial():
    r = pykvm("devices", "--describe", "serial")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert out.startswith("serial: 16550A UART (COM1)")
    assert "from pykvm/devices/serial.toml" in out
    for name in ("rbr_thr_dll", "ier_dlm", "iir_fcr", "lcr", "mcr", "lsr", "msr", "scr"):
        assert f"  {name} " in out
    row = next(line for line in out.splitlines() if line.strip().startswith("lsr"))
    assert row.split() == ["lsr", "port", "0x5", "1", "r", "local", "allow", "allow"]


def test_cli_describe_dma_and_list():
    r = pykvm("devices", "--describe", "dma")
    out = r.stdout.decode()
    assert "translate clamp [0x0, 0x1000]" in out and "translate shadow" in out and "translate mask 0x1" in out
    r = pykvm("devices")
    types = r.stdout.decode().split("\nmachine presets", 1)[0]      # the presets follow the types
    rows = [line.split() for line in types.splitlines() if line.strip()]
    from pykvm.devices import registry

    assert r.returncode == 0 and sorted(row[0] for row in rows) == sorted(registry.TYPES)
    assert {row[0] for row in rows if row[1] == "default"} == {
        "serial", "debug-exit", "pvpanic", "poweroff", "fw-cfg", "firmware-trap"}
    r = pykvm("devices", "--describe", "nope")
    assert r.returncode == 2 and "no device description named 'nope'" in r.stderr.decode()


def test_cli_run_refuses_an_unknown_trust_level():
    r = pykvm("run", "hello", "--trust", "sometimes")
    assert r.returncode == 2 and "--trust" in r.stderr.decode()
