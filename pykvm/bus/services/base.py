"""What a bus service is: an interface id, the versions it speaks, and a session per open channel."""

from __future__ import annotations

import struct

from ..messages import negotiate, versions_text


class ServiceError(Exception):
    """A packet the service refuses; the channel is closed with this reason."""


class Session:
    """One open channel of a service: on_packet() runs on the bus thread for each guest packet."""

    def __init__(self, channel, version: int):
        self.channel = channel        # bus.channel.Channel: send(), close(reason)
        self.version = version

    def on_packet(self, pkt) -> None:
        """Handle one validated packet (bus.ring.Packet)."""
        raise NotImplementedError

    def stats(self) -> dict:
        """Service counters for `ctl stats` and crash cores."""
        return {}

    def close(self) -> None:
        """The channel is going away; release what the session holds."""


class Service:
    """A service type the root offers; subclasses set name, interface, versions and session."""

    name = "service"
    interface: tuple[int, int] = (0, 0)     # (lo, hi) of the interface type id
    versions: tuple[int, ...] = ()          # newest first
    session_class = Session
    transfer_pages = 0                      # pages of a transfer page set each open channel gets

    def choose_version(self, proposed) -> tuple[int | None, str | None]:
        """(version to open at, None) or (None, why not) for the guest's proposal (newest first)."""
        version = negotiate(proposed, self.versions)
        if version is None:
            return None, (f"the guest speaks {versions_text(proposed)}, the service {versions_text(self.versions)}: "
                          "no common major version")
        return version, None

    def open(self, channel, version: int) -> Session:
        """A session for a channel the guest opened at `version`."""
        return self.session_class(channel, version)

    def stats(self) -> dict:
        """Service-wide counters (beyond its sessions')."""
        return {}

    def close(self) -> None:
        """The VM is stopping."""


def unpack_exact(st: struct.Struct, payload: bytes, what: str) -> tuple:
    """st.unpack of the start of payload, or ServiceError when it is too short."""
    if len(payload) < st.size:
        raise ServiceError(f"{what}: {len(payload)} bytes, expected at least {st.size}")
    return st.unpack_from(payload)
