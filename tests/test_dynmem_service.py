"""The dynamic memory service against a scripted (hostile) guest: no KVM, real memfd-backed nodes.

What is checked: the balancer's requests per node, release lowering the memfd's usage,
and every kind of bad input (balloon responses outside the node, twice, unrequested, too
many pages; impossible pressure reports; floods; malformed packets) being refused or
clamped with a reason while no page the host did not ask for is ever released.
"""


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.bus.ring import INBAND, Packet
from pykvm.bus.services import dynmem
from pykvm.bus.services.base import ServiceError
from pykvm.memory import GuestMemory, balancer
from pykvm.memory import numa
from pykvm.memory.dynamic import DynamicMemory

M = 1 << 20
PAGE = 4096
MSG, RANGE, STATUS = dynmem.MSG, dynmem.RANGE, dynmem.STATUS


class FakeChannel:
    def __init__(self):
        self.sent = []

    def send(self, ptype, payload=b"", trans_id=0, flags=0, header=b""):
        self.sent.append(bytes(payload))


def machine(node_mem=(16 * M, 16 * M), **kw):
    specs = [f"mem={m >> 20}M,cpus={i},min=4M" for i, m in enumerate(node_mem)]
    cfg = numa.from_options(specs, None, None, None, None)
    lay = numa.plan(cfg, abi.PYKVM_MMIO_HOLE)
    mem = GuestMemory.create_nodes(lay)
    dm = DynamicMemory(mem, cfg, lay)
    events = []
    svc = dynmem.DynMemService(dm, on_event=lambda k, n, f: events.append((k, n, f)))
    ch = FakeChannel()
    sess = svc.open(ch, abi.PYKVM_DYNMEM_V1_0)
    return mem, dm, svc, sess, ch, events


@pytest.fixture
def vm():
    mem, dm, svc, sess, ch, events = machine()
    dynmem.Tuning.min_interval = 0.0
    yield mem, dm, svc, sess, ch, events
    dynmem.Tuning.min_interval = 0.02
    mem.close()


def pkt(payload: bytes) -> Packet:
    return Packet(INBAND, 0, 1, payload)


def status(*nodes, seq=1):
    """nodes: (node, pressure, total, committed, free)."""
    return pkt(MSG.pack(abi.PYKVM_DM_OP_STATUS, len(nodes), seq, 0, 0, 0, 0)
               + b"".join(STATUS.pack(*n) for n in nodes))


def balloon_resp(node, req, ranges, last=True):
    return pkt(MSG.pack(abi.PYKVM_DM_OP_BALLOON_RESP, node, req, abi.PYKVM_DM_FLAG_LAST if last else 0, 0,
                        len(ranges), 0) + b"".join(RANGE.pack(*r) for r in ranges))


def sent_ops(ch):
    return [MSG.unpack_from(p) for p in ch.sent]


def touch(mem, node_gpa, pages):
    for i in range(pages):
        mem.write(node_gpa + i * PAGE, b"\xaa")


def idle_then_balloon(vm):
    """Node 0 reports itself nearly idle; the host asks for pages: (req, pages)."""
    mem, dm, svc, sess, ch, events = vm
    sess.on_packet(status((0, 62, 4096, 256, 3840), (1, 1000, 4096, 4096, 0)))
    ops = sent_ops(ch)
    balloons = [o for o in ops if o[0] == abi.PYKVM_DM_OP_BALLOON]
    assert balloons and balloons[0][1] == 0
    return balloons[0][2], balloons[0][4]


def test_idle_node_is_ballooned_busy_node_grows(vm):
    mem, dm, svc, sess, ch, events = vm
    req, pages = idle_then_balloon(vm)
    assert pages == 4096 - 1024          # down to its 4 MiB minimum (demand 256 pages + 20% is less)
    hot = [o for o in sent_ops(ch) if o[0] == abi.PYKVM_DM_OP_HOTADD]
    assert hot and hot[0][1] == 1 and dm.nodes[1].hot_pages == hot[0][4]
    assert dm.nodes[0].ballooned == 0     # nothing released before the guest answers


def test_release_lowers_host_memory(vm):
    mem, dm, svc, sess, ch, events = vm
    req, pages = idle_then_balloon(vm)
    base = 16 * M - 1000 * PAGE
    touch(mem, base, 1000)
    before = dm.nodes[0].host_bytes()
    sess.on_packet(balloon_resp(0, req, [(base // PAGE, 1000)]))
    assert dm.nodes[0].ballooned == 1000
    assert before - dm.nodes[0].host_bytes() == 1000 * PAGE
    assert mem.read(base, 1) == b"\0"      # the page really went back
    assert 0 not in sess.pending          # the response carried LAST: the request is done


@pytest.mark.parametrize("ranges,why", [
    ([((16 * M) // PAGE, 1)], "not inside node 0"),             # node 1's first page
    ([(0x100000, 1)], "not inside node 0"),                      # nowhere
    ([(100, 2), (101, 1)], "named twice"),
    ([(100, 0)], "not a positive page count"),
    ([(4095, 2)], "not inside node 0"),                          # straddles into node 1
])
def test_bad_balloon_ranges_release_nothing(vm, ranges, why):
    mem, dm, svc, sess, ch, events = vm
    req, _ = idle_then_balloon(vm)
    touch(mem, 0, 4096)
    before = dm.nodes[0].host_bytes() + dm.nodes[1].host_bytes()
    sess.on_packet(balloon_resp(0, req, ranges))
    assert dm.nodes[0].ballooned == dm.nodes[1].ballooned == 0
    assert dm.nodes[0].host_bytes() + dm.nodes[1].host_bytes() == before
    assert any(k == "reject" and why in f["reason"] for k, _n, f in events)


def test_balloon_twice_unrequested_and_too_many(vm):
    mem, dm, svc, sess, ch, events = vm
    req, pages = idle_then_balloon(vm)
    sess.on_packet(balloon_resp(0, req, [(100, 10)], last=False))
    assert dm.nodes[0].ballooned == 10
    sess.on_packet(balloon_resp(0, req, [(105, 10)], last=False))        # overlaps what was given
    sess.on_packet(balloon_resp(0, req + 7, [(300, 1)]))                  # no such request
    sess.on_packet(balloon_resp(1, req, [(5000, 1)]))                     # node 1 was not asked
    sess.on_packet(balloon_resp(0, req, [(1000, pages)]))                 # more than asked
    assert dm.nodes[0].ballooned == 10 and dm.nodes[1].ballooned == 0
    reasons = [f["reason"] for k, _n, f in events if k == "reject"]
    assert len(reasons) == 4
    assert "already given back" in reasons[0] and "nothing of that was asked" in reasons[1]
    assert "nothing of that was asked" in reasons[2] and "were asked" in reasons[3]
    sess.on_packet(balloon_resp(0, req, [(200, 5)]))                      # last: request done
    assert 0 not in sess.pending
    sess.on_packet(balloon_resp(0, req, [(300, 5)]))                      # after it completed
    assert dm.nodes[0].ballooned == 15


def test_impossible_reports_are_rejected_or_clamped(vm):
    mem, dm, svc, sess, ch, events = vm
    sess.on_packet(status((0, 500, 8192, 10, 10)))             # more pages than the node has
    sess.on_packet(status((0, 500, 4096, 3000, 3000)))         # committed + free > total
    sess.on_packet(status((0, 500, 0, 0, 0)))                  # total 0
    sess.on_packet(status((0, 500, 4096, 10, 10), (0, 1, 4096, 10, 10)))   # node twice
    sess.on_packet(status((7, 500, 4096, 10, 10)))             # no node 7
    assert dm.nodes[0].report is None and not ch.sent
    sess.on_packet(status((0, 1, 4096, 2048, 2048)))           # pressure below committed/total
    assert dm.nodes[0].report[3] == 500
    sess.on_packet(status((0, 2**32 - 1, 4096, 2048, 2048)))   # absurd pressure
    assert dm.nodes[0].report[3] == abi.PYKVM_DM_PRESSURE_MAX
    kinds = [k for k, _n, _f in events if k in ("reject", "clamp")]
    assert kinds == ["reject"] * 5 + ["clamp"] * 2


def test_a_flood_of_reports_is_coalesced():
    mem, dm, svc, sess, ch, events = machine()
    try:
        for i in range(5000):
            sess.on_packet(status((0, 1000, 4096, 4096, 0), seq=i))
        assert sess.counts["reports"] == 5000
        assert sess.counts["coalesced"] > 4000
        assert dm.online_pages * PAGE <= dm.cfg.vm_max
    finally:
        mem.close()


@pytest.mark.parametrize("payload", [b"", b"\x01" * 8, MSG.pack(99, 0, 0, 0, 0, 0, 0),
                                     MSG.pack(abi.PYKVM_DM_OP_STATUS, 2, 0, 0, 0, 0, 0) + STATUS.pack(0, 0, 1, 0, 0),
                                     MSG.pack(abi.PYKVM_DM_OP_BALLOON_RESP, 0, 1, 1, 0, 129, 0),
                                     MSG.pack(abi.PYKVM_DM_OP_BALLOON_RESP, 0, 1, 1, 0, 2, 0) + RANGE.pack(1, 1)])
def test_malformed_packets_close_the_channel(vm, payload):
    mem, dm, svc, sess, ch, events = vm
    with pytest.raises(ServiceError):
        sess.on_packet(pkt(payload))


def test_non_inband_refused(vm):
    with pytest.raises(ServiceError):
        vm[3].on_packet(Packet(abi.PYKVM_VMPKT_DATA_GPA_DIRECT, 0, 1, b"\0" * 32))


u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
small = st.integers(0, 9000)
op = st.sampled_from([abi.PYKVM_DM_OP_STATUS, abi.PYKVM_DM_OP_BALLOON_RESP, abi.PYKVM_DM_OP_HOTADD_ACK, 7])
messages = st.lists(st.tuples(op, st.integers(0, 3), st.integers(0, 4), st.integers(0, 1), small,
                              st.lists(st.tuples(st.one_of(small, u64), st.one_of(small, u64)), max_size=4),
                              st.lists(st.tuples(st.integers(0, 3), u32, small, small, small), max_size=3)),
                    max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=messages)
def test_hostile_guest_never_gets_an_unrequested_page_released(msgs):
    mem, dm, svc, sess, ch, events = machine()
    dynmem.Tuning.min_interval = 0.0
    try:
        asked = {0: 0, 1: 0}
        for kind, node, req, flags, pages, ranges, nodes in msgs:
            if kind == abi.PYKVM_DM_OP_STATUS:
                p = status(*nodes) if nodes else pkt(MSG.pack(kind, 0, 0, 0, 0, 0, 0))
            elif kind == abi.PYKVM_DM_OP_BALLOON_RESP:
                p = balloon_resp(node, req, ranges, bool(flags))
            else:
                p = pkt(MSG.pack(kind, node, req, flags, pages, 0, 0))
            n_before = len(ch.sent)
            try:
                sess.on_packet(p)
            except ServiceError:
                pass
            for o in sent_ops(ch)[n_before:]:
                if o[0] == abi.PYKVM_DM_OP_BALLOON:
                    asked[o[1]] += o[4]
        for n in dm.nodes:
            assert n.ballooned <= asked[n.index]                       # never more than was asked
            assert n.online >= n.spec.min // PAGE                       # never below its minimum
            assert sum(bm.count(1) for bm in n.maps.values()) == n.ballooned
        assert dm.online_pages * PAGE <= dm.cfg.vm_max
    finally:
        dynmem.Tuning.min_interval = 0.02
        mem.close()


@settings(max_examples=500, deadline=None)
@given(mn=st.integers(1, 4000), extra=st.integers(0, 4000), online=st.integers(1, 9000), ballooned=st.integers(0, 4000),
       room=st.integers(0, 4000), committed=st.integers(0, 9000), pressure=st.integers(0, 10000),
       buf=st.integers(0, 100), headroom=st.integers(-100, 5000))
def test_balancer_stays_within_min_max_and_vm_headroom(mn, extra, online, ballooned, room, committed, pressure, buf,
                                                       headroom):
    mx = mn + extra
    total = max(online, 1)
    v = balancer.NodeView(min=mn, max=mx, online=online, ballooned=ballooned, hot_room=room,
                          committed=min(committed, total), total=total, pressure=pressure, buffer=buf)
    d = balancer.decide(v, headroom, 256, 64)
    assert d.pages >= 0
    if d.action == "balloon":
        assert online - d.pages >= mn
    elif d.action == "unballoon":
        assert d.pages <= min(ballooned, headroom)
    elif d.action == "hotadd":
        assert d.pages <= min(room, headroom) and online + d.pages <= mx
