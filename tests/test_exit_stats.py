"""`stats` counts every exit, including port I/O the hot loop handles inline (issue 9)."""

from __future__ import annotations

import os

import pytest

from .helpers import guest


@pytest.mark.kvm
def test_port_io_exits_of_the_hot_loop_are_counted():
    from pykvm.machine import Machine, MachineConfig

    r, w = os.pipe()
    try:
        with Machine(MachineConfig(kernel=guest("hello"), mem=16 << 20, serial_out=w, timeout=30)) as m:
            out = m.run()
            stats = m.stats()
    finally:
        os.close(w)
        printed = b""
        while chunk := os.read(r, 65536):
            printed += chunk
        os.close(r)
    assert out.status in (0, 1), out
    io = stats["exits"][0].get("KVM_EXIT_IO", 0)
    # every byte printed is at least one OUT to the UART's data register
    assert len(printed) > 0 and io >= len(printed)
