"""The bus's host side put back by a reset (BusHost.rewind_point / check_rewind / rewind).

A snapshot of a guest connected to the bus holds the connection (its management pages, version
and vCPU), the GPADLs and the offers; a reset puts them back after guest RAM, where the
management rings live, was restored. Channels opened since close on the host side only (the
guest, reset, never opened them); GPADLs made since go, GPADLs torn down since come back. What
cannot be rewound is refused before anything changes: a channel open at the snapshot, offers
rescinded or re-offered since, pages another partition still maps.
"""

from __future__ import annotations

import pytest

from pykvm import abi
from pykvm.bus import messages as M
from pykvm.bus.gpadl import GpadlView
from pykvm.bus.ring import RingReader, RingWriter
from pykvm.memory import MIB, GuestMemory

from .test_bus_host_hostile import MGMT_PAGES, MGMT_PFN, PAGE, V10, V11, Guest
from .test_bus_messages import enc_msg

RAM = 1 * MIB                       # the low RAM the management rings and GPADLs use


def _reattach(g: Guest) -> None:
    """The guest's own ring cursors as its reset RAM holds them (a real guest's live in that RAM)."""
    g._detach()
    g.view = GpadlView.create(g.mem, [MGMT_PFN + i for i in range(2 * MGMT_PAGES)])
    g.out = RingWriter.from_view(g.view, 0, MGMT_PAGES)
    g.inp = RingReader.from_view(g.view, MGMT_PAGES, MGMT_PAGES)
    g.replies.clear()


def _gpadl(g: Guest, gid: int, first: int, n: int = 4) -> None:
    g.send(enc_msg(M.GpadlHeader(gid, n, tuple(range(first, first + n)))))
    assert g.reply("gpadl_created", gid) == (gid, abi.PYKVM_BUS_OK)


def _open(g: Guest, relid: int, gid: int) -> tuple:
    g.send(enc_msg(M.OpenChannel(relid, gid, 2, 0, (abi.PYKVM_ECHO_V1_1,), 0)))
    return g.reply("open_result", relid)[:2]


@pytest.fixture
def guest():
    mem = GuestMemory.create(2 * MIB, 1 * MIB)
    g = Guest(mem)
    yield g
    g.close()
    mem.close()


def _contact(g: Guest) -> None:
    assert g.connect() == abi.PYKVM_BUS_STATE_CONNECTED
    g.send(enc_msg(M.InitiateContact((V11, V10), 0)))
    assert g.reply("version_response")[:2] == (1, V10)


def test_rewind_puts_connection_gpadls_and_channels_back(guest):
    g = guest
    _contact(g)
    _gpadl(g, 1, 200)
    host = g.host
    point = host.rewind_point()
    ram = g.mem.read(0, RAM)
    # after the snapshot: a channel opened on GPADL 1, GPADL 2 made, the channel closed, GPADL 1 torn down,
    # another channel opened on GPADL 2 and left open
    assert _open(g, 1, 1) == (1, abi.PYKVM_BUS_OK)
    _gpadl(g, 2, 210)
    g.send(enc_msg(M.CloseChannel(1)))
    g.send(enc_msg(M.GpadlTeardown(1)))
    assert g.reply("gpadl_torndown", 1) == (1, abi.PYKVM_BUS_OK)
    assert _open(g, 1, 2) == (1, abi.PYKVM_BUS_OK)
    assert set(host.gpadls) == {2} and host.channels[1].is_open
    with host.lock:
        host.check_rewind(point)
        g.mem.write(0, ram)             # what restore() does to guest RAM between the two
        host.rewind(point)
    _reattach(g)
    assert host.state == "contact" and host.version == V10
    assert set(host.gpadls) == {1} and host.gpadls[1].pfns == (200, 201, 202, 203)
    assert not any(ch.is_open for ch in host.channels.values())
    # the guest, as at the snapshot, carries on: its management ring is served, GPADL 1 is there
    g.send(enc_msg(M.RequestOffers()))
    assert g.reply("all_offers_delivered") is not None
    assert _open(g, 1, 1) == (1, abi.PYKVM_BUS_OK)
    assert host.violations == 0, host.refusals


def test_rewind_to_before_the_connection_leaves_the_bus_idle(guest):
    g = guest
    point = g.host.rewind_point()
    ram = g.mem.read(0, RAM)
    _contact(g)
    _gpadl(g, 1, 200)
    assert _open(g, 1, 1) == (1, abi.PYKVM_BUS_OK)
    with g.host.lock:
        g.host.check_rewind(point)
        g.mem.write(0, ram)
        g.host.rewind(point)
    assert g.host.state == "idle" and not g.host.gpadls
    assert abi.PYKVM_BUS_MGMT_RELID not in g.bells.callbacks
    _contact(g)                         # connects again (before the fix: "connect while contact")
    assert g.host.violations == 0 and g.host.refusal_count == 0


def test_what_cannot_be_rewound_is_refused_before_anything_changes(guest):
    g = guest
    _contact(g)
    _gpadl(g, 1, 200)
    assert _open(g, 1, 1) == (1, abi.PYKVM_BUS_OK)
    with pytest.raises(ValueError, match=r"bus channel 1 \(echo\) is open at the snapshot"):
        g.host.rewind_point()
    g.send(enc_msg(M.CloseChannel(1)))
    g.drain()
    point = g.host.rewind_point()
    # pages another partition's guest may still map (a direct channel opened since)
    g.host.channel_mgmt.hold(1)
    with pytest.raises(ValueError, match="still mapped by another partition"):
        g.host.check_rewind(point)
    with g.host.lock:
        g.host.channel_mgmt.release(1)
    # an offer rescinded since: the reset guest would use a channel the host no longer offers
    g.host.rescind(1)
    with pytest.raises(ValueError, match="offers changed since the snapshot"):
        g.host.check_rewind(point)
    assert set(g.host.gpadls) == {1} and g.host.state == "contact"


def test_rings_the_guest_had_broken_by_the_snapshot_end_the_connection_at_reset(guest):
    g = guest
    _contact(g)
    g.scribble(MGMT_PFN * PAGE + 4, (0xFFFFFFF3).to_bytes(4, "little"))    # its ring's read_index: garbage
    point = g.host.rewind_point()
    ram = g.mem.read(0, RAM)
    with g.host.lock:
        g.host.check_rewind(point)
        g.mem.write(0, ram)
        g.host.rewind(point)             # no exception out of the reset: the host disconnects, as at run time
    assert g.host.state == "idle" and "management rings at the snapshot are broken" in g.logs[-1]
    assert g.connect() == abi.PYKVM_BUS_STATE_CONNECTED
