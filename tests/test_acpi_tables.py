"""ACPI tables: built for random topologies, placed in a memory image, and read back by an independent parser."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.boot import acpi
from pykvm.boot.acpi import aml, fadt
from pykvm.boot.acpi.topology import InterruptOverride, Node, Platform, Topology
from pykvm.errors import ImageDoesNotFitError, UsageError

from . import acpi_parse

PAGE = 4096


class Image:
    """A sparse guest-physical memory that tables are written into and read back from."""

    def __init__(self):
        self.bytes = bytearray(abi.PYKVM_ACPI_END)

    def write(self, gpa, data):
        assert gpa + len(data) <= len(self.bytes)
        self.bytes[gpa:gpa + len(data)] = data

    def read(self, gpa, length):
        assert 0 <= gpa and gpa + length <= len(self.bytes), f"read {gpa:#x}+{length} outside the image"
        return bytes(self.bytes[gpa:gpa + length])


@st.composite
def topologies(draw, max_cpus=64, max_nodes=8):
    n_cpus = draw(st.integers(1, max_cpus))
    if draw(st.booleans()):
        apic_ids = tuple(range(n_cpus))
    else:   # sparse ids, some above 254 so x2APIC entries appear
        apic_ids = tuple(draw(st.lists(st.integers(0, 0xFFFFFFFE), min_size=n_cpus, max_size=n_cpus, unique=True)))
    if draw(st.booleans()):
        return Topology(apic_ids)
    n_nodes = draw(st.integers(1, max_nodes))
    owner = draw(st.lists(st.integers(0, n_nodes - 1), min_size=n_cpus, max_size=n_cpus))
    # lay ranges out back to back with gaps, then deal them to nodes as plain or hot-pluggable
    n_ranges = draw(st.integers(0, 3 * n_nodes))
    spans, cursor = [], 0
    for _ in range(n_ranges):
        cursor += draw(st.integers(0, 1 << 20)) * PAGE
        length = draw(st.integers(1, 1 << 22)) * PAGE
        spans.append((cursor, length, draw(st.integers(0, n_nodes - 1)), draw(st.booleans())))
        cursor += length
    nodes = tuple(Node(cpus=tuple(c for c in range(n_cpus) if owner[c] == n),
                       memory=tuple((b, l) for b, l, o, hp in spans if o == n and not hp),
                       hotplug=tuple((b, l) for b, l, o, hp in spans if o == n and hp))
                  for n in range(n_nodes))
    distances = None
    if draw(st.booleans()):
        distances = tuple(tuple(10 if i == j else draw(st.integers(11, 255)) for j in range(n_nodes))
                          for i in range(n_nodes))
    return Topology(apic_ids, nodes, distances)


@st.composite
def platforms(draw):
    port = st.integers(1, 0xFFFF)
    return Platform(ioapic=draw(st.booleans()), ioapic_id=draw(st.integers(0, 255)), pic=draw(st.booleans()),
                    overrides=tuple(InterruptOverride(draw(st.integers(0, 15)), draw(st.integers(0, 23)),
                                                      draw(st.sampled_from((0, 1, 3))), draw(st.sampled_from((0, 1, 3))))
                                    for _ in range(draw(st.integers(0, 4)))),
                    sci_irq=draw(st.integers(0, 23)), pm1a_evt=draw(port), pm1a_cnt=draw(port),
                    pm_timer=draw(st.integers(0, 0xFFFF)), s3=draw(st.booleans()), i8042=draw(st.booleans()),
                    vga=draw(st.booleans()), cmos_rtc=draw(st.booleans()))


def build_and_read(topo, platform):
    tables = acpi.build_tables(topo, platform)
    img = Image()
    acpi.write_tables(img, tables)
    return tables, acpi_parse.parse(img.read)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topologies(), platforms())
def test_tables_read_back_as_built(topo, platform):
    tables, got = build_and_read(topo, platform)
    assert got.rsdp_addr == tables.rsdp_addr == abi.PYKVM_ACPI_RSDP_ADDR
    assert got.xsdt == got.rsdt, "XSDT and RSDT must list the same tables"
    want = [b"FACP", b"APIC"] + ([b"SRAT", b"SLIT"] if topo.nodes else [])
    assert [got.tables[s][0] for s in want] == got.xsdt
    # every table inside the ACPI area, aligned, none overlapping another
    spans = sorted((a, a + len(d)) for a, d in got.tables.values())
    for (a0, e0), (a1, _) in zip(spans, spans[1:]):
        assert e0 <= a1
    assert spans[0][0] >= abi.PYKVM_ACPI_TABLES_ADDR and spans[-1][1] <= abi.PYKVM_ACPI_END
    assert all(a % 16 == 0 for a, _ in spans)

    m = acpi_parse.madt(got.tables[b"APIC"][1])
    assert m["lapic_addr"] == abi.PYKVM_LAPIC_BASE
    assert m["flags"] == (1 if platform.pic else 0)
    assert m["cpus"] == [(uid, apic, 1) for uid, apic in enumerate(topo.apic_ids)]
    assert m["ioapics"] == ([(platform.ioapic_id, platform.ioapic_addr, 0)] if platform.ioapic else [])
    assert m["overrides"] == [(0, o.source, o.gsi, o.polarity | o.trigger << 2) for o in platform.overrides]

    f = acpi_parse.fadt(got.tables[b"FACP"][1])
    assert (f["sci"], f["pm1a_evt"], f["pm1a_cnt"], f["pm_tmr"]) == (platform.sci_irq, platform.pm1a_evt,
                                                                      platform.pm1a_cnt, platform.pm_timer)
    assert f["x_pm1a_evt"] == dict(space=1, width=32, access=2, addr=platform.pm1a_evt)
    assert f["x_pm1a_cnt"] == dict(space=1, width=16, access=2, addr=platform.pm1a_cnt)
    assert f["x_pm_tmr"]["addr"] == platform.pm_timer and f["tmr_len"] == (4 if platform.pm_timer else 0)
    assert not f["flags"] & (1 << 20), "HW_REDUCED_ACPI must be off"
    assert bool(f["boot_arch"] & 2) == platform.i8042

    dsdt = got.tables[b"DSDT"][1]
    assert acpi_parse.sleep_package(dsdt, b"_S5_") == [0, 0, 0, 0]
    assert acpi_parse.sleep_package(dsdt, b"_S3_") == ([1, 1, 0, 0] if platform.s3 else None)

    if not topo.nodes:
        assert b"SRAT" not in got.tables and b"SLIT" not in got.tables
        return
    s = acpi_parse.srat(got.tables[b"SRAT"][1])
    assert s["cpus"] == {topo.apic_ids[c]: (n, 1) for n, node in enumerate(topo.nodes) for c in node.cpus}
    want_mem = sorted([(n, b, l, 1) for n, node in enumerate(topo.nodes) for b, l in node.memory]
                      + [(n, b, l, 3) for n, node in enumerate(topo.nodes) for b, l in node.hotplug])
    assert sorted(s["memory"]) == want_mem
    assert acpi_parse.slit(got.tables[b"SLIT"][1]) == [list(r) for r in topo.distance_matrix()]


@settings(max_examples=30, deadline=None)
@given(topologies(max_cpus=16, max_nodes=4), platforms())
def test_same_inputs_same_bytes(topo, platform):
    assert acpi.build_tables(topo, platform) == acpi.build_tables(topo, platform)


def test_default_topology_has_no_numa_tables():
    tables, got = build_and_read(acpi.default_topology(4), Platform())
    assert sorted(got.tables) == [b"APIC", b"DSDT", b"FACP", b"FACS", b"RSDT", b"XSDT"]
    assert [c[1] for c in acpi_parse.madt(got.tables[b"APIC"][1])["cpus"]] == [0, 1, 2, 3]


def test_default_distances_are_10_and_20():
    topo = Topology((0, 1, 2), (Node((0,)), Node((1,)), Node((2,))))
    _, got = build_and_read(topo, Platform())
    assert acpi_parse.slit(got.tables[b"SLIT"][1]) == [[10, 20, 20], [20, 10, 20], [20, 20, 10]]


def test_full_irqchip_platform_matches_kvm_routing():
    p = acpi.platform_for_irqchip("full")
    m = acpi_parse.madt(build_and_read(acpi.default_topology(1), p)[1].tables[b"APIC"][1])
    assert m["flags"] == 1 and m["ioapics"] == [(0, 0xFEC00000, 0)]
    assert m["overrides"] == [(0, 0, 2, 0), (0, 9, 9, 0xD)]   # PIT on pin 2; SCI level, active high
    assert acpi.platform_for_irqchip("split") == Platform()


def test_large_domain_numbers_split_in_cpu_affinity():
    # proximity domains above 255 use the high 24 bits of the xAPIC affinity entry
    nodes = tuple(Node(() if n else (0,)) for n in range(acpi.topology.MAX_NODES))
    _, got = build_and_read(Topology((7,), nodes), Platform())
    assert acpi_parse.srat(got.tables[b"SRAT"][1])["cpus"] == {7: (0, 1)}


BAD = [
    (Topology(()), "1..255 vCPUs"),
    (Topology(tuple(range(256))), "1..255 vCPUs"),
    (Topology((0, 0)), "share an APIC id"),
    (Topology((0xFFFFFFFF,)), "APIC id of vCPU 0"),
    (Topology((0, 1), (Node((0,)),)), "vCPU 1 is in no node"),
    (Topology((0, 1), (Node((0, 1)), Node((1,)))), "vCPU 1 is in node 0 and node 1"),
    (Topology((0,), (Node((5,)),)), "node 0 vCPU"),
    (Topology((0,), (Node((0,), ((0, 8192),)), Node((), (), ((4096, 4096),)))), "overlaps"),
    (Topology((0,), (Node((0,), ((0x1000, 0x800),)),)), "length"),
    (Topology((0,), (Node((0,), ((0x1800, 0x1000),)),)), "not page-aligned"),
    (Topology((0,), (Node((0,), ((0, 4096, 1),)),)), "not a (base, length) pair"),
    (Topology((0,), (Node((0,)), Node(())), ((10, 20), (20, 11))), "to itself"),
    (Topology((0,), (Node((0,)), Node(())), ((10, 10), (20, 10))), "distance 0->1"),
    (Topology((0,), (Node((0,)), Node(())), ((10, 20), (256, 10))), "distance 1->0"),
    (Topology((0,), (Node((0,)), Node(())), ((10, 20),)), "2x2"),
    (Topology((0,), (), ((10,),)), "needs nodes"),
    (Topology((0,), tuple(Node(() if n else (0,)) for n in range(65))), "at most 64 nodes"),
]


@pytest.mark.parametrize("topo, match", BAD)
def test_bad_topologies_are_one_line_usage_errors(topo, match):
    with pytest.raises(UsageError, match=re.escape(match)) as e:
        acpi.build_tables(topo, Platform())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("platform, match", [
    (Platform(pm1a_cnt=0), "PM1a control"),
    (Platform(pm_timer=0x10000), "PM timer"),
    (Platform(sci_irq=-1), "SCI"),
    (Platform(overrides=(InterruptOverride(16, 2),)), "source IRQ"),
    (Platform(overrides=(InterruptOverride(0, 2, polarity=2),)), "polarity"),
    (Platform(ioapic_addr=0x1_0000_0000), "IOAPIC address"),
])
def test_bad_platforms_are_usage_errors(platform, match):
    with pytest.raises(UsageError, match=match):
        acpi.build_tables(acpi.default_topology(1), platform)


def test_tables_that_do_not_fit_are_refused():
    with pytest.raises(ImageDoesNotFitError, match="ACPI tables need more"):
        acpi.build_tables(acpi.default_topology(255), Platform(), limit=abi.PYKVM_ACPI_TABLES_ADDR + 0x400)


def test_biggest_topology_fits_the_area():
    nodes = tuple(Node(tuple(range(n, 255, 64)), tuple((((n * 64 + r) << 30), 1 << 30) for r in range(16)),
                       tuple((((n * 64 + 32 + r) << 30), 1 << 30) for r in range(16))) for n in range(64))
    tables, got = build_and_read(Topology(tuple(range(1000, 1255)), nodes), acpi.platform_for_irqchip("full"))
    assert len(acpi_parse.srat(got.tables[b"SRAT"][1])["memory"]) == 64 * 32


def test_acpi_area_is_where_kernels_scan():
    assert abi.PYKVM_ACPI_RSDP_ADDR % 16 == 0 and 0xE0000 <= abi.PYKVM_ACPI_RSDP_ADDR < 0x100000
    assert abi.PYKVM_ACPI_RSDP_ADDR + 36 <= abi.PYKVM_ACPI_TABLES_ADDR < abi.PYKVM_ACPI_END <= 0x100000
    assert abi.PYKVM_ACPI_TABLES_ADDR % 64 == 0   # the FACS comes first and must be 64-byte aligned
    assert abi.PYKVM_ACPI_RSDP_ADDR >= abi.PYKVM_FW_END


# ---- AML encoding ----------------------------------------------------------

def _decode_pkg_length(data: bytes) -> tuple[int, int]:
    lead = data[0]
    extra = lead >> 6
    if not extra:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@given(st.integers(0, (1 << 28) - 5))
def test_pkg_length_round_trips(body_len):
    enc = aml.pkg_length(body_len)
    value, size = _decode_pkg_length(enc)
    assert size == len(enc) and value == body_len + len(enc)
    assert len(enc) == 1 or value >= 0x40   # shortest form: one byte whenever it fits


@given(st.integers(0, (1 << 64) - 1))
def test_integers_use_the_shortest_prefix(v):
    enc = aml.integer(v)
    if v in (0, 1):
        assert enc == bytes([v])
    else:
        size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[enc[0]]
        assert len(enc) == 1 + size and int.from_bytes(enc[1:], "little") == v
        assert size == 1 or v >= 1 << (4 * size)


def test_dsdt_aml_bytes():
    assert aml.dsdt(Platform())[36:] == bytes.fromhex("08 5f53355f 12 06 04 00 00 00 00")
    assert aml.dsdt(Platform(s3=True))[36:48] == bytes.fromhex("08 5f53335f 12 06 04 01 01 00 00")


def test_bad_aml_names_are_refused():
    with pytest.raises(ValueError):
        aml.name(b"_s5_", aml.integer(0))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=6), st.text(alphabet="AZ_09az\n\xc1 ", max_size=6).map(str.encode)))
def test_aml_name_segments_are_the_pattern_without_re(seg):
    assert aml.is_name_seg(seg) == bool(re.fullmatch(rb"[A-Z_][A-Z0-9_]{3}", seg))


def test_facs_layout():
    facs = fadt.facs()
    assert len(facs) == 64 and facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    assert struct.unpack_from("<IQ", facs, 12)[0] == 0 and facs[32] == 2
