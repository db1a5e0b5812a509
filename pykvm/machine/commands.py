"""The control channel's command table, apart from the channel itself.

Layers register their `pykvm ctl` commands at import with `command(name)`; keeping the table
here lets them do so without importing the socket server (and socket, selectors, json),
which a run without --control never needs.
"""

from __future__ import annotations

COMMANDS: dict = {}


def command(name: str):
    """Register `fn(machine, request) -> dict` as the handler of a control command."""
    def deco(fn):
        COMMANDS[name] = fn
        return fn
    return deco
