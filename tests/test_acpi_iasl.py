"""ACPI tables checked by a parser nobody here wrote: ACPICA's `iasl -d` (and `acpiexec` for the AML).

Each table is disassembled; the test asserts iasl reported nothing wrong, reads the fields
back out of the disassembly and compares them with the topology, then recompiles the
disassembly with iasl and checks it reproduces our bytes. iasl cannot take an RSDP from a
file (it wants a table header), so the RSDP is checked by tests/acpi_parse.py and the
`acpi` guest instead. Needs acpica-tools (.ci/run installs it): skipped locally without
it, a failure in CI.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings

from pykvm.boot import acpi
from pykvm.boot.acpi import InterruptOverride, Node, Platform, Topology

from .conftest import require_tool
from .test_acpi_tables import platforms, topologies

FIELD = re.compile(r"^(?:\[[0-9A-F]+h \d+\s+\d+\])?\s+(\S.*?) : (.*)$")   # decoded flag bits have no offset
PROBLEMS = re.compile(r"warning|error|invalid|incorrect|\*\*\*\*|unknown|terminates early", re.I)
GIB = 1 << 30

# Header bytes iasl rewrites when it recompiles: the checksum and the compiler id/revision.
REWRITTEN = {9} | set(range(28, 36))

NUMA = Topology(apic_ids=(0, 1, 2, 3, 300, 301),
                nodes=(Node((0, 1), ((0, 2 * GIB),), ((8 * GIB, 4 * GIB),)),
                       Node((2, 3), ((2 * GIB, GIB), (4 * GIB, GIB))),
                       Node((4, 5), ((5 * GIB, GIB),), ((12 * GIB, 2 * GIB), (16 * GIB, GIB)))),
                distances=((10, 16, 32), (16, 10, 21), (32, 21, 10)))
PLATFORM = Platform(ioapic=True, pic=True, overrides=(InterruptOverride(0, 2), InterruptOverride(9, 9, 1, 3)),
                    sci_irq=9, pm1a_evt=0xB000, pm1a_cnt=0xB004, pm_timer=0xB008, s3=True, i8042=True)


@pytest.fixture(scope="module")
def iasl():
    return require_tool("iasl")


def disassemble(iasl: str, tmp_path, data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Run `iasl -d` on one table; returns the .dsl text and its (field, value) pairs, in order."""
    sig = data[:4].decode()
    src = tmp_path / f"{sig}.dat"
    src.write_bytes(data)
    r = subprocess.run([iasl, "-d", src.name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    dsl = (tmp_path / f"{sig}.dsl").read_text()
    body = dsl.split("Raw Table Data")[0]
    for text in (r.stdout + r.stderr, body):
        bad = [line for line in text.splitlines() if PROBLEMS.search(line)]
        assert r.returncode == 0 and not bad, f"iasl -d {sig}: {bad or r.returncode}"
    fields = [(m.group(1).strip(), m.group(2).strip()) for m in map(FIELD.match, body.splitlines()) if m]
    return dsl, fields


def recompile(iasl: str, tmp_path, data: bytes) -> bytes:
    """Compile the .dsl that `iasl -d` wrote back into a binary table."""
    sig = data[:4].decode()
    out = tmp_path / f"{sig}.aml"
    out.unlink(missing_ok=True)
    r = subprocess.run([iasl, f"{sig}.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "0 Errors" in r.stdout, f"iasl recompiling {sig}: {r.stdout}{r.stderr}"
    return out.read_bytes()


def hexval(v: str) -> int:
    """A field value as iasl prints it: hex digits, maybe followed by a [description]."""
    return int(v.split()[0], 16)


def subtables(fields):
    """Split a table's fields into its subtables (lists starting at each "Subtable Type")."""
    out = []
    for name, value in fields:
        if name == "Subtable Type":
            out.append({})
        if out:
            out[-1].setdefault(name, value)
    return out


def check_all(iasl, tmp_path, topo: Topology, platform: Platform) -> None:
    """Disassemble every table, compare fields with the inputs, and recompile each to our bytes."""
    tables = acpi.build_tables(topo, platform)
    addr_of = {sig: a for a, sig, _ in tables.tables}
    seen = {}
    for _, sig, data in tables.tables[1:]:
        dsl, fields = disassemble(iasl, tmp_path, data)
        first = {}
        for name, value in fields:
            first.setdefault(name, value)
        seen[sig] = (dsl, fields, first)
        again = recompile(iasl, tmp_path, data)
        assert len(again) == len(data), f"{sig!r}: iasl's recompiled table has another length"
        diff = [i for i in range(len(data)) if again[i] != data[i] and not (sig != b"FACS" and i in REWRITTEN)]
        assert not diff, f"{sig!r}: iasl's recompiled bytes differ at offsets {diff[:8]}"

    # MADT: every LAPIC by APIC id with processor UID = vCPU index, the IOAPIC, the overrides
    subs = subtables(seen[b"APIC"][1])
    cpus = [(hexval(s.get("Processor ID") or s["Processor UID"]),
             hexval(s.get("Local Apic ID") or s["Processor x2Apic ID"]))
            for s in subs if hexval(s["Subtable Type"]) in (0, 9)]
    assert cpus == list(enumerate(topo.apic_ids))
    ioapics = [hexval(s["Address"]) for s in subs if hexval(s["Subtable Type"]) == 1]
    assert ioapics == ([platform.ioapic_addr] if platform.ioapic else [])
    overrides = [(hexval(s["Source"]), hexval(s["Interrupt"])) for s in subs if hexval(s["Subtable Type"]) == 2]
    assert overrides == [(o.source, o.gsi) for o in platform.overrides]
    assert hexval(seen[b"APIC"][2]["Flags (decoded below)"]) == int(platform.pic)

    # FADT: ports and pointers, full (not hardware-reduced) ACPI
    f = seen[b"FACP"][2]
    assert hexval(f["PM1A Event Block Address"]) == platform.pm1a_evt
    assert hexval(f["PM1A Control Block Address"]) == platform.pm1a_cnt
    assert hexval(f["PM Timer Block Address"]) == platform.pm_timer
    assert hexval(f["SCI Interrupt"]) == platform.sci_irq
    assert hexval(f["FACS Address"]) == addr_of[b"FACS"] and hexval(f["DSDT Address"]) == addr_of[b"DSDT"]
    assert f["Hardware Reduced (V5)"] == "0"
    fadt_fields = seen[b"FACP"][1]
    assert [hexval(v) for n, v in fadt_fields if n == "DSDT Address"] == [addr_of[b"DSDT"]] * 2   # DSDT and X_DSDT
    assert hexval(seen[b"FACS"][2]["32 Firmware Waking Vector"]) == 0

    # XSDT and RSDT list the same tables
    listed = [sig for sig in (b"FACP", b"APIC", b"SRAT", b"SLIT") if sig in addr_of]
    for root in (b"XSDT", b"RSDT"):
        assert [hexval(v) for n, v in seen[root][1] if n.startswith("ACPI Table Address")] == \
            [addr_of[s] for s in listed]

    dsdt = seen[b"DSDT"][0]
    assert re.search(r"Name \(_S5, Package \(0x04\)\s*// _S5_: S5 System State\s*\{\s*Zero,\s*Zero,", dsdt)
    assert ("Name (_S3" in dsdt) == platform.s3

    if not topo.nodes:
        assert b"SRAT" not in addr_of and b"SLIT" not in addr_of
        return
    # SRAT: each APIC id in its node's proximity domain; memory ranges with enabled/hot-pluggable flags
    domain = {topo.apic_ids[c]: n for n, node in enumerate(topo.nodes) for c in node.cpus}
    got_cpus, got_mem = {}, []
    for s in subtables(seen[b"SRAT"][1]):
        kind = hexval(s["Subtable Type"])
        if kind == 0:
            got_cpus[hexval(s["Apic ID"])] = hexval(s["Proximity Domain Low(8)"]) | \
                hexval(s["Proximity Domain High(24)"]) << 8
        elif kind == 2:
            got_cpus[hexval(s["Apic ID"])] = hexval(s["Proximity Domain"])
        elif kind == 1:
            got_mem.append((hexval(s["Proximity Domain"]), hexval(s["Base Address"]), hexval(s["Address Length"]),
                            s["Enabled"], s["Hot Pluggable"]))
    assert got_cpus == domain
    want = [(n, b, l, "1", "0") for n, node in enumerate(topo.nodes) for b, l in node.memory]
    want += [(n, b, l, "1", "1") for n, node in enumerate(topo.nodes) for b, l in node.hotplug]
    assert sorted(got_mem) == sorted(want)
    # SLIT: the matrix, row by row
    slit = seen[b"SLIT"][1]
    assert hexval(seen[b"SLIT"][2]["Localities"]) == len(topo.nodes)
    rows = [[int(x, 16) for x in v.split()] for n, v in slit if n.startswith("Locality ")]
    assert rows == [list(r) for r in topo.distance_matrix()]


def test_numa_tables_pass_iasl(iasl, tmp_path):
    check_all(iasl, tmp_path, NUMA, PLATFORM)


def test_default_guest_tables_pass_iasl(iasl, tmp_path):
    check_all(iasl, tmp_path, acpi.default_topology(4), Platform())


def test_full_irqchip_tables_pass_iasl(iasl, tmp_path):
    check_all(iasl, tmp_path, acpi.default_topology(255), acpi.platform_for_irqchip("full"))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(topologies(max_cpus=64, max_nodes=8), platforms())
def test_random_topologies_pass_iasl(iasl, tmp_path, topo, platform):
    check_all(iasl, tmp_path, topo, platform)


def test_acpiexec_loads_the_tables_and_evaluates_sleep_states(tmp_path):
    """ACPICA's own runtime (the code Linux uses) loads the tables and evaluates \\_S3 and \\_S5."""
    acpiexec = require_tool("acpiexec")
    tables = acpi.build_tables(NUMA, PLATFORM)
    names = []
    for _, sig, data in tables.tables[1:]:
        if sig not in (b"XSDT", b"RSDT"):   # acpiexec builds its own root tables around the rest
            names.append(f"{sig.decode().lower()}.dat")
            (tmp_path / names[-1]).write_bytes(data)
    r = subprocess.run([acpiexec, "-b", "evaluate \\_S5; evaluate \\_S3", *names], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert not re.search(r"ACPI (Error|Warning)|Firmware Warning|Incorrect checksum", out), out
    assert "1 ACPI AML tables successfully acquired and loaded" in out
    pkgs = re.findall(r"Evaluation of \\(_S\d) returned.*?\n\s*\[Package\] Contains 4 Elements:\n((?:\s*\[Integer\] = \w+\n){4})",
                      out)
    values = {name: [int(v, 16) for v in re.findall(r"= (\w+)", body)] for name, body in pkgs}
    assert values == {"_S5": [0, 0, 0, 0], "_S3": [1, 1, 0, 0]}


@pytest.mark.parametrize("offset, value", [(9, None), (0x31, 0x20)])
def test_the_iasl_check_catches_broken_tables(iasl, tmp_path, offset, value):
    """A wrong checksum, or a subtable length running past its entry, must fail the check above."""
    srat = bytearray(acpi.build_tables(NUMA, PLATFORM).by_signature(b"SRAT"))
    srat[offset] = (srat[offset] ^ 1) if value is None else value
    with pytest.raises(AssertionError):
        disassemble(iasl, tmp_path, bytes(srat))
