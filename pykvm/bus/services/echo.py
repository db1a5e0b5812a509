"""echo: returns what it is sent (v1.0); v1.1 also answers how many messages it echoed."""

from __future__ import annotations

import struct

from ... import abi
from ..ring import INBAND
from .base import Service, ServiceError, Session, unpack_exact

_HDR = struct.Struct("<II")     # struct pykvm_echo_msg: op, len
_COUNT = struct.Struct("<IIQ")


class EchoSession(Session):
    """One echo channel."""

    def __init__(self, channel, version):
        super().__init__(channel, version)
        self.echoed = 0

    def on_packet(self, pkt) -> None:
        if pkt.type != INBAND:
            raise ServiceError(f"echo takes in-band packets, got type {pkt.type}")
        op, length = unpack_exact(_HDR, pkt.payload, "echo message")
        if op == abi.PYKVM_ECHO_OP_ECHO:
            if length > abi.PYKVM_ECHO_MAX or _HDR.size + length > len(pkt.payload):
                raise ServiceError(f"echo message claims {length} bytes, carries {len(pkt.payload) - _HDR.size}")
            self.echoed += 1
            self.channel.send(INBAND, pkt.payload[:_HDR.size + length], pkt.trans_id)
        elif op == abi.PYKVM_ECHO_OP_COUNT and self.version >= abi.PYKVM_ECHO_V1_1:
            self.channel.send(INBAND, _COUNT.pack(op, 8, self.echoed), pkt.trans_id)
        else:
            raise ServiceError(f"echo {self.version >> 16}.{self.version & 0xFFFF}: unknown operation {op}")

    def stats(self) -> dict:
        return {"echoed": self.echoed}


class EchoService(Service):
    """The echo service (benchmarks and version negotiation)."""

    name = "echo"
    interface = (abi.PYKVM_BUS_IF_ECHO_LO, abi.PYKVM_BUS_IF_ECHO_HI)
    versions = (abi.PYKVM_ECHO_V1_1, abi.PYKVM_ECHO_V1_0)
    session_class = EchoSession
