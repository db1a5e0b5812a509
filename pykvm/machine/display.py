"""`--display text`: the guest's VGA text screen in the terminal.

On a terminal a thread redraws the screen with ANSI escapes whenever the buffer or the cursor
changes (polled: the buffer is guest RAM, written without exits). Otherwise (a pipe, a file,
a test) the final screen is printed once as plain text when the VM stops. The thread starts
before the seccomp sandbox is installed and then needs only write (the terminal), futex
(its stop event's timed wait) and clock_gettime, all already allowed.
"""

from __future__ import annotations

import os
import threading

from ..devices import vga

REFRESH_SECONDS = 0.05


class TextDisplay:
    """Shows the VGA text screen of one machine on a file descriptor (stdout by default)."""

    def __init__(self, machine, fd: int = 1, tty: bool | None = None):
        self.machine = machine
        self.fd = fd
        self.tty = os.isatty(fd) if tty is None else tty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = None

    def _crtc(self):
        return self.machine.built.get("vga")

    def cursor(self) -> tuple[int, int] | None:
        """The cursor the CRTC holds (None without the device or when hidden)."""
        crtc = self._crtc()
        return crtc.cursor() if crtc is not None else None

    def start(self) -> None:
        """Clear the terminal and start redrawing (terminal only; otherwise nothing until stop)."""
        if not self.tty:
            return
        self._write("\x1b[2J")
        self._thread = threading.Thread(target=self._loop, name="display", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            self._draw()

    def _draw(self) -> None:
        memory = self.machine.memory
        if memory is None:
            return
        buf, cur = vga.read_screen(memory), self.cursor()
        if buf and (buf, cur) != self._last:
            self._last = (buf, cur)
            self._write(vga.render_ansi(buf, cur))

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            self._stop.set()          # the terminal went away: stop drawing, the VM goes on

    def stop(self) -> None:
        """Stop redrawing; draw the final screen (terminal) or print it once as text (otherwise)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._draw()
            self._write(f"\x1b[0m\x1b[{vga.ROWS + 1};1H\x1b[?25h")
            return
        memory = self.machine.memory
        buf = vga.read_screen(memory) if memory is not None else b""
        if buf:
            self._write(vga.framed(buf, self.cursor()))
