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

Block offers carry the DATA_BUFFER flag: the guest's open names a second GPADL, its data
buffer, whose pages go to the service partition with the ring's, so requests name byte
ranges in it and the data is never copied by a host (pykvm_abi.h "block over a direct
channel").

Teardown is strict: from the open until the service VMM said it removed its mappings
(the broker relays that "closed" acknowledgement) or its provider is known down, this
VMM holds the channel's GPADLs (ChannelManager.hold): the guest's GPADL_TEARDOWN is
answered only then, so it cannot reuse pages another partition's guest may still map.
When the broker itself is gone nothing can confirm the unmap: the GPADLs stay held.
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
        self.held: list[int] = []
        host = channel.host
        self.end = direct.ClientEnd(host.doorbells.vm, channel.relid, channel.irq)
        try:
            runs, fds = direct.describe(host.memory, channel.view.pfns)
            desc = {"runs": runs, "inbound_offset": channel.inbound_offset, "version": version}
            if channel.data_view is not None:
                desc["data_runs"], fds = direct.describe(host.memory, channel.data_view.pfns, fds,
                                                         abi.PYKVM_DIRECT_DATA_MAX_PAGES, "data buffer")
        except direct.DirectError as e:
            self.end.close()
            raise ValueError(str(e)) from None
        for gid in (channel.gpadl_id, channel.data_gpadl_id):
            if gid is not None:
                host.hold(gid)
                self.held.append(gid)
        self.tag = service.link.open_direct(service.index, desc, list(fds) + [self.end.efd], self._ready)

    def _ready(self, ok: bool, reason: str | None, fd: int, unmapped: bool = True) -> None:
        """The broker's answer (link thread, bus lock held); unmapped: False when the service side may map it."""
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
        if unmapped:                      # nothing was mapped (or the service side undid it before refusing)
            self._unmapped()
        ch = self.channel
        if ch.is_open and ch.session is self:
            ch.host.channel_violation(ch, f"no direct channel to {self.service.target}: {self.reason}")

    def on_packet(self, pkt) -> None:
        """Never called: the service partition's guest reads this channel's ring."""

    def _unmapped(self) -> None:
        """No other partition maps this channel's pages any more: the guest's teardown may complete."""
        held, self.held = self.held, []
        for gid in held:
            self.channel.host.release(gid)
        if held and self.state == "closed":
            self.service.link.log(f"{self.service.name}: channel {self.channel.relid}: the service side no longer "
                                  f"maps its pages; GPADLs {', '.join(map(str, held))} released to the guest")

    def stats(self) -> dict:
        return {"direct": self.state, "served_by": self.service.target, "reason": self.reason,
                "doorbells_wired": self.end.wired, "version": f"{self.version >> 16}.{self.version & 0xFFFF}",
                "data_buffer": self.channel.data_gpadl_id is not None, "gpadls_held": list(self.held)}

    def close(self) -> None:
        was, self.state = self.state, "closed"
        self.end.close()                  # first: the service's doorbell no longer reaches this guest
        if was in ("opening", "direct") and self.tag is not None:
            self.service.link.close_direct(self.tag, self.service.target, self._unmapped)
        # refused: released then, or held for good when the broker went away with the open unanswered


class DirectProxyService(BlockProxyService):
    """An offer of another partition's service that its guest serves over direct channels."""

    def __init__(self, link, index: int, target: str, ledger, interface: str):
        super().__init__(link, index, target, ledger)
        self.kind = interface
        self.offer_flags = abi.PYKVM_BUS_OFFER_FLAG_DATA_BUFFER if interface == "block" else 0
        self.interface = INTERFACES[interface]
        self.default_versions = DEFAULT_VERSIONS[interface]
        self.name = f"{interface}@{target} (direct)"

    def open(self, channel, version: int) -> Session:
        return DirectSession(channel, version, self)

    def stats(self) -> dict:
        return dict(super().stats(), direct=True)
