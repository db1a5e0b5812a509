"""A rescinded channel offered again (issue 12 recovery), without KVM: the BusHost of test_bus_host_hostile."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.bus import channel_mgmt as H
from pykvm.bus import messages as M

from .test_bus_host_hostile import ECHO, LIMITS, Guest, check, mem  # noqa: F401  (mem is a fixture)
from .test_bus_messages import enc_msg

_OFFER = struct.Struct("<IIQQQQ")


def _offers(g: Guest) -> list[tuple]:
    g.drain()
    return [_OFFER.unpack_from(body) for k, body in g.replies if k == M.MSG["offer"]]


def _echo_relid(g: Guest) -> int:
    return next(ch.relid for ch in g.host.channels.values() if ch.service.name == "echo" and ch.state != "rescinded")


def test_rescind_then_a_fresh_offer_under_a_new_relid_and_the_guest_reopens(mem):
    g = Guest(mem)
    try:
        g.connect()
        assert g.clean_echo()
        old = _echo_relid(g)
        gid = g.host.channels[old].gpadl_id
        instance = g.host.channels[old].instance
        g.replies.clear()
        g.host.rescind(old)
        assert g.reply("rescind", old) == (old, 0)
        assert old not in g.bells                              # the old channel's doorbell is gone
        new = g.host.reoffer(old)
        assert new == 4                                        # never a relid used before (echo, shutdown, heartbeat)
        (offer,) = [o for o in _offers(g) if (o[2], o[3]) == ECHO]
        assert offer[0] == new and (offer[4], offer[5]) == instance
        # the driver tears down the old rings and releases the old relid, as bus.c does
        g.send(enc_msg(M.GpadlTeardown(gid)))
        g.send(enc_msg(M.RelidReleased(old)))
        g.drain()
        assert old not in g.host.channels and g.host.violations == 0
        with pytest.raises(ValueError, match="not rescinded"):
            g.host.reoffer(new)
        assert g.clean_echo() == struct.pack("<II", abi.PYKVM_ECHO_OP_ECHO, 5) + b"hello"
        assert g.host.channels[new].is_open and g.host.violations == 0
    finally:
        g.close()


def test_a_guest_that_ignores_rescinds_gets_refusals_and_the_host_stays_bounded(mem):
    g = Guest(mem, limits=dict(LIMITS, max_violations=10**6))
    seen = [0, 0]
    try:
        g.connect()
        assert g.clean_echo()
        first = _echo_relid(g)
        relids = [first]
        while True:
            cur = relids[-1]
            g.host.rescind(cur)
            # the guest carries on with the old channel: doorbells, an open, a close; it never releases
            g.bells.ring(cur)
            g.send(enc_msg(M.OpenChannel(cur, 1, 2, 0, (abi.PYKVM_ECHO_V1_1,))))
            g.send(enc_msg(M.CloseChannel(cur)))
            g.drain()
            check(g, seen)
            try:
                relids.append(g.host.reoffer(cur))
            except ValueError as e:
                assert "no relid left" in str(e)
                break
            assert len(g.host.channels) <= 3 + H.MAX_RETIRED + 1
        assert relids[-1] == H.MAX_RELID and g.host.violations >= 2 * (len(relids) - 1)
        assert g.reply("open_result", first)[1] == abi.PYKVM_BUS_E_NOT_FOUND
        # a release of a relid the host forgot is one more refusal, nothing worse
        g.send(enc_msg(M.RelidReleased(first)))
        g.drain()
        check(g, seen)
        assert g.bells.failures == [] and g.host.state == "contact"
    finally:
        g.close()


class _AllowAll:
    def check(self, *args):
        return None


def _client(mem):
    """A guest whose bus has echo and a proxied block offer of disk0, and the partition link feeding it."""
    import socket

    from pykvm.bus.host import BusHost, Limits
    from pykvm.bus.link import PartitionLink
    from pykvm.bus.services.echo import EchoService
    from pykvm.bus.services.proxy import BlockProxyService

    a, b = socket.socketpair()
    link = PartitionLink(a, {"name": "client1", "uses": ["disk0"]}, log=lambda m: None)
    g = Guest(mem)
    g.host.close()
    g.host = BusHost(mem, g.bells, g.irqs, [EchoService(), BlockProxyService(link, 0, "disk0", _AllowAll())],
                     limits=Limits(**LIMITS), log=g.logs.append)
    link.bus = g.host
    g.connect()
    g.send(enc_msg(M.InitiateContact((abi.PYKVM_BUS_VERSION_1_0,), 0)))
    g.send(enc_msg(M.RequestOffers()))
    g.drain()
    return g, link, b


BLOCK = (abi.PYKVM_BUS_IF_BLOCK_LO, abi.PYKVM_BUS_IF_BLOCK_HI)


def test_link_status_rescinds_the_proxied_offer_and_offers_it_again(mem):
    from pykvm.bus import wire

    g, link, peer = _client(mem)
    try:
        assert [o[0] for o in _offers(g) if (o[2], o[3]) == BLOCK] == [2]
        g.replies.clear()
        status = lambda state: wire.json_frame(wire.STATUS, {"service": "disk0", "state": state})[8:]  # noqa: E731
        link._dispatch(wire.STATUS, status("up"))           # already offered: nothing changes
        link._dispatch(wire.STATUS, status("down"))
        link._dispatch(wire.STATUS, status("down"))         # once only
        assert g.reply("rescind") == (2, 0) and [k for k, _b in g.replies] == [M.MSG["rescind"]]
        link._dispatch(wire.STATUS, status("up"))
        assert [o[0] for o in _offers(g) if (o[2], o[3]) == BLOCK] == [3]
        assert link.counts["rescinds"] == 1 == link.counts["reoffers"]
        assert g.host.channels[1].state == "offered"        # echo is untouched
    finally:
        g.close()
        peer.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["service", "state", "x"]),
                       st.one_of(st.sampled_from(["disk0", "disk1", "up", "down", "gone"]), st.integers(), st.none(),
                                 st.lists(st.text(max_size=3), max_size=2)), max_size=3))
def test_link_status_takes_only_valid_reports(mem, obj):
    from pykvm.bus import wire

    g, link, peer = _client(mem)
    try:
        try:
            link._dispatch(wire.STATUS, wire.json_frame(wire.STATUS, obj)[8:])
        except wire.WireError:
            assert obj.get("service") != "disk0" or obj.get("state") not in ("up", "down")
        else:
            assert obj.get("service") == "disk0" and obj.get("state") in ("up", "down")
        assert g.bells.failures == [] and g.host.violations == 0
    finally:
        g.close()
        peer.close()
