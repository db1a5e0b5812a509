"""The broker's end of one partition's link: a socketpair end bound to that partition, never blocking.

The broker makes a socketpair per partition process before it starts it and hands the
child the other end; so who speaks on a Conn is fixed when it is made (`identity`), not
claimed by the peer. Sending never blocks the broker: frames (and the descriptors sent
with them) wait in an output queue that the selector drains as the peer reads. A peer
that stops reading while frames pile up past MAX_OUT is marked `stalled` and dropped by
the broker, so one partition cannot stall the relay for the others.
"""

from __future__ import annotations

import array
import os
import socket
from collections import deque

from ..bus import wire

MAX_OUT = 16 << 20        # bytes queued for a peer that does not read; more and it is dropped


class Conn:
    """One partition's link as the broker sees it."""

    def __init__(self, sock: socket.socket, identity: str):
        sock.setblocking(False)
        self.sock = sock
        self.identity = identity     # the partition this socketpair was made for
        self.name = None             # set once it said hello (as `identity`)
        self.parser = wire.FrameParser()
        self.progress = 0.0          # a provider: when it last answered (or was given work while idle)
        self.grants: list = []       # a client: its Grant per service it uses, in `uses` order
        self._out: deque = deque()   # [memoryview of the rest of a frame, descriptors still to send]
        self.out_bytes = 0
        self.stalled = False
        self.closed = False

    def send(self, data: bytes, fds=()) -> None:
        """Queue a frame (fds: descriptors to attach, duplicated here) and send what the socket takes now."""
        if self.closed or self.stalled:
            return
        fds = tuple(os.dup(fd) for fd in fds)
        self._out.append([memoryview(data), fds])
        self.out_bytes += len(data)
        if self.out_bytes > MAX_OUT:
            self.stalled = True
        self.flush()

    @property
    def pending(self) -> bool:
        """Bytes wait for the peer to read."""
        return bool(self._out)

    def flush(self) -> None:
        """Send queued bytes until the socket would block (OSError: the peer is gone)."""
        while self._out:
            item = self._out[0]
            data, fds = item
            try:
                if fds:
                    n = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    wire.close_fds(fds)          # in the peer's queue now; the broker keeps no copy
                    item[1] = ()
                else:
                    n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            self.out_bytes -= n
            if n < len(data):
                item[0] = data[n:]
                return
            self._out.popleft()

    def close(self) -> None:
        """Close the socket and anything still queued or held for a frame."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        self.parser.close()
        while self._out:
            wire.close_fds(self._out.popleft()[1])
        self.out_bytes = 0
