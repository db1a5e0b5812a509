"""An ACPI reader for the tests, written from the spec independently of pykvm/boot/acpi.

It finds the RSDP the way a kernel does (16-byte steps through 0xE0000-0xFFFFF), checks
every checksum and length, and decodes the fields the tests compare with the topology.
Anything malformed is an AssertionError naming what is wrong.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SCAN_START, SCAN_END = 0xE0000, 0x100000


def _sum(data: bytes) -> int:
    return sum(data) & 0xFF


@dataclass
class Parsed:
    rsdp_addr: int
    rsdp: dict
    tables: dict = field(default_factory=dict)      # signature -> (addr, bytes)
    xsdt: list = field(default_factory=list)
    rsdt: list = field(default_factory=list)


def find_rsdp(read) -> int:
    """Scan the BIOS area for "RSD PTR " with a valid 20-byte checksum; returns its address."""
    for addr in range(SCAN_START, SCAN_END, 16):
        if read(addr, 8) == b"RSD PTR " and _sum(read(addr, 20)) == 0:
            return addr
    raise AssertionError("no RSDP in 0xE0000-0xFFFFF")


def table_at(read, addr: int) -> bytes:
    """One SDT: length from the header, checksum checked."""
    header = read(addr, 36)
    length = struct.unpack_from("<I", header, 4)[0]
    assert 36 <= length <= SCAN_END - SCAN_START, f"table at {addr:#x}: length {length}"
    data = read(addr, length)
    assert _sum(data) == 0, f"table {data[:4]!r} at {addr:#x}: checksum does not sum to zero"
    assert data[10:16] == b"PYKVM ", f"table {data[:4]!r}: OEM id {data[10:16]!r}"
    return data


def parse(read) -> Parsed:
    """Walk RSDP -> XSDT (and RSDT) -> every table, FADT -> FACS and DSDT."""
    addr = find_rsdp(read)
    raw = read(addr, 36)
    sig, csum, oem, rev, rsdt_addr, length, xsdt_addr, xcsum = struct.unpack("<8sB6sBIIQB3x", raw)
    assert rev == 2 and length == 36 and _sum(raw) == 0, "RSDP v2 extended checksum/length"
    out = Parsed(addr, dict(oem=oem, revision=rev, rsdt=rsdt_addr, xsdt=xsdt_addr))
    xsdt = table_at(read, xsdt_addr)
    rsdt = table_at(read, rsdt_addr)
    assert xsdt[:4] == b"XSDT" and rsdt[:4] == b"RSDT"
    assert (len(xsdt) - 36) % 8 == 0 and (len(rsdt) - 36) % 4 == 0
    out.xsdt = [struct.unpack_from("<Q", xsdt, o)[0] for o in range(36, len(xsdt), 8)]
    out.rsdt = [struct.unpack_from("<I", rsdt, o)[0] for o in range(36, len(rsdt), 4)]
    out.tables[b"XSDT"] = (xsdt_addr, xsdt)
    out.tables[b"RSDT"] = (rsdt_addr, rsdt)
    for a in out.xsdt:
        t = table_at(read, a)
        assert t[:4] not in out.tables, f"{t[:4]!r} listed twice"
        out.tables[t[:4]] = (a, t)
    fadt = out.tables[b"FACP"][1]
    facs_addr, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    x_facs, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert x_facs == 0 and x_dsdt == dsdt_addr
    facs = read(facs_addr, 64)
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64 and facs_addr % 64 == 0
    out.tables[b"FACS"] = (facs_addr, facs)
    out.tables[b"DSDT"] = (dsdt_addr, table_at(read, dsdt_addr))
    return out


def subtables(data: bytes, start: int):
    """(type, bytes) of each type-length subtable from `start`; they must tile the table exactly."""
    off, out = start, []
    while off < len(data):
        assert off + 2 <= len(data), "subtable header past the end"
        kind, length = data[off], data[off + 1]
        assert length >= 2 and off + length <= len(data), f"subtable at {off} has bad length {length}"
        out.append((kind, data[off:off + length]))
        off += length
    return out


def madt(data: bytes) -> dict:
    """LAPICs as [(uid, apic id, flags)], IOAPICs, overrides, NMIs."""
    lapic_addr, flags = struct.unpack_from("<II", data, 36)
    cpus, ioapics, overrides, nmis = [], [], [], []
    for kind, sub in subtables(data, 44):
        if kind == 0:
            assert len(sub) == 8
            _, _, uid, apic, fl = struct.unpack("<BBBBI", sub)
            cpus.append((uid, apic, fl))
        elif kind == 9:
            assert len(sub) == 16
            _, _, _, apic, fl, uid = struct.unpack("<BBHIII", sub)
            cpus.append((uid, apic, fl))
        elif kind == 1:
            assert len(sub) == 12
            _, _, ioapic_id, _, addr, gsi_base = struct.unpack("<BBBBII", sub)
            ioapics.append((ioapic_id, addr, gsi_base))
        elif kind == 2:
            assert len(sub) == 10
            _, _, bus, src, gsi, fl = struct.unpack("<BBBBIH", sub)
            overrides.append((bus, src, gsi, fl))
        elif kind in (4, 10):
            nmis.append(kind)
        else:
            raise AssertionError(f"unexpected MADT subtable type {kind}")
    return dict(lapic_addr=lapic_addr, flags=flags, cpus=cpus, ioapics=ioapics, overrides=overrides, nmis=nmis)


def srat(data: bytes) -> dict:
    """CPU affinities {apic id: (domain, flags)} and memory affinities [(domain, base, length, flags)]."""
    assert struct.unpack_from("<I", data, 36)[0] == 1
    cpus, mem = {}, []
    for kind, sub in subtables(data, 48):
        if kind == 0:
            assert len(sub) == 16
            dom = sub[2] | int.from_bytes(sub[9:12], "little") << 8
            apic, fl = sub[3], struct.unpack_from("<I", sub, 4)[0]
        elif kind == 2:
            assert len(sub) == 24
            dom, apic, fl = struct.unpack_from("<III", sub, 4)
        elif kind == 1:
            assert len(sub) == 40
            dom = struct.unpack_from("<I", sub, 2)[0]
            base, length = struct.unpack_from("<QQ", sub, 8)
            mem.append((dom, base, length, struct.unpack_from("<I", sub, 28)[0]))
            continue
        else:
            raise AssertionError(f"unexpected SRAT subtable type {kind}")
        assert apic not in cpus, f"APIC id {apic} twice in the SRAT"
        cpus[apic] = (dom, fl)
    return dict(cpus=cpus, memory=mem)


def slit(data: bytes) -> list[list[int]]:
    """The distance matrix."""
    n = struct.unpack_from("<Q", data, 36)[0]
    assert len(data) == 44 + n * n, "SLIT length does not match its locality count"
    return [list(data[44 + i * n:44 + (i + 1) * n]) for i in range(n)]


def fadt(data: bytes) -> dict:
    """The FADT fields the platform options drive."""
    assert len(data) == 276 and data[8] == 6
    sci, = struct.unpack_from("<H", data, 46)
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", data, 56)
    evt_len, cnt_len, _, tmr_len = data[88:92]
    flags, = struct.unpack_from("<I", data, 112)

    def gas(off):
        space, width, bit, access, addr = struct.unpack_from("<BBBBQ", data, off)
        return dict(space=space, width=width, access=access, addr=addr)

    return dict(sci=sci, pm1a_evt=pm1a_evt, pm1a_cnt=pm1a_cnt, pm_tmr=pm_tmr, evt_len=evt_len, cnt_len=cnt_len,
                tmr_len=tmr_len, flags=flags, boot_arch=struct.unpack_from("<H", data, 109)[0],
                x_pm1a_evt=gas(148), x_pm1a_cnt=gas(172), x_pm_tmr=gas(208))


def sleep_package(dsdt: bytes, name: bytes) -> list[int] | None:
    """The integers of `Name(<name>, Package(){...})` in the DSDT's AML, or None."""
    aml = dsdt[36:]
    i = aml.find(b"\x08" + name + b"\x12")
    if i < 0:
        return None
    p = i + 6
    lead = aml[p]
    p += 1 + (lead >> 6)
    count = aml[p]
    p += 1
    values = []
    for _ in range(count):
        op = aml[p]
        if op in (0, 1):
            values.append(op)
            p += 1
        elif op == 0x0A:
            values.append(aml[p + 1])
            p += 2
        else:
            raise AssertionError(f"unexpected AML opcode {op:#x} in {name!r}")
    return values
