"""--cpu: parsing QEMU-style feature toggles, shaping CPUID, and what a guest then reads."""

from types import SimpleNamespace

import pytest
from hypothesis import given, strategies as st

from pykvm.boot.cpumodel import FEATURES, apply_model, canonical, check_available, has, parse_cpu
from pykvm.boot.paging import PageTableBuilder, build_boot_page_tables
from pykvm.errors import EXIT_USAGE, UsageError

from .helpers import pykvm


def entries():
    """A fake supported-CPUID list: leaf 1, 7.0, 0xd.0/0xd.1 and 0x80000001 with every bit set."""
    mk = lambda f, i, fl: SimpleNamespace(function=f, index=i, flags=fl, eax=0xFFFFFFFF, ebx=0xFFFFFFFF,  # noqa: E731
                                         ecx=0xFFFFFFFF, edx=0xFFFFFFFF)
    return [mk(1, 0, 0), mk(7, 0, 1), mk(7, 1, 1), mk(0xD, 0, 1), mk(0xD, 1, 1), mk(0x80000001, 0, 0)]


def test_names_as_qemu_and_linux_spell_them():
    assert canonical("sse4.1") == canonical("sse4_1") == "sse4-1"
    assert canonical("lahf_lm") == "lahf-lm" and canonical("pni") == "sse3" and canonical("X2APIC") == "x2apic"
    m = parse_cpu("host,-x2apic,+cx16,pdpe1gb=off,sse4.2=on")
    assert m.remove == {"x2apic", "pdpe1gb"} and m.add == {"cx16", "sse4-2"}
    assert parse_cpu("host").text == "host"
    assert parse_cpu("host,-cx16,+cx16").remove == frozenset()     # the last word wins


@pytest.mark.parametrize("spec", ["qemu64", "host,-nosuch", "host,x2apic", "host,+", "host,-x2apic=maybe"])
def test_bad_specs_are_usage_errors(spec):
    with pytest.raises(UsageError) as e:
        parse_cpu(spec)
    assert e.value.exit_status == EXIT_USAGE and "\n" not in str(e.value)


@given(st.text(max_size=80))
def test_parse_never_raises_anything_else(text):
    try:
        parse_cpu(text)
    except UsageError:
        pass


def test_hiding_clears_the_bit_and_its_dependents():
    ents = entries()
    apply_model(parse_cpu("host,-x2apic,-xsave,-cx16,-pdpe1gb"), ents)
    leaf1, leaf7, ext = ents[0], ents[1], ents[5]
    assert not leaf1.ecx >> 21 & 1 and not leaf1.ecx >> 13 & 1 and not leaf1.ecx >> 26 & 1
    assert not leaf1.ecx >> 28 & 1                     # avx needs xsave
    assert not leaf7.ebx >> 5 & 1 and not leaf7.ebx >> 16 & 1   # avx2, avx512f
    assert ents[3].eax == ents[4].eax == 0             # no XSAVE area described
    assert not ext.edx >> 26 & 1 and ext.edx >> 20 & 1  # pdpe1gb gone, nx kept
    assert leaf1.edx == 0xFFFFFFFF and ents[2].ebx == 0xFFFFFFFF   # untouched words stay


def test_asking_for_a_missing_feature_is_refused():
    ents = entries()
    ents[0].ecx = 0
    with pytest.raises(UsageError, match=r"\+x2apic: this host's KVM does not offer x2apic"):
        check_available(parse_cpu("host,+x2apic"), ents)
    check_available(parse_cpu("host,+cx8"), ents)
    assert not has(parse_cpu("host"), ents, "x2apic") and has(parse_cpu("host"), ents, "cx8")


def test_every_feature_maps_to_one_bit():
    seen = {}
    for name, where in FEATURES.items():
        assert where not in seen, f"{name} and {seen.get(where)} share a bit"
        seen[where] = name


def _leaves(pt: bytes, base: int, root: int, level_shift=39, depth=0):
    """(level size, count) of the large leaves in page tables built at `base`."""
    import struct

    from pykvm.memory.pagewalk import ADDR_MASK, PTE_P, PTE_PS
    out = {}
    page = pt[root - base:root - base + 4096]
    for i in range(512):
        e = struct.unpack_from("<Q", page, i * 8)[0]
        if not e & PTE_P:
            continue
        if e & PTE_PS or level_shift == 12:
            out[level_shift] = out.get(level_shift, 0) + 1
        else:
            for k, v in _leaves(pt, base, e & ADDR_MASK, level_shift - 9, depth + 1).items():
                out[k] = out.get(k, 0) + v
    return out


def _image(b) -> bytes:
    """The builder's table pages laid out from its base (they all fit the fixed area here)."""
    (addr, data), = b.chunks()
    assert addr == 0x20000
    return data


def test_gib_pages_only_with_pdpe1gb():
    without = build_boot_page_tables(0x20000, 0x9F000, 128 << 20, [])
    with_gib = build_boot_page_tables(0x20000, 0x9F000, 128 << 20, [], gib_pages=True)
    assert _leaves(_image(without), 0x20000, without.root) == {21: 4 * 512}
    assert _leaves(_image(with_gib), 0x20000, with_gib.root) == {30: 4}
    # remapping inside a 1 GiB leaf splits it, and the rest of it stays mapped
    b = PageTableBuilder(0x20000, 0x9F000, gib_pages=True)
    b.map(0, 0, 1 << 30)
    b.map(0x200000, 0x600000, 0x1000)
    leaves = _leaves(_image(b), 0x20000, b.root)
    assert leaves == {21: 511, 12: 512}


def _cpuid_lines(out: bytes) -> dict:
    words = {}
    for line in out.decode().splitlines():
        if line.startswith("cpuid "):
            _c, leaf, *regs = line.split()
            for r in regs:
                k, v = r.split("=")
                words[(leaf, k)] = int(v, 16)
        elif line.startswith("apic_base="):
            words["apic_base"] = int(line.split("=")[1], 16)
    return words


@pytest.mark.kvm
def test_guest_sees_the_shaped_cpuid():
    from pykvm.boot import cpu
    from pykvm.kvm import Kvm

    with Kvm.open("/dev/kvm") as kvm:
        supported = kvm.supported_cpuid()
        offered = {f: cpu.guest_has(supported, f) for f in ("x2apic", "cx16", "tsc-deadline")}
    base = pykvm("run", "cpuid")
    assert base.returncode == 0, base.stderr
    shaped = pykvm("run", "cpuid", "--cpu", "host,-x2apic,-cx16,-tsc-deadline")
    assert shaped.returncode == 0, shaped.stderr
    before, after = _cpuid_lines(base.stdout), _cpuid_lines(shaped.stdout)
    for name, bit in (("x2apic", 21), ("cx16", 13), ("tsc-deadline", 24)):
        if offered[name]:
            assert before[("1", "ecx")] >> bit & 1, name
        assert not after[("1", "ecx")] >> bit & 1, name
    assert not after["apic_base"] >> 10 & 1            # x2APIC mode is not on


def test_unknown_feature_is_a_one_line_status_2():
    r = pykvm("run", "hello", "--cpu", "host,-frobnicate")
    assert r.returncode == EXIT_USAGE
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "unknown CPU feature 'frobnicate'" in lines[0]
