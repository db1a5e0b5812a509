"""The fuzz dictionary a guest declares (.pykvm_fuzz_dict) and the autodictionary handshake with afl-fuzz.

The section comes from the kernel file: every malformed shape must be a bad image (exit status 6),
never a crash, and what reaches afl-fuzz must parse, with AFL++'s own reading, to the same tokens.
The forkserver offers the dictionary only with shared-memory test cases, where afl-fuzz always
answers, and sends it only when afl-fuzz's answer takes it.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.boot import elf
from pykvm.errors import EXIT_BAD_IMAGE
from pykvm.fuzz import dictionary, forkserver


def _afl_reads(wire: bytes) -> list[bytes]:
    """What afl-fuzz 4.x does with the bytes: a 32-bit length (2..0xffffff), then records."""
    (size,) = struct.unpack_from("<I", wire)
    assert 2 <= size <= 0xFFFFFF and len(wire) == 4 + size
    body, out, at = wire[4:], [], 0
    while at < size and body[at] + at < size:
        out.append(body[at + 1:at + 1 + body[at]])
        at += 1 + body[at]
    return out


def test_records_and_padding_parse_to_tokens():
    raw = b"\x06PYKVM!\x00\x00\x03abc\x06PYKVM!\x01Z"
    assert dictionary.parse(raw) == [b"PYKVM!", b"abc", b"Z"]
    assert dictionary.parse(b"") == [] and dictionary.parse(b"\0" * 64) == []


@pytest.mark.parametrize("raw, says", [
    (b"\x05abc", "runs past"),
    (bytes([dictionary.MAX_TOKEN + 1]) + b"x" * (dictionary.MAX_TOKEN + 1), "at most"),
    (b"".join(bytes((2,)) + struct.pack("<H", i) for i in range(dictionary.MAX_TOKENS + 1)), "more than"),
    (b"\0" * (dictionary.MAX_SECTION + 1), "at most"),
])
def test_malformed_sections_are_bad_images(raw, says):
    with pytest.raises(dictionary.DictionaryError, match=says) as e:
        dictionary.parse(raw)
    assert e.value.exit_status == EXIT_BAD_IMAGE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_any_section_bytes_parse_or_are_refused(raw):
    try:
        tokens = dictionary.parse(raw)
    except dictionary.DictionaryError:
        return
    assert len(tokens) <= dictionary.MAX_TOKENS
    assert all(1 <= len(t) <= dictionary.MAX_TOKEN for t in tokens)
    assert len(set(tokens)) == len(tokens)
    if tokens:
        assert _afl_reads(dictionary.wire(tokens)) == tokens


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=dictionary.MAX_TOKEN), min_size=1, max_size=40, unique=True))
def test_declared_tokens_reach_afl_unchanged(tokens):
    raw = b"".join(bytes((len(t),)) + t for t in tokens)
    assert dictionary.parse(raw) == tokens
    assert _afl_reads(dictionary.wire(tokens)) == tokens


def test_the_bundled_target_declares_its_command_word():
    from pykvm.startup.artifacts import resolve_kernel

    assert dictionary.read(resolve_kernel("fuzz-target")) == [b"PYKVM!"]


def test_a_kernel_without_the_section_has_no_tokens(tmp_path):
    from pykvm.startup.artifacts import resolve_kernel

    assert dictionary.read(resolve_kernel("hello")) == []
    flat = tmp_path / "flat.bin"
    flat.write_bytes(b"\x90" * 64)
    assert dictionary.read(flat) == []


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_damaged_section_headers_are_bad_images(tmp_path_factory, data):
    from pykvm.startup.artifacts import resolve_kernel

    blob = bytearray(open(resolve_kernel("fuzz-target"), "rb").read())
    shoff = struct.unpack_from("<Q", blob, 0x28)[0]
    at = data.draw(st.integers(shoff, len(blob) - 1))
    blob[at] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("k") / "k.elf"
    path.write_bytes(bytes(blob))
    try:
        tokens = dictionary.read(path)
    except dictionary.DictionaryError:
        return
    assert len(tokens) <= dictionary.MAX_TOKENS


def test_section_lookup_checks_bounds():
    from pykvm.startup.artifacts import resolve_kernel

    blob = open(resolve_kernel("fuzz-target"), "rb").read()
    assert elf.section(blob, dictionary.SECTION) == b"\x06PYKVM!"
    assert elf.section(blob, ".no-such-section") is None
    with pytest.raises(elf.ElfError):
        elf.section(blob[:len(blob) - 64], dictionary.SECTION)


def test_autodict_is_offered_only_with_shared_memory():
    assert forkserver.hello_word(65536, True, True) & forkserver.FS_OPT_AUTODICT
    assert not forkserver.hello_word(65536, False, True) & forkserver.FS_OPT_AUTODICT
    assert not forkserver.hello_word(65536, True, False) & forkserver.FS_OPT_AUTODICT


class _Target:
    def __init__(self):
        self.inputs = []

    def start(self, data):
        self.inputs.append(bytes(data))

    def wait(self, cancelled=None):
        class R:
            wait_status = 0
        return R()


class _Sentinels:
    def current(self):
        return 4242

    def dead(self):
        return False


class _Shm:
    def read(self):
        return b"abc"


@pytest.mark.parametrize("answer, gets_dict", [
    (forkserver.FS_OPT_ENABLED | forkserver.FS_OPT_SHDMEM_FUZZ | forkserver.FS_OPT_AUTODICT, True),
    (forkserver.FS_OPT_ENABLED | forkserver.FS_OPT_SHDMEM_FUZZ, False),       # afl-showmap, AFL_NO_AUTODICT
])
def test_handshake_sends_the_dictionary_only_when_taken(answer, gets_dict):
    """serve() against a scripted afl-fuzz on the real descriptors 198/199."""
    wire = dictionary.wire([b"PYKVM!", b"abc"])
    ctl_r, ctl_w = os.pipe()
    st_r, st_w = os.pipe()
    saved = [os.dup(fd) if _open(fd) else None for fd in (198, 199)]
    try:
        os.dup2(ctl_r, 198)
        os.dup2(st_w, 199)
        os.write(ctl_w, struct.pack("<II", answer, 0))        # the answer, then one run
        os.close(ctl_w)
        target = _Target()
        runs = forkserver.serve(target, _Sentinels(), 65536, _Shm(), autodict=wire)
        os.close(199)
        os.close(st_w)
        got = b""
        while chunk := os.read(st_r, 65536):
            got += chunk
    finally:
        for fd, old in zip((198, 199), saved):
            if old is not None:
                os.dup2(old, fd)
                os.close(old)
            else:
                try:
                    os.close(fd)
                except OSError:
                    pass
        for fd in (ctl_r, st_r):
            os.close(fd)
    hello = struct.unpack_from("<I", got)[0]
    assert hello & forkserver.FS_OPT_AUTODICT and hello & forkserver.FS_OPT_SHDMEM_FUZZ
    rest = got[4:]
    if gets_dict:
        assert rest[:len(wire)] == wire
        rest = rest[len(wire):]
    assert struct.unpack("<II", rest) == (4242, 0)              # pid, then the run's status
    assert runs == 1 and target.inputs == [b"abc"]


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
