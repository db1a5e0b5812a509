"""Fuzzing in the suite: every parser of outside input gives a result or its documented error, nothing else.

Kernel images -> BadImageError (status 6); core files -> CoreFormatError (status 24 in the CLI);
device descriptions -> DescriptionError (a DeviceConfigError, status 10). Each test is bounded
(max_examples = 200 each, about 1 400 inputs, ~25 s here) so the suite stays fast.
"""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.boot.image import MB_FLAG_AOUT_KLUDGE, MULTIBOOT_MAGIC, KernelImage, parse_image
from pykvm.crash import CoreFormatError, build_report, render_text
from pykvm.crash import notes as N
from pykvm.devices import description as D
from pykvm.errors import BadImageError

from .coredata import core_bytes, info_doc

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
U64 = st.integers(0, (1 << 64) - 1)
U32 = st.integers(0, (1 << 32) - 1)
SMALL = st.integers(0, 1 << 22)
EDGE = st.sampled_from([0, 1, 0x1000, 0x100000, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])


def _check_image(img: KernelImage) -> None:
    assert img.segments and img.protocol in ("pykvm64", "multiboot", "flat")
    for s in img.segments:
        assert 0 <= len(s.data) <= s.memsz


def _parse(blob: bytes, **kw) -> None:
    try:
        img = parse_image(blob, **kw)
    except BadImageError as e:
        assert "\n" not in str(e)
    else:
        _check_image(img)


# -- kernel images --------------------------------------------------------------------------------

@st.composite
def elf_images(draw):
    """ELF32/64 headers and program headers with hostile fields, some data after them."""
    bits = draw(st.sampled_from([32, 64]))
    n = draw(st.integers(0, 6))
    ehsize, phentsize = (64, 56) if bits == 64 else (52, 32)
    phoff = draw(st.one_of(st.just(ehsize), SMALL, EDGE)) if bits == 64 else draw(st.one_of(st.just(ehsize), SMALL))
    phoff &= (1 << bits) - 1
    phnum = draw(st.one_of(st.just(n), st.integers(0, 0xFFFF)))
    entry = draw(st.one_of(st.just(0x100000), EDGE if bits == 64 else U32))
    machine = draw(st.sampled_from([62, 3, 40, 183, 0]))
    etype = draw(st.sampled_from([2, 3, 4, 1, 0]))
    word = (1 << bits) - 1
    val = st.one_of(SMALL, EDGE).map(lambda v: v & word)
    phdrs = b""
    for _ in range(n):
        ptype = draw(st.sampled_from([1, 1, 1, 3, 4, 0x6474E551, 0]))
        off, va, pa, fs, ms = (draw(val) for _ in range(5))
        if bits == 64:
            phdrs += struct.pack("<IIQQQQQQ", ptype, 7, off, va, pa, fs, ms, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", ptype, off, va, pa, fs, ms, 7, 0x1000)
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, draw(st.sampled_from([1, 1, 2])), 1]) + bytes(9)
    if bits == 64:
        hdr = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, 0, 0, ehsize, phentsize,
                                  phnum, 64, 0, 0)
    else:
        hdr = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, phoff, 0, 0, ehsize, phentsize,
                                  phnum, 40, 0, 0)
    body = hdr + phdrs + draw(st.binary(max_size=256))
    if draw(st.booleans()):       # a multiboot header inside, sometimes with the a.out kludge
        body += multiboot_header(draw)
    cut = draw(st.integers(0, len(body)))
    return body[:cut] if draw(st.booleans()) else body


def multiboot_header(draw) -> bytes:
    flags = draw(st.one_of(st.sampled_from([0, 3, 7, MB_FLAG_AOUT_KLUDGE, MB_FLAG_AOUT_KLUDGE | 3]), U32))
    checksum = (-(MULTIBOOT_MAGIC + flags)) & 0xFFFFFFFF
    if draw(st.integers(0, 9)) == 0:
        checksum ^= 1
    kludge = struct.pack("<5I", *(draw(st.one_of(st.integers(0x100000, 0x140000), U32)) for _ in range(5)))
    return struct.pack("<III", MULTIBOOT_MAGIC, flags, checksum) + kludge[:draw(st.integers(0, 20))]


@st.composite
def kludge_images(draw):
    pad = draw(st.integers(0, 64)) * 4
    return bytes(pad) + multiboot_header(draw) + draw(st.binary(max_size=512))


@FUZZ
@given(elf_images())
def test_fuzzed_elf_images(blob):
    _parse(blob)


@FUZZ
@given(kludge_images())
def test_fuzzed_multiboot_kludge_images(blob):
    _parse(blob)


@FUZZ
@given(st.binary(min_size=0, max_size=256), st.one_of(U64, st.integers(-5, 5)), st.sampled_from([16, 32, 64]))
def test_fuzzed_flat_images(blob, addr, bits):
    _parse(blob, flat_addr=addr, flat_bits=bits)


# -- core files -------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
INFO_KEYS = sorted(info_doc())
REGION_KEYS = ["gpa", "size", "name", "node", "phdr"]
SPACE_KEYS = ["vcpus", "phdr_first", "phdr_count"]


def _inspect(tmp_path, blob: bytes) -> None:
    f = tmp_path / "fuzz.core"
    f.write_bytes(blob)
    try:
        report = build_report(f)
    except CoreFormatError as e:
        assert "\n" not in str(e)
        return
    render_text(report)
    json.dumps(report, default=str)


@FUZZ
@given(st.dictionaries(st.sampled_from(INFO_KEYS), JSON, max_size=4),
       st.dictionaries(st.sampled_from(REGION_KEYS), JSON, max_size=3),
       st.dictionaries(st.sampled_from(SPACE_KEYS), JSON | st.integers(0, 4) | EDGE, max_size=3))
def test_fuzzed_pykvm_notes(tmp_path, top, region, space):
    doc = info_doc()
    doc["memory"]["regions"][0].update(region)
    doc["address_spaces"][0].update(space)
    doc.update(top)
    _inspect(tmp_path, core_bytes(doc))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 3))
def test_fuzzed_core_bytes(tmp_path, flips, extra):
    odd = b""
    if extra:   # an extra note with a hostile name size
        odd = struct.pack("<III", extra, N.QEMU_CPUSTATE_SIZE, N.NT_QEMU) + b"QEMU\0\0\0\0" + bytes(N.QEMU_CPUSTATE_SIZE)
    blob = bytearray(core_bytes(extra_notes=odd))
    for pos, value in flips:
        blob[pos % len(blob)] = value
    _inspect(tmp_path, bytes(blob))


# -- device descriptions ------------------------------------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"


SCALAR = st.one_of(st.integers(-(1 << 64), 1 << 65), st.text(max_size=10), st.booleans())
ACTION = st.fixed_dictionaries({"action": st.sampled_from(list(D.ACTIONS) + ["maybe"])},
                               optional={"mask": SCALAR | st.integers(0, 0xFFFF),
                                         "clamp": st.lists(st.integers(-2, 1 << 33), max_size=3),
                                         "shadow": st.booleans(), "read_value": SCALAR})
REGISTER = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "c", "bad name", ""]), "space": st.sampled_from(["port", "mmio", "disk"]),
     "offset": st.integers(-1, 40) | SCALAR, "width": st.sampled_from([1, 2, 4, 8, 3, 0]),
     "access": st.sampled_from(["r", "w", "rw", "x"]), "scope": st.sampled_from(["local", "system", "global"]),
     "trusted": ACTION | SCALAR, "untrusted": ACTION | SCALAR},
    optional={"extra": SCALAR})


@FUZZ
@given(st.lists(REGISTER, max_size=5), st.sampled_from(["dev", "", 5]), st.sampled_from(["s", 1]))
def test_fuzzed_device_descriptions(registers, name, summary):
    text = f"name = {_toml_value(name)}\nsummary = {_toml_value(summary)}\n"
    for r in registers:
        text += "\n[[registers]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in r.items())
    _describe(text)


@FUZZ
@given(st.sampled_from(sorted(D.shipped())), st.lists(st.tuples(st.integers(0, 1 << 16), st.text(max_size=3)),
                                                      min_size=1, max_size=4))
def test_mutated_shipped_descriptions(which, edits):
    text = D.shipped()[which].path
    text = open(text).read()
    for pos, s in edits:
        pos %= len(text) + 1
        text = text[:pos] + s + text[pos + 1:]
    _describe(text)


def _describe(text: str) -> None:
    try:
        d = D.parse(text, "fuzz.toml")
    except D.DescriptionError as e:
        assert e.exit_status == 10
        return
    d.render()
