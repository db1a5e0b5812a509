"""The PC platform devices kvm-unit-tests needs: pc-testdev, the split-irqchip IOAPIC, ACPI PM, CMOS RTC."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices import description, registry
from pykvm.devices.acpi_pm import (PM_TIMER_HZ, RTC_STS, SLP_EN, WAK_STS, AcpiPm, WakeSignal, pm_ticks)
from pykvm.devices.events import GuestExit, SleepRequest
from pykvm.devices.ioapic import LEVEL, MASKED, REMOTE_IRR, IoApic, msi_of
from pykvm.devices.rtc import B_AIE, B_DM, C_AF, C_IRQF, CmosRtc, from_bcd, periodic_hz, to_bcd
from pykvm.devices.testdev import IORAM_LEN, PcTestdev, PcTestdevIrq


# ------------------------------------------------------------------ pc-testdev
def test_latch_keeps_bytes_by_offset_and_width():
    d = PcTestdev()
    d.io_write(0, 4, 0x11223344)
    d.io_write(1, 1, 0xAA)
    assert d.io_read(0, 4) == 0x1122AA44
    assert d.io_read(2, 2) == 0x1122
    assert d.io_read(8, 4) == 0x1122AA44          # the byte-decoded alias at 0xe8
    d.io_write(4, 4, 0x1000)                      # flush-page
    assert d.flushes == 1 and d.io_read(4, 4) == 0


@given(st.integers(0, IORAM_LEN + 8), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1))
def test_ioram_round_trips_and_never_grows(offset, size, value):
    d = PcTestdev()
    d.mmio_write(offset, size, value & ((1 << (8 * size)) - 1))
    assert len(d.ram) == IORAM_LEN
    if offset + size <= IORAM_LEN:
        assert d.mmio_read(offset, size) == value & ((1 << (8 * size)) - 1)


def test_irq_lines_drive_the_interrupt_callable():
    seen = []
    d = PcTestdevIrq(irq_line=lambda line, level: seen.append((line, level)))
    d.io_write(0x0E, 1, 1)
    d.io_write(0x0E, 1, 0)
    d.io_write(24, 1, 1)                          # past the 24 lines: ignored
    assert seen == [(0x0E, 1), (0x0E, 0)]
    assert d.io_read(0x0E, 1) == 0


# ------------------------------------------------------------------ IOAPIC
def _ioapic():
    sent, routes = [], {}
    io = IoApic(deliver=lambda a, d: sent.append((a, d)), route=lambda p, a, d: routes.__setitem__(p, (a, d)))
    io.prepare_hardware()
    return io, sent, routes


def _write_redir(io, pin, entry):
    io.mmio_write(0, 4, 0x10 + 2 * pin)
    io.mmio_write(0x10, 4, entry & 0xFFFFFFFF)
    io.mmio_write(0, 4, 0x11 + 2 * pin)
    io.mmio_write(0x10, 4, entry >> 32)


def _read_redir(io, pin):
    io.mmio_write(0, 4, 0x10 + 2 * pin)
    lo = io.mmio_read(0x10, 4)
    io.mmio_write(0, 4, 0x11 + 2 * pin)
    return lo | io.mmio_read(0x10, 4) << 32


def test_ioapic_id_version_and_every_pin_routed_masked():
    io, sent, routes = _ioapic()
    assert sorted(routes) == list(range(24))
    io.mmio_write(0, 4, 1)
    assert io.mmio_read(0x10, 4) == (23 << 16) | 0x20
    io.mmio_write(0x10, 4, 0)                     # version is read-only
    assert io.mmio_read(0x10, 4) == (23 << 16) | 0x20
    io.mmio_write(0, 4, 0)
    io.mmio_write(0x10, 4, 0xFFFFFFFF)
    assert io.mmio_read(0x10, 4) == 0x0F000000
    assert _read_redir(io, 5) == MASKED


def test_edge_pin_fires_on_rising_edges_only_when_unmasked():
    io, sent, routes = _ioapic()
    _write_redir(io, 14, 0x81 | MASKED)
    io.set_irq(14, 1)
    io.set_irq(14, 0)
    assert sent == []
    _write_redir(io, 14, 0x81 | (1 << 56))
    assert routes[14] == (0xFEE01000, 0x81)
    io.set_irq(14, 1)
    io.set_irq(14, 1)
    assert sent == [(0xFEE01000, 0x81)]


def test_level_pin_holds_remote_irr_until_eoi_then_refires_while_high():
    io, sent, routes = _ioapic()
    _write_redir(io, 14, 0x77 | LEVEL)
    assert routes[14][1] == 0x77 | LEVEL | (1 << 14)   # KVM only exits on EOI of level MSI routes
    io.set_irq(14, 1)
    io.set_irq(14, 1)
    assert len(sent) == 1 and _read_redir(io, 14) & REMOTE_IRR
    io.eoi(0x77)
    assert len(sent) == 2                          # still high: delivered again
    io.set_irq(14, 0)
    io.eoi(0x77)
    assert len(sent) == 2 and not _read_redir(io, 14) & REMOTE_IRR


def test_recover_ends_only_deliveries_no_lapic_holds_and_refires_a_high_line():
    # a host that lost the EOI exit (the vCPU blocked in HLT with it queued): the machine saw the
    # vector in no IRR/ISR and hands the stale delivery back; the line is still high, so it fires again
    io, sent, _ = _ioapic()
    _write_redir(io, 14, 0x9A | LEVEL)
    _write_redir(io, 13, 0x64 | LEVEL)
    io.set_irq(14, 1)
    io.set_irq(13, 1)
    stale = io.outstanding()
    assert set(stale) == {13, 14} and len(sent) == 2
    assert io.recover(stale, held={0x64}) == [14]      # 0x64 is still in a LAPIC: not ended
    assert len(sent) == 3 and sent[-1][1] & 0xFF == 0x9A
    assert _read_redir(io, 14) & REMOTE_IRR and _read_redir(io, 13) & REMOTE_IRR
    assert io.recover(stale, held=set()) == [13]       # 14's entry is a newer delivery now
    assert io.recovered == 2


def test_recover_ignores_a_delivery_ended_meanwhile_and_bad_pins():
    io, sent, _ = _ioapic()
    _write_redir(io, 14, 0x9A | LEVEL)
    io.set_irq(14, 1)
    stale = io.outstanding()
    io.set_irq(14, 0)
    io.eoi(0x9A)                                       # the real EOI exit came after all
    assert io.recover({**stale, 99: 1, -1: 1}, held=set()) == []
    assert len(sent) == 1 and io.outstanding() == {}


def test_level_delivery_notifies_the_watch():
    seen = []
    io = IoApic(on_level_sent=lambda: seen.append(1))
    _write_redir(io, 2, 0x30)
    io.set_irq(2, 1)                                   # edge: nothing awaits an EOI
    _write_redir(io, 3, 0x31 | LEVEL)
    io.set_irq(3, 1)
    assert seen == [1]


def test_unmasking_a_high_level_pin_delivers():
    io, sent, _ = _ioapic()
    _write_redir(io, 3, 0x82 | LEVEL | MASKED)
    io.set_irq(3, 1)
    assert sent == []
    _write_redir(io, 3, 0x82 | LEVEL)
    assert len(sent) == 1


@given(st.lists(st.tuples(st.sampled_from([0, 0x10, 0x40, 0x20, 0xFC]), st.integers(0, 0xFFFFFFFF)), max_size=40),
       st.lists(st.tuples(st.integers(-2, 30), st.integers(0, 1)), max_size=20))
def test_ioapic_any_guest_writes_keep_entries_64_bit_and_status_bits_its_own(writes, lines):
    io, sent, routes = _ioapic()
    for off, v in writes:
        io.mmio_write(off, 4, v)
    for pin, lv in lines:
        io.set_irq(pin, lv)
    for e in io.redir:
        assert 0 <= e < 1 << 64
        if not e & LEVEL:
            assert not e & REMOTE_IRR
    for a, d in list(routes.values()) + sent:
        assert 0xFEE00000 <= a <= 0xFEEFF00C and 0 <= d < 1 << 16


def test_msi_of_logical_destination():
    assert msi_of(0x30 | (1 << 11) | (0xFF << 56)) == (0xFEEFF004, 0x30)


# ------------------------------------------------------------------ ACPI PM
def test_pm_timer_counts_at_3_579545_mhz_and_wraps():
    now = [0]
    pm = AcpiPm(clock=lambda: now[0])
    now[0] = 1_000_000_000
    assert pm.io_read(8, 4) == PM_TIMER_HZ
    assert 0 <= pm_ticks(10 ** 18) <= 0xFFFFFFFF


def test_s5_powers_off_and_s3_sleeps_until_an_enabled_wake():
    wake = WakeSignal()
    sci = []
    pm = AcpiPm(wake=wake, sci=sci.append)
    with pytest.raises(GuestExit):
        pm.io_write(4, 2, SLP_EN)
    pm.io_write(2, 2, RTC_STS)                       # RTC_EN
    with pytest.raises(SleepRequest) as ev:
        pm.io_write(4, 2, SLP_EN | (1 << 10))
    assert not ev.value.wake.is_set()
    wake.rtc_alarm()
    assert ev.value.wake.is_set()
    assert pm.io_read(0, 2) & (WAK_STS | RTC_STS) == WAK_STS | RTC_STS
    assert sci[-1] == 1
    pm.io_write(0, 2, 0xFFFF)                        # write 1 to clear
    assert pm.io_read(0, 2) == 0 and sci[-1] == 0
    assert pm.io_read(4, 2) & 1                      # SCI_EN: ACPI mode is always on


@given(st.integers(0, 11), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF))
def test_pm_block_never_lets_a_write_escape_its_registers(offset, size, value):
    pm = AcpiPm()
    try:
        pm.io_write(offset, size, value)
    except (GuestExit, SleepRequest):
        pass
    assert 0 <= pm.sts <= 0xFFFF and pm.en & ~(RTC_STS | 0x101) == 0 and 0 <= pm.slp_typ <= 7


# ------------------------------------------------------------------ RTC
def test_rtc_reads_bcd_or_binary_host_time():
    rtc = CmosRtc(clock=lambda: 1700000000.5)       # 2023-11-14 22:13:20 UTC
    rtc.io_write(0, 1, 0)
    assert rtc.io_read(1, 1) == 0x20
    rtc.io_write(0, 1, 4)
    assert rtc.io_read(1, 1) == 0x22
    rtc.io_write(0, 1, 0x0B)
    rtc.io_write(1, 1, rtc.io_read(1, 1) | B_DM)
    rtc.io_write(0, 1, 9)
    assert rtc.io_read(1, 1) == 23
    rtc.io_write(0, 1, 0x32)
    assert rtc.io_read(1, 1) == 20


def test_rtc_alarm_sets_flags_raises_irq8_and_wakes_until_register_c_is_read():
    irq, woke = [], []
    rtc = CmosRtc(irq=irq.append, on_alarm=lambda: woke.append(1), clock=lambda: 1700000000.0)
    for reg in (1, 3, 5):
        rtc.io_write(0, 1, reg)
        rtc.io_write(1, 1, 0xC0)
    rtc.io_write(0, 1, 0x0B)
    rtc.io_write(1, 1, rtc.io_read(1, 1) | B_AIE)
    rtc.tick(0x10 | (C_AF if rtc._alarm_matches() else 0))
    assert irq == [1] and woke == [1]
    rtc.io_write(0, 1, 0x0C)
    assert rtc.io_read(1, 1) & (C_IRQF | C_AF) == C_IRQF | C_AF
    assert irq == [1, 0] and rtc.io_read(1, 1) == 0


def test_rtc_uip_is_set_just_before_the_second_turns():
    now = [100.995]
    rtc = CmosRtc(clock=lambda: now[0])
    rtc.io_write(0, 1, 0x0A)
    assert rtc.io_read(1, 1) & 0x80
    now[0] = 100.5
    assert not rtc.io_read(1, 1) & 0x80


@given(st.integers(0, 99))
def test_bcd_round_trip(v):
    assert from_bcd(to_bcd(v)) == v


def test_rtc_thread_outlives_an_interrupt_that_fails_and_caps_its_rate(capfd):
    raised = []
    done = threading.Event()

    def irq(level):
        if level:
            raised.append(level)
            if len(raised) == 1:
                raise OSError(1, "delivery failed")
            if len(raised) >= 3:
                done.set()
    rtc = CmosRtc(irq=irq)
    rtc.io_write(0, 1, 0x0A)
    rtc.io_write(1, 1, 0x23)                       # rate 3: 8192 Hz, stretched to MAX_PERIODIC_HZ
    rtc.io_write(0, 1, 0x0B)
    rtc.io_write(1, 1, 0x42)                       # PIE
    rtc.io_start()
    try:
        assert done.wait(10)
    finally:
        rtc.io_suspend()
    assert rtc.guard.failures == 1 and "rtc: internal error in the device's thread" in capfd.readouterr().err
    from pykvm.devices.rtc import MAX_PERIODIC_HZ
    assert MAX_PERIODIC_HZ < periodic_hz(0x23)


def test_periodic_rates():
    assert periodic_hz(0x26) == 1024 and periodic_hz(0x20) == 0 and periodic_hz(0x2F) == 2


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 0xFF)), max_size=60))
def test_rtc_any_port_writes_stay_in_bounds(writes):
    rtc = CmosRtc(clock=lambda: 1700000000.0)
    for off, v in writes:
        rtc.io_write(off, 1, v)
        assert 0 <= rtc.io_read(off, 1) <= 0xFF
    assert len(rtc.ram) == 128 and 0 <= rtc.index < 128


# ------------------------------------------------------------------ descriptions and registry
@pytest.mark.parametrize("name", ["pc-testdev", "pc-testdev-irq", "ioapic", "acpi-pm", "rtc"])
def test_every_new_device_has_a_description_that_fits_its_model(name):
    ctx = registry.DeviceContext()
    dev = registry.lookup(name).make(ctx, {})
    desc = description.for_device(dev)
    assert desc is not None
    desc.check_ranges(dev)


def test_register_arrays_expand_and_are_bounded():
    text = ('name = "x"\nsummary = ""\n[[registers]]\nname = "r"\nspace = "mmio"\noffset = 0\nwidth = 8\n'
            'count = 3\naccess = "rw"\nscope = "local"\ntrusted = { action = "allow" }\n'
            'untrusted = { action = "allow" }\n')
    d = description.parse(text)
    assert [(r.name, r.offset) for r in d.registers] == [("r.0", 0), ("r.1", 8), ("r.2", 16)]
    with pytest.raises(description.DescriptionError):
        description.parse(text.replace("count = 3", "count = 0"))
    with pytest.raises(description.DescriptionError):
        description.parse(text.replace("count = 3", "count = 99999"))


# ------------------------------------------------------------------ S3 resume state
class _CffiVcpu:
    """Just the sregs/regs a real vCPU hands out: cffi structs, whose field reads are fresh objects each time."""

    def __init__(self):
        from pykvm.kvm import ffi
        self.sregs, self.regs = ffi.new("struct kvm_sregs *"), ffi.new("struct kvm_regs *")
        self.sregs.cr0, self.sregs.efer, self.regs.rip = 0x80000011, 0x500, 0xFFFF800000001234

    def get_sregs(self):
        return self.sregs

    def get_regs(self):
        return self.regs

    def set_sregs(self, s):
        self.sregs = s

    def set_regs(self, r):
        self.regs = r


@given(st.integers(1, 0xFFFFF))
def test_resume_lands_at_the_waking_vector_with_flat_data_segments(vector):
    from pykvm.boot.cpu import SEG_CODE, SEG_DATA, real_mode_reset
    v = _CffiVcpu()
    real_mode_reset(v, vector)
    s = v.sregs
    assert (s.cs.selector, s.cs.base, s.cs.type) == (vector >> 4, (vector >> 4) << 4, SEG_CODE)
    assert s.cs.base + v.regs.rip == vector
    for seg in (s.ds, s.es, s.ss, s.fs, s.gs):     # the resume code addresses low memory from DS 0
        assert (seg.selector, seg.base, seg.type, seg.limit) == (0, 0, SEG_DATA, 0xFFFF)
    assert s.cr0 & 0x80000001 == 0 and s.efer == 0 and v.regs.rflags == 2


# ------------------------------------------------------------------ 8259 PIC pair
from pykvm.devices.i8259 import I8259, PicPair  # noqa: E402


def _init_pair(pair, master_base=0x20, slave_base=0x28, aeoi=False):
    """The ICW1-4 sequence Linux's init_8259A writes."""
    for chip, base, icw3 in ((pair.master, master_base, 0x04), (pair.slave, slave_base, 0x02)):
        pair.write(chip, 0, 0x11)
        pair.write(chip, 1, base)
        pair.write(chip, 1, icw3)
        pair.write(chip, 1, 0x03 if aeoi else 0x01)


def test_pic_starts_as_firmware_leaves_it_and_delivers_irq11_at_0x73():
    woke = []
    pic = I8259(notify=lambda: woke.append(1))
    pair = pic.pair
    pair.set_irq(11, 1)
    pair.set_irq(11, 0)                      # an edge stays latched after the line drops
    assert pair.output and woke == [1]
    assert pair.ack() == 0x73
    assert not pair.output
    pair.write(pair.slave, 0, 0x0B)          # OCW3: read ISR
    assert pair.read(pair.slave, 0) == 1 << 3
    pair.write(pair.slave, 0, 0x20)          # non-specific EOI to both chips
    pair.write(pair.master, 0, 0x20)
    assert pair.read(pair.slave, 0) == 0 and pair.master.isr == 0


def test_pic_icw_sequence_sets_bases_clears_masks_and_priority_holds_lower_irqs():
    pair = PicPair()
    pair.write(pair.master, 1, 0xFF)
    _init_pair(pair)
    assert pair.read(pair.master, 1) == 0     # ICW1 clears the mask
    pair.set_irq(3, 1)
    pair.set_irq(1, 1)
    assert pair.ack() == 0x21                 # IRQ 1 outranks IRQ 3
    assert not pair.output                    # IRQ 3 waits behind IRQ 1 in service
    pair.write(pair.master, 0, 0x61)          # specific EOI of level 1
    assert pair.ack() == 0x23
    pair.write(pair.master, 1, 0xFF)
    pair.set_irq(4, 1)
    assert not pair.output and pair.ack() == 0x27   # masked: an acknowledge gets the spurious vector


def test_pic_poll_and_aeoi():
    pair = PicPair()
    _init_pair(pair, aeoi=True)
    pair.set_irq(8, 1)
    assert pair.ack() == 0x28 and pair.master.isr == pair.slave.isr == 0
    pair.set_irq(5, 1)
    pair.write(pair.master, 0, 0x0C)          # OCW3 poll
    assert pair.read(pair.master, 0) == 0x85 and not pair.output


@given(st.lists(st.tuples(st.sampled_from(["m", "s"]), st.integers(0, 1), st.integers(0, 0xFFFF)), max_size=40),
       st.lists(st.tuples(st.integers(-2, 20), st.integers(0, 1)), max_size=20))
def test_pic_registers_stay_in_range_whatever_the_guest_writes(writes, lines):
    pair = PicPair()
    for chip, port, value in writes:
        pair.write(pair.master if chip == "m" else pair.slave, port, value)
    for line, level in lines:
        pair.set_irq(line, level)
    for chip in (pair.master, pair.slave):
        assert all(0 <= getattr(chip, k) <= 0xFF for k in ("irr", "isr", "imr", "lines"))
        assert chip.vector_base & 7 == 0 and chip.init_step in (0, 2, 3, 4)
    if pair.output:
        assert 0 <= pair.ack() <= 0xFF
    assert pair.output == (pair.master.pending() is not None)


def test_pic_state_round_trips_and_bounds_what_it_loads():
    a = I8259()
    _init_pair(a.pair)
    a.pair.set_irq(6, 1)
    b = I8259()
    b.set_state(a.get_state())
    assert b.get_state() == a.get_state() and b.pair.output
    b.set_state({"irr": 1 << 40, "vector_base": 0x1FF, "init_step": 9})
    assert b.chip.irr == 0 and b.chip.vector_base == 0xF8 and b.chip.init_step == 0


@pytest.mark.kvm
def test_pic_beside_the_in_kernel_irqchip_is_a_one_line_config_error():
    from pykvm import errors

    from .helpers import pykvm
    r = pykvm("run", "hello", "--irqchip", "full", "--device", "pic", "--timeout", "20")
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == errors.EXIT_DEVICE_CONFIG and len(lines) == 1 and "has its own PIC" in lines[0]
    r = pykvm("run", "hello", "--device", "pic", "--timeout", "20")
    assert r.returncode == 0 and b"Hello from pykvm!" in r.stdout


# ------------------------------------------------------------------ 8254 PIT
from pykvm.devices.i8254 import MIN_PERIOD, PIT_HZ, Pit  # noqa: E402


def test_pit_counts_down_from_the_loaded_count_and_latches():
    now = [0]
    pit = Pit(clock=lambda: now[0])
    pit.io_write(3, 1, 0x34)                       # counter 0, low then high byte, mode 2
    pit.io_write(0, 1, 0x9C)
    pit.io_write(0, 1, 0x2E)                       # 11932: a 100 Hz rate generator
    now[0] = 1_000_000                             # 1 ms = 1193 ticks
    assert pit.io_read(0, 1) | pit.io_read(0, 1) << 8 == 11932 - 1193
    pit.io_write(3, 1, 0x00)                       # counter latch: later reads keep the latched count
    now[0] = 2_000_000
    assert pit.io_read(0, 1) | pit.io_read(0, 1) << 8 == 11932 - 1193
    assert pit.io_read(0, 1) | pit.io_read(0, 1) << 8 == 11932 - 2386
    pit.io_write(3, 1, 0xE2)                       # read-back: status of counter 0
    assert pit.io_read(0, 1) == 0b10110100
    assert pit.period() is None                    # no IRQ wiring, no interrupts


def test_pit_counter_0_pulses_irq0_periodically_and_stops_on_release():
    levels = []
    done = threading.Event()

    def irq(level):
        levels.append(level)
        if len(levels) >= 6:
            done.set()
    pit = Pit(irq=irq)
    pit.io_write(3, 1, 0x36)                       # mode 3, word access
    pit.io_write(0, 1, 0)
    pit.io_write(0, 1, 0)                          # 0 = 65536: 18.2 Hz
    assert abs(pit.period() - 65536 / PIT_HZ) < 1e-9
    pit.io_write(0, 1, 0x10)
    pit.io_write(0, 1, 0x00)                       # 16 ticks: stretched to MIN_PERIOD
    assert pit.period() == MIN_PERIOD
    assert done.wait(5)
    pit.release_hardware()
    assert levels[:6] == [1, 0, 1, 0, 1, 0]


def test_pit_thread_outlives_an_interrupt_that_fails(capfd):
    # Issue 19: an IRQ 0 delivery that raised (KVM refusing an MSI the guest aimed at nobody) killed the
    # timer thread with a traceback, and the VM ran on with a dead clock.
    pulses = []
    done = threading.Event()

    def irq(level):
        pulses.append(level)
        if len(pulses) == 1:
            raise OSError(1, "delivery failed")
        if len(pulses) >= 5:
            done.set()
    pit = Pit(irq=irq)
    pit.io_write(3, 1, 0x34)                       # mode 2
    pit.io_write(0, 1, 0x10)
    pit.io_write(0, 1, 0x00)
    try:
        assert done.wait(10)
    finally:
        pit.release_hardware()
    assert pit.guard.failures == 1 and pulses[:3] == [1, 0, 1]   # the failed rise still fell
    err = capfd.readouterr().err
    assert "pit: internal error in the device's thread" in err and "delivery failed" in err


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 0xFFFF)), max_size=60), st.integers(0, 10 ** 12))
def test_pit_reads_are_bytes_whatever_the_guest_programs(writes, t):
    now = [0]
    pit = Pit(clock=lambda: now[0])
    for port, value in writes:
        pit.io_write(port, 1, value)
    now[0] = t
    for port in range(4):
        assert 0 <= pit.io_read(port, 1) <= 0xFF
    for c in pit.counters:
        assert 1 <= c.reload <= 0x10000 and 0 <= c.mode <= 5 and 0 <= c.access <= 3
    p = pit.period()
    assert p is None
    b = Pit(clock=lambda: now[0])
    b.set_state(pit.get_state())
    assert b.get_state() == pit.get_state()


@pytest.mark.parametrize("offset", [float("inf"), float("nan"), 1e300, -1e15, 1e15])
def test_rtc_state_file_offset_outside_a_clock_year_is_refused(offset):
    """A state file's time offset the guest could never have set is refused at restore, not left to crash a read."""
    rtc = CmosRtc(clock=lambda: 1700000000.5)
    with pytest.raises(ValueError):
        rtc.set_state({"ram": "", "index": 0, "offset": offset})
    for reg in (0, 9, 0x32):                             # still readable: the bad offset was not kept
        rtc.io_write(0, 1, reg)
        assert 0 <= rtc.io_read(1, 1) <= 0xFF


def test_rtc_state_offset_the_guest_can_reach_is_restored():
    """Years 0 and 9999 (century 0 / 99 writes) survive a save and restore."""
    for century, year in ((0x00, 0x01), (0x99, 0x99)):
        rtc = CmosRtc(clock=lambda: 1700000000.5)
        for reg, v in ((0x32, century), (9, year)):
            rtc.io_write(0, 1, reg)
            rtc.io_write(1, 1, v)
        again = CmosRtc(clock=lambda: 1700000000.5)
        again.set_state(rtc.get_state())
        again.io_write(0, 1, 9)
        assert again.io_read(1, 1) == year
