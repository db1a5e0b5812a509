"""The policy-probe guest drives every DMA-engine register under both trust levels (needs KVM).

One table holds, per probe line, what the guest prints under each trust level and which accesses it
made with the decision each level gets; from it the tests check the guest's output, what reached the
device model (recorded by a subclass put in the machine's place), the engine's state, the DMA copy,
and the authority's decision counts.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from pykvm import abi
from pykvm.devices.dma import Dma

from .helpers import guest, pykvm

pytestmark = pytest.mark.kvm

A, D, T = "allow", "deny", "translate"
# (trusted line, untrusted line or None when identical, [(register, "r"/"w", trusted decision, untrusted decision)])
PROBE = [
    ("policy-probe: start", None, []),
    ("src_lo: w32 SRC -> SRC", None, [("src_lo", "w", A, T), ("src_lo", "r", A, T)]),
    ("src_hi: w32 0x0 -> 0x0", None, [("src_hi", "w", A, T), ("src_hi", "r", A, T)]),
    ("dst_lo: w32 DST -> DST", None, [("dst_lo", "w", A, T), ("dst_lo", "r", A, T)]),
    ("dst_hi: w32 0x0 -> 0x0", None, [("dst_hi", "w", A, T), ("dst_hi", "r", A, T)]),
    ("len: w32 0x1800 -> 0x1800", "len: w32 0x1800 -> 0x1000", [("len", "w", A, T), ("len", "r", A, A)]),
    ("ctrl: w32 0x506 -> 0x506", "ctrl: w32 0x506 -> 0x0", [("ctrl", "w", A, T), ("ctrl", "r", A, A)]),
    ("status: r32 -> 0x0", None, [("status", "r", A, A)]),
    ("scratch: w32 0x5a5a1234 -> 0x5a5a1234", None, [("scratch", "w", A, A), ("scratch", "r", A, A)]),
    ("scratch+2: r16 -> 0x5a5a", None, [("scratch", "r", A, A)]),
    ("unlisted+0x24: w32 0x1234 -> 0xffffffff", None, [("<unlisted>", "w", D, D), ("<unlisted>", "r", D, D)]),
    ("unlisted+0x2f: w8 0x77 -> 0xff", None, [("<unlisted>", "w", D, D), ("<unlisted>", "r", D, D)]),
    ("straddle+0x22: r32 -> 0xffffffff", None, [("scratch", "r", D, D)]),
    ("reset: r32 -> 0xffffffff", None, [("reset", "r", D, D)]),
    ("status: w32 0x3 -> 0x0", None, [("status", "w", D, D), ("status", "r", A, A)]),
    ("ctrl: w32 0x507 (start)", None, [("ctrl", "w", A, T)]),
    ("status: r32 -> 0x1", "status: r32 -> 0x102", [("status", "r", A, A)]),
    ("copy: 6144 bytes copied", "copy: 0 bytes copied", []),
    ("ctrl: r32 -> 0x506", "ctrl: r32 -> 0x0", [("ctrl", "r", A, A)]),
    ("src_lo: w32 0xd0000000 -> 0xd0000000", None, [("src_lo", "w", A, T), ("src_lo", "r", A, T)]),
    ("ctrl: w32 0x503 (start)", None, [("ctrl", "w", A, T)]),
    ("status: r32 -> 0x202", "status: r32 -> 0x102", [("status", "r", A, A)]),
    ("copy: 0 bytes copied", None, []),
    ("src_hi+1: w8 0xab -> 0xab00", None, [("src_hi", "w", A, T), ("src_hi", "r", A, T)]),
    ("reset: w32 0x1", None, [("reset", "w", A, D)]),
    ("src_lo: r32 -> 0x0", "src_lo: r32 -> 0xd0000000", [("src_lo", "r", A, T)]),
    ("len: r32 -> 0x0", "len: r32 -> 0x1000", [("len", "r", A, A)]),
    ("ctrl: r32 -> 0x0", None, [("ctrl", "r", A, A)]),
    ("scratch: r32 -> 0x0", "scratch: r32 -> 0x5a5a1234", [("scratch", "r", A, A)]),
    ("len: w16 0x20 -> 0x20", "len: w16 0x20 -> 0x1000", [("len", "w", A, D), ("len", "r", A, A)]),
    ("policy-probe: done", None, []),
]


def expected_output(trust: str) -> str:
    return "".join(((u if trust == "untrusted" and u is not None else t) + "\n") for t, u, _ in PROBE)


def expected_stats(trust: str) -> dict:
    counts = Counter()
    for _t, _u, accesses in PROBE:
        for reg, _rw, td, ud in accesses:
            counts[(reg, td if trust == "trusted" else ud)] += 1
    out: dict = {}
    for (reg, decision), n in counts.items():
        out.setdefault(reg, {})[decision] = n
    return {"dma": out}


def buffers() -> tuple[int, int]:
    """Guest-physical addresses of the probe's buffers (linked at 1 MiB, identity mapped)."""
    from elftools.elf.elffile import ELFFile

    with open(guest("policy-probe"), "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return (symtab.get_symbol_by_name("src_buf")[0]["st_value"],
                symtab.get_symbol_by_name("dst_buf")[0]["st_value"])


class RecordingDma(Dma):
    """The DMA engine, recording every write that reaches the model (i.e. got past the policy)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[tuple[int, int, int]] = []

    def io_write(self, offset, size, value):
        self.seen.append((offset, size, value))
        super().io_write(offset, size, value)


def run_probe(tmp_path, monkeypatch, trust):
    import pykvm.machine as machine
    from pykvm import record
    from pykvm.devices import registry

    dma = registry.TYPES["dma"]
    monkeypatch.setitem(registry.TYPES, "dma", record.replace(
        dma, build=lambda ctx, o: RecordingDma(memory=ctx.memory, irq=ctx.pulse(), **o)))
    log = tmp_path / f"serial-{trust}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        cfg = machine.MachineConfig(kernel=guest("policy-probe"), serial_out=fd, timeout=60, crash_dir=None,
                                    trust=trust, devices=[("dma", {})])
        with machine.Machine(cfg) as m:
            assert isinstance(m.dma, RecordingDma)
            outcome = m.run()
    finally:
        os.close(fd)
    assert outcome.kind == "poweroff", outcome.reason
    return m, log.read_text()


@pytest.mark.parametrize("trust", ["trusted", "untrusted"])
def test_probe_output_device_side_effects_and_counts(tmp_path, monkeypatch, trust):
    m, out = run_probe(tmp_path, monkeypatch, trust)
    src, dst = buffers()
    assert out == expected_output(trust)
    dma: RecordingDma = m.dma
    S = abi
    if trust == "trusted":
        # every allowed write reached the model unchanged; denied ones (unlisted, STATUS) never did
        assert dma.seen == [(S.PYKVM_DMA_SRC_LO, 4, src), (S.PYKVM_DMA_SRC_HI, 4, 0), (S.PYKVM_DMA_DST_LO, 4, dst),
                            (S.PYKVM_DMA_DST_HI, 4, 0), (S.PYKVM_DMA_LEN, 4, 0x1800), (S.PYKVM_DMA_CTRL, 4, 0x506),
                            (S.PYKVM_DMA_SCRATCH, 4, 0x5A5A1234), (S.PYKVM_DMA_CTRL, 4, 0x507),
                            (S.PYKVM_DMA_SRC_LO, 4, 0xD0000000), (S.PYKVM_DMA_CTRL, 4, 0x503),
                            (S.PYKVM_DMA_SRC_HI + 1, 1, 0xAB), (S.PYKVM_DMA_RESET, 4, 1), (S.PYKVM_DMA_LEN, 2, 0x20)]
        assert dma.transfers == [(src, dst, 0x1800)]          # the copy happened, between the guest's buffers
        assert dma.interrupts == [5] and dma.errors == 1 and dma.resets == 1   # the MMIO-hole copy failed
        assert dma.get_state() == {"src_lo": 0, "src_hi": 0, "dst_lo": 0, "dst_hi": 0, "length": 0x20, "ctrl": 0,
                                   "status": 0, "scratch": 0}
        assert m.policy.get_state() == {}
    else:
        # translated writes reached it only masked or clamped; shadowed and denied ones not at all
        assert dma.seen == [(S.PYKVM_DMA_LEN, 4, 0x1000), (S.PYKVM_DMA_CTRL, 4, 0), (S.PYKVM_DMA_SCRATCH, 4, 0x5A5A1234),
                            (S.PYKVM_DMA_CTRL, 4, S.PYKVM_DMA_CTRL_START), (S.PYKVM_DMA_CTRL, 4, S.PYKVM_DMA_CTRL_START)]
        assert dma.transfers == [] and dma.interrupts == [] and dma.resets == 0 and dma.errors == 2
        assert (dma.src, dma.dst) == (0, 0)                   # the engine never saw the guest's addresses
        assert dma.get_state() == {"src_lo": 0, "src_hi": 0, "dst_lo": 0, "dst_hi": 0, "length": 0x1000, "ctrl": 0,
                                   "status": 0x102, "scratch": 0x5A5A1234}
        # ... which live on in the shadow, where the guest reads them back
        assert m.policy.get_state() == {"dma/port/src_lo": 0xD0000000, "dma/port/src_hi": 0xAB00,
                                        "dma/port/dst_lo": dst, "dma/port/dst_hi": 0}
    assert m.policy.stats() == expected_stats(trust)
    denials = [(d.register, d.write) for d in m.policy.audit]
    want = [(reg, rw == "w") for _t, _u, acc in PROBE for reg, rw, td, ud in acc
            if (td if trust == "trusted" else ud) == D]
    assert denials == want


def test_default_devices_are_described_and_the_hot_ports_stay_unwrapped(tmp_path, monkeypatch):
    """Under the default trust level the ranges the exit benchmark and guests hammer cost nothing (every type built)."""
    import pykvm.machine as machine

    from pykvm.devices import registry

    every = [(t.name, {}) for t in registry.TYPES.values() if not t.default]
    cfg = machine.MachineConfig(kernel=guest("hello"), serial_out=None, timeout=30, devices=every)
    with machine.Machine(cfg) as m:
        for dev in m.devices.devices:
            assert m.policy.description_for(dev) is not None, dev.name
        m.devices.start_all()
        try:
            for port, dev in ((0x80, "post-code"), (abi.PYKVM_PORT_COM1, "serial"), (abi.PYKVM_PORT_DEBUG_EXIT,
                                                                                       "debug-exit")):
                model = m.devices.find(dev)
                assert m.devices.live_port_writes[port][0] == model.io_write
                assert m.devices.live_port_reads[port][0] == model.io_read
            assert getattr(m.devices.live_port_writes[abi.PYKVM_PORT_DMA][0], "policy_wrapped", False)
        finally:
            m.devices.stop_all()


def test_cli_untrusted_run_prints_the_denial_summary():
    r = pykvm("run", "policy-probe", "--device", "dma", "--trust", "untrusted", "--timeout", "30")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == expected_output("untrusted")
    err = r.stderr.decode()
    assert ("pykvm: policy (untrusted): 9 accesses denied: dma (<unlisted> 4, reset 2, len 1, scratch 1, status 1); "
            "17 translated, 14 allowed (counted ranges only)") in err
    assert "dma: denied 4-byte write 0x1234 to <unlisted> (port 0x6e4): no register at this offset" in err
    assert "more denials suppressed" in err     # five lines a second per device, then a count


def test_cli_trusted_run_of_an_ordinary_guest_says_nothing_about_policy():
    r = pykvm("run", "hello", "--timeout", "30")
    assert r.returncode == 0 and "policy" not in r.stderr.decode()
