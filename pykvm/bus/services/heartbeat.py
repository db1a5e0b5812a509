"""heartbeat: the guest says it is alive; the host counts beats for `ctl stats`."""

from __future__ import annotations

import struct
import time

from ... import abi
from ..ring import INBAND
from .base import Service, ServiceError, Session, unpack_exact

_IC = struct.Struct("<IIQ")     # struct pykvm_ic_msg


class HeartbeatSession(Session):
    """One heartbeat channel."""

    def __init__(self, channel, version):
        super().__init__(channel, version)
        self.beats = 0
        self.last_seq = None
        self.last_beat = None

    def on_packet(self, pkt) -> None:
        if pkt.type != INBAND:
            raise ServiceError(f"heartbeat takes in-band packets, got type {pkt.type}")
        op, _flags, seq = unpack_exact(_IC, pkt.payload, "heartbeat message")
        if op != abi.PYKVM_HEARTBEAT_OP_BEAT:
            raise ServiceError(f"heartbeat: unknown operation {op}")
        self.beats += 1
        self.last_seq = seq
        self.last_beat = time.monotonic()

    def stats(self) -> dict:
        age = None if self.last_beat is None else round(time.monotonic() - self.last_beat, 3)
        return {"beats": self.beats, "last_seq": self.last_seq, "seconds_since_last": age}


class HeartbeatService(Service):
    """The heartbeat integration service."""

    name = "heartbeat"
    interface = (abi.PYKVM_BUS_IF_HEARTBEAT_LO, abi.PYKVM_BUS_IF_HEARTBEAT_HI)
    versions = (abi.PYKVM_HEARTBEAT_V1_0,)
    session_class = HeartbeatSession
