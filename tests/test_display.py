"""Hobby-kernel support: the VGA text screen (decode, render, CRTC cursor), the i8042, --display text and cores."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.devices.events import GuestExit
from pykvm.devices.i8042 import GuestReset, I8042
from pykvm.devices.vga import VgaCrtc, framed, is_blank, render_ansi, screen_lines, screen_text

from .helpers import pykvm


def screen(cells: dict[tuple[int, int], tuple[str, int]]) -> bytes:
    """A 4000-byte text buffer with the given (row, col) -> (char, attribute), blanks elsewhere."""
    buf = bytearray(b"\x20\x07" * 2000)
    for (r, c), (ch, attr) in cells.items():
        buf[2 * (r * 80 + c)] = ord(ch) if isinstance(ch, str) else ch
        buf[2 * (r * 80 + c) + 1] = attr
    return bytes(buf)


def test_screen_decodes_to_text_rows():
    buf = screen({(0, 0): ("H", 7), (0, 1): ("i", 7), (24, 79): ("#", 0x1E), (3, 5): (0xDB, 7), (3, 6): (1, 7)})
    lines = screen_lines(buf)
    assert len(lines) == 25 and all(len(line) == 80 for line in lines)
    assert lines[0].startswith("Hi ") and lines[24].endswith("#") and lines[3][5:7] == "█☺"
    assert screen_text(buf).splitlines()[0] == "Hi" and screen_text(buf).endswith("#")
    assert screen_text(bytes(4000)) == "" and is_blank(bytes(4000)) and not is_blank(buf)


def test_framed_screen_and_cursor_line():
    out = framed(screen({(1, 2): ("x", 7)}), (4, 0)).splitlines()
    assert out[0] == out[26] == "+" + "-" * 80 + "+"
    assert out[2] == "|  x" + " " * 77 + "|" and out[27] == "cursor: row 4, column 0"
    assert framed(bytes(4000), None).splitlines()[-1] == "cursor: hidden"


def test_ansi_rendering_colours_and_cursor():
    out = render_ansi(screen({(0, 0): ("A", 0x1E)}), (2, 3))
    assert out.startswith("\x1b[H\x1b[0;1;33;44mA")          # bright yellow (brown + bright) on blue
    assert out.endswith("\x1b[3;4H\x1b[?25h")
    assert render_ansi(bytes(4000), None).endswith("\x1b[?25l")


@given(st.binary(min_size=0, max_size=4000))
def test_any_buffer_decodes(buf):
    assert len(screen_lines(buf)) == 25
    render_ansi(buf, None)


def test_crtc_cursor_registers():
    c = VgaCrtc()
    c.io_write(0, 1, 0x0F)
    c.io_write(1, 1, 0x50 & 0xFF)
    c.io_write(0, 2, 0x0E | (0x01 << 8))                     # 16-bit: index and data at once
    assert c.cursor() == divmod(0x150, 80)
    assert c.io_read(0, 1) == 0x0E and c.io_read(1, 1) == 0x01
    c.io_write(0, 1, 0x0A)
    c.io_write(1, 1, 0x20)                                   # cursor disable
    assert c.cursor() is None
    c.io_write(0, 1, 0x40)
    assert c.io_read(1, 1) == 0xFF                           # past the registers
    c2 = VgaCrtc()
    c2.set_state(c.get_state())
    assert c2.regs == c.regs and c2.index == c.index


def test_i8042_answers_probes_and_resets():
    k = I8042()
    assert k.io_read(4, 1) & 1 == 0 and not k.io_read(4, 1) & 2   # nothing to read, ready for input
    k.io_write(4, 1, 0xAA)
    assert k.io_read(4, 1) & 1 and k.io_read(0, 1) == 0x55
    k.io_write(4, 1, 0x20)
    assert k.io_read(0, 1) == 0x45
    k.io_write(4, 1, 0x60)
    k.io_write(0, 1, 0x47)
    k.io_write(4, 1, 0x20)
    assert k.io_read(0, 1) == 0x47
    k.io_write(0, 1, 0xFF)                                   # keyboard reset: ACK, then BAT passed
    assert [k.io_read(0, 1), k.io_read(0, 1)] == [0xFA, 0xAA]
    assert k.io_read(1, 1) == 0xFF                           # 0x61 is not the controller
    with pytest.raises(GuestReset) as e:
        k.io_write(4, 1, 0xFE)
    assert isinstance(e.value, GuestExit) and e.value.status == 0 and e.value.how == "reset"


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4]), st.booleans(), st.integers(0, 255)), max_size=60))
def test_i8042_random_traffic_never_breaks(ops):
    k = I8042()
    for offset, write, value in ops:
        try:
            if write:
                k.io_write(offset, 1, value)
            else:
                assert 0 <= k.io_read(offset, 1) <= 0xFF
        except GuestReset:
            k = I8042()
        assert len(k.out) <= 16


EXPECTED_TOP = ["Hello from a hobby kernel!", "VGA text mode, 80x25, no serial.", "i8042 self-test: ok"]


@pytest.mark.kvm
def test_display_text_prints_the_final_screen():
    r = pykvm("run", "vga-text", "--display", "text")
    assert r.returncode == 1, r.stderr
    out = r.stdout.decode().splitlines()
    rows = [line[1:-1] for line in out[1:26]]
    assert [row.rstrip() for row in rows[:4]] == EXPECTED_TOP + ["mode: exit"]
    assert rows[24] == " " * 60 + "bottom row" + " " * 9 + "#"
    assert out[27] == "cursor: row 4, column 0"


@pytest.mark.kvm
def test_display_none_prints_nothing():
    r = pykvm("run", "vga-text")
    assert r.returncode == 1 and r.stdout == b""


@pytest.mark.kvm
def test_crash_core_carries_the_screen_and_inspect_prints_it(tmp_path):
    r = pykvm("run", "vga-text", "--cmdline", "crash", "--device", "i8042", "--crash-dir", str(tmp_path))
    assert r.returncode == 16, r.stderr
    (core,) = tmp_path.glob("*.core")
    from pykvm.crash.reader import CoreFile

    with CoreFile(core) as c:
        assert c.info["screen"].splitlines()[:4] == EXPECTED_TOP + ["mode: crash"]
        assert c.info["screen_cursor"] is None                  # no CRTC device without --display text
    text = pykvm("inspect", str(core)).stdout.decode()
    block = text.split("VGA text screen (final):\n", 1)[1].splitlines()
    assert block[:4] == ["  |" + s for s in EXPECTED_TOP + ["mode: crash"]]
    assert block[24] == "  |" + " " * 60 + "bottom row" + " " * 9 + "#"
    report = json.loads(pykvm("inspect", "--json", str(core)).stdout)
    assert report["screen"].splitlines()[3] == "mode: crash"


@pytest.mark.kvm
def test_i8042_reset_stops_the_vm_cleanly():
    r = pykvm("run", "vga-text", "--cmdline", "reset", "--device", "i8042")
    assert r.returncode == 0
    assert re.search(r"guest requested a reset \(i8042 command 0xfe\)", r.stderr.decode())


@pytest.mark.kvm
def test_gzip_compressed_hobby_kernel_boots(tmp_path):
    import gzip

    from .helpers import guest

    packed = tmp_path / "vga-text.elf.gz"
    packed.write_bytes(gzip.compress(guest("vga-text").read_bytes()))
    r = pykvm("run", str(packed), "--display", "text")
    assert r.returncode == 1, r.stderr
    assert "Hello from a hobby kernel!" in r.stdout.decode()


@pytest.mark.kvm
def test_display_text_on_a_terminal_redraws_with_ansi_under_the_sandbox():
    """On a TTY the display thread draws with escapes; it runs under the seccomp sandbox (the default)."""
    import os
    import pty
    import sys

    from .helpers import ROOT, guest

    kernel = str(guest("vga-text"))
    pid, fd = pty.fork()
    if pid == 0:                                   # child: the real command on the pty
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "pykvm", "run", kernel, "--display", "text",
                                  "--serial", "none"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode("utf-8", "replace")
    assert os.WEXITSTATUS(status) == 1, text[-2000:]
    assert "\x1b[2J" in text and "\x1b[0;1;33;44mHello from a hobby kernel!" in text
    assert "\x1b[5;1H\x1b[?25h" in text            # the terminal's cursor where the guest put its own
    assert "sandbox" not in text
