"""The client partition's side of a direct channel: an offer whose rings the service partition's guest serves.

When this partition's guest opens the offer, the session wires the channel for direct
use (pykvm/bus/direct.py ClientEnd: the guest's doorbell becomes an eventfd no thread of
this VMM waits on) and asks the broker, with the ring GPADL's memfds and that eventfd,
for a direct channel to the service partition. The service VMM maps the ring pages into
its guest and answers with its own doorbell eventfd, which becomes an irqfd on the
channel's interrupt here. This VMM never reads or writes the rings of a direct channel:
its bus thread is not registered for the channel's doorbell at all (BusHost skips
sessions marked `direct`). A refusal (policy, the service side could not map) closes the
channel with the reason; the broker decided at welcome which services go direct, so a
refusal here means the situation changed (or a policy the broker enforces again).
"""

from __future__ import annotations

import os

from ... import abi
from .. import direct
from .base import Session
from .proxy import BlockProxyService

INTERFACES = {"echo": (abi.PYKVM_BUS_IF_ECHO_LO, abi.PYKVM_BUS_IF_ECHO_HI),
              "block": (abi.PYKVM_BUS_IF_BLOCK_LO, abi.PYKVM_BUS_IF_BLOCK_HI)}
DEFAULT_VERSIONS = {"echo": (abi.PYKVM_ECHO_V1_1, abi.PYKVM_ECHO_V1_0), "block": (abi.PYKVM_BLOCK_V1_0,)}


class DirectSession(Session):
    """One open direct channel, from the client VMM: set up, then out of the way."""

    direct = True                 # BusHost: register no doorbell, never process the rings

    def __init__(self, channel, version, service):
        super().__init__(channel, version)
        self.service = service
        self.state = "opening"
        self.reason = None
        self.tag = None
        host = channel.host
        self.end = direct.ClientEnd(host.doorbells.vm, channel.relid, channel.irq)
        try:
            runs, fds = direct.describe(host.memory, channel.view.pfns)
        except direct.DirectError:
            self.end.close()
            raise ValueError("the ring pages are not guest RAM") from None
        desc = {"runs": runs, "inbound_offset": channel.inbound_offset, "version": version}
        self.tag = service.link.open_direct(service.index, desc, list(fds) + [self.end.efd], self._ready)

    def _ready(self, ok: bool, reason: str | None, fd: int) -> None:
        """The broker's answer (link thread, bus lock held)."""
        if self.state != "opening":
            if fd >= 0:
                os.close(fd)
            return
        if ok:
            try:
                self.end.attach(fd)
                self.state = "direct"
                return
            except direct.DirectError as e:
                reason = str(e)
        self.state = "refused"
        self.reason = reason or "refused"
        ch = self.channel
        if ch.is_open and ch.session is self:
            ch.host.channel_violation(ch, f"no direct channel to {self.service.target}: {self.reason}")

    def on_packet(self, pkt) -> None:
        """Never called: the service partition's guest reads this channel's ring."""

    def stats(self) -> dict:
        return {"direct": self.state, "served_by": self.service.target, "reason": self.reason,
                "doorbells_wired": self.end.wired, "version": f"{self.version >> 16}.{self.version & 0xFFFF}"}

    def close(self) -> None:
        was, self.state = self.state, "closed"
        self.end.close()                  # first: the service's doorbell no longer reaches this guest
        if was in ("opening", "direct") and self.tag is not None:
            self.service.link.close_direct(self.tag)


class DirectProxyService(BlockProxyService):
    """An offer of another partition's service that its guest serves over direct channels."""

    def __init__(self, link, index: int, target: str, ledger, interface: str):
        super().__init__(link, index, target, ledger)
        self.kind = interface
        self.interface = INTERFACES[interface]
        self.default_versions = DEFAULT_VERSIONS[interface]
        self.name = f"{interface}@{target} (direct)"

    def open(self, channel, version: int) -> Session:
        return DirectSession(channel, version, self)

    def stats(self) -> dict:
        return dict(super().stats(), direct=True)
