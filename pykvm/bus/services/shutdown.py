"""shutdown: the host asks the guest to power off cleanly; the guest acknowledges, then powers off."""

from __future__ import annotations

import struct

from ... import abi
from ..ring import COMPLETION, INBAND
from .base import Service, ServiceError, Session

_IC = struct.Struct("<IIQ")     # struct pykvm_ic_msg


class ShutdownSession(Session):
    """One shutdown channel."""

    def __init__(self, channel, version):
        super().__init__(channel, version)
        self.requested = 0
        self.acknowledged = 0

    def request(self) -> None:
        """Ask the guest to power off."""
        self.requested += 1
        self.channel.send(INBAND, _IC.pack(abi.PYKVM_SHUTDOWN_OP_REQUEST, 0, self.requested), self.requested)

    def on_packet(self, pkt) -> None:
        if pkt.type != COMPLETION or not 1 <= pkt.trans_id <= self.requested:
            raise ServiceError(f"shutdown: unexpected packet type {pkt.type} transaction {pkt.trans_id}")
        self.acknowledged += 1

    def stats(self) -> dict:
        return {"requested": self.requested, "acknowledged": self.acknowledged}


class ShutdownService(Service):
    """The shutdown integration service."""

    name = "shutdown"
    interface = (abi.PYKVM_BUS_IF_SHUTDOWN_LO, abi.PYKVM_BUS_IF_SHUTDOWN_HI)
    versions = (abi.PYKVM_SHUTDOWN_V1_0,)
    session_class = ShutdownSession
