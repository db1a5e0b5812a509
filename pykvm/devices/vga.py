"""The VGA text screen hobby kernels draw on: CRTC registers (cursor) and the 80x25 buffer at 0xb8000 as text.

The buffer itself is guest RAM (pykvm's RAM starts at 0 and covers 0xb8000): the guest writes
it at memory speed and the VMM only reads it, to show it (machine/display.py) or to put the
final screen into a crash core. The CRTC model latches the index/data pair at 0x3d4/0x3d5;
registers 0x0e/0x0f hold the cursor's cell, 0x0a bit 5 hides it.
"""

from __future__ import annotations

from .. import abi
from .device import Device

COLS, ROWS = abi.PYKVM_VGA_COLS, abi.PYKVM_VGA_ROWS
TEXT_ADDR = abi.PYKVM_VGA_TEXT_ADDR
TEXT_BYTES = COLS * ROWS * 2
CRTC_REGS = 0x19
CURSOR_START, CURSOR_HIGH, CURSOR_LOW = 0x0A, 0x0E, 0x0F
CURSOR_DISABLE = 1 << 5

# Code page 437's glyphs for 0x01-0x1f and 0x7f (Python's cp437 codec maps those to control characters).
_LOW_GLYPHS = "☺☻♥♦♣♠•◘○◙♂♀♪♫☼►◄↕‼¶§▬↨↑↓→←∟↔▲▼"
_TABLE = [" "] + list(_LOW_GLYPHS) + [bytes([b]).decode("cp437") for b in range(0x20, 0x100)]
_TABLE[0x7F] = "⌂"
_TABLE[0xFF] = " "                 # cp437's non-breaking space


class VgaCrtc(Device):
    """The CRTC index/data ports of a colour VGA: reads return what was written; the cursor is kept."""

    name = "vga"

    def __init__(self, base: int = abi.PYKVM_PORT_VGA_CRTC):
        super().__init__(base=base)
        self.ports = [(base, 2)]
        self.index = 0
        self.regs = bytearray(CRTC_REGS)

    def io_read(self, offset: int, size: int) -> int:
        """The index, or the selected register (0xff past the last one)."""
        if offset == 0:
            return self.index
        return self.regs[self.index] if self.index < CRTC_REGS else 0xFF

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Select a register, or set it; a 16-bit write to the index port does both, as on real VGA."""
        if offset == 0:
            self.index = value & 0xFF
            if size >= 2:
                self._set(self.index, value >> 8 & 0xFF)
        else:
            self._set(self.index, value & 0xFF)

    def _set(self, index: int, value: int) -> None:
        if index < CRTC_REGS:
            self.regs[index] = value

    def cursor(self) -> tuple[int, int] | None:
        """(row, column) of the hardware cursor, None when hidden or off the screen."""
        if self.regs[CURSOR_START] & CURSOR_DISABLE:
            return None
        pos = self.regs[CURSOR_HIGH] << 8 | self.regs[CURSOR_LOW]
        return divmod(pos, COLS) if pos < COLS * ROWS else None

    def get_state(self) -> dict:
        """Index and registers."""
        return {"index": self.index, "regs": self.regs.hex()}

    def set_state(self, state: dict) -> None:
        """Restore index and registers (unknown lengths are clipped)."""
        self.index = int(state.get("index", 0)) & 0xFF
        raw = bytes.fromhex(str(state.get("regs", "")))[:CRTC_REGS]
        self.regs = bytearray(raw.ljust(CRTC_REGS, b"\0"))


def read_screen(memory) -> bytes:
    """The 4000 bytes of the text buffer, or b'' when guest RAM does not cover it."""
    try:
        if not memory.is_ram(TEXT_ADDR, TEXT_BYTES):
            return b""
        return bytes(memory.read(TEXT_ADDR, TEXT_BYTES))
    except Exception:  # noqa: BLE001 - a torn-down memory object: no screen
        return b""


def screen_lines(buf: bytes) -> list[str]:
    """The buffer as ROWS lines of COLS characters (CP437 glyphs; attributes dropped)."""
    chars = buf[0::2]
    text = "".join(_TABLE[c] for c in chars).ljust(COLS * ROWS)
    return [text[r * COLS:(r + 1) * COLS] for r in range(ROWS)]


def is_blank(buf: bytes) -> bool:
    """True when no cell shows a visible character."""
    return all(_TABLE[c] == " " for c in buf[0::2])


def screen_text(buf: bytes) -> str:
    """The screen as plain text: trailing spaces and trailing blank rows dropped ('' when blank)."""
    lines = [line.rstrip() for line in screen_lines(buf)]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


# VGA colour index -> ANSI colour number (VGA: black, blue, green, cyan, red, magenta, brown, grey)
_ANSI = (0, 4, 2, 6, 1, 5, 3, 7)


def render_ansi(buf: bytes, cursor: tuple[int, int] | None) -> str:
    """The screen as ANSI escapes: home, every row with its colours, then the cursor placed (or hidden)."""
    out = ["\x1b[H"]
    last = None
    for r in range(ROWS):
        for c in range(COLS):
            i = 2 * (r * COLS + c)
            ch, attr = (buf[i], buf[i + 1]) if i + 1 < len(buf) else (0, 7)
            if attr != last:
                fg, bg = attr & 0xF, attr >> 4 & 0x7
                out.append(f"\x1b[0;{'1;' if fg & 8 else ''}{30 + _ANSI[fg & 7]};{40 + _ANSI[bg]}m")
                last = attr
            out.append(_TABLE[ch])
        out.append("\x1b[0m\r\n" if r < ROWS - 1 else "\x1b[0m")
        last = None
    if cursor is None:
        out.append("\x1b[?25l")
    else:
        out.append(f"\x1b[{cursor[0] + 1};{cursor[1] + 1}H\x1b[?25h")
    return "".join(out)


def framed(buf: bytes, cursor: tuple[int, int] | None) -> str:
    """The screen in a box with the cursor's position below it, for a final screen printed as plain text."""
    edge = "+" + "-" * COLS + "+"
    rows = [edge] + [f"|{line}|" for line in screen_lines(buf)] + [edge]
    where = "hidden" if cursor is None else f"row {cursor[0]}, column {cursor[1]}"
    return "\n".join(rows + [f"cursor: {where}"]) + "\n"
