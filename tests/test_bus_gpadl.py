"""GPADL views: PFN validation, one mapping of exactly the named pages, and real teardown."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.bus.gpadl import GpadlError, GpadlView
from pykvm.memory import GIB, MIB, GuestMemory

PAGE = 4096
HOLE = 0x100000   # a 1 MiB "hole" start so a small VM has RAM above 4 GiB too


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.create(2 * MIB, HOLE)   # [0, 1 MiB) and [4 GiB, 4 GiB + 1 MiB)
    yield m
    m.close()


def _memfd_mappings():
    with open("/proc/self/maps") as f:
        return sum("memfd:pykvm-" in line for line in f)


HIGH = (4 * GIB) // PAGE


@pytest.mark.parametrize("pfns, reason", [
    ([], "no pages"),
    ([HOLE // PAGE], "not guest RAM"),                 # first page of the MMIO hole
    ([0xD0000], "not guest RAM"),                      # deep in the hole
    ([HIGH + 256], "not guest RAM"),                   # just past the top of RAM
    ([1 << 40], "not a page frame number"),
    ([-1], "not a page frame number"),
    ([True], "not a page frame number"),
    ([1.0], "not a page frame number"),
    ([3, 4, 3], "repeated"),
    ([HIGH, HIGH], "repeated"),
])
def test_bad_page_lists_are_refused(mem, pfns, reason):
    with pytest.raises(GpadlError, match=reason):
        GpadlView.create(mem, pfns)


def test_page_count_is_bounded(mem):
    with pytest.raises(GpadlError, match="more than the limit of 4"):
        GpadlView.create(mem, [1, 2, 3, 4, 5], max_pages=4)
    GpadlView.create(mem, [1, 2, 3, 4], max_pages=4).close()


def test_view_and_guest_memory_see_each_other(mem):
    pfns = [10, 11, 12, HIGH + 5, 7, HIGH + 6]
    with GpadlView.create(mem, pfns) as v:
        assert v.size == len(pfns) * PAGE and v.runs == 4
        for i, pfn in enumerate(pfns):
            v.write(i * PAGE + 100, bytes([i + 1]) * 8)
            assert mem.read(pfn * PAGE + 100, 8) == bytes([i + 1]) * 8
            mem.write(pfn * PAGE + PAGE - 4, b"G%03d" % i)
        for i in range(len(pfns)):
            assert v.read(i * PAGE + PAGE - 4, 4) == b"G%03d" % i
        with v.buf as b:   # a write across a run boundary lands in both pages
            b[3 * PAGE - 2:3 * PAGE + 2] = b"ABCD"
        assert mem.read(13 * PAGE - 2, 2) == b"AB" and mem.read((HIGH + 5) * PAGE, 2) == b"CD"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=12, unique=True), st.data())
def test_any_valid_page_list_maps_those_pages(mem, pages, data):
    pfns = [p if p < 128 else HIGH + p for p in pages]
    with GpadlView.create(mem, pfns) as v:
        i = data.draw(st.integers(0, len(pfns) - 1))
        blob = data.draw(st.binary(min_size=1, max_size=64))
        off = data.draw(st.integers(0, PAGE - len(blob)))
        v.write(i * PAGE + off, blob)
        assert mem.read(pfns[i] * PAGE + off, len(blob)) == blob


def test_access_outside_the_view_raises(mem):
    with GpadlView.create(mem, [20, 21]) as v:
        for off, n in ((2 * PAGE - 3, 4), (-1, 1), (2 * PAGE, 1)):
            with pytest.raises(GpadlError, match="outside"):
                v.read(off, n)
            with pytest.raises(GpadlError, match="outside"):
                v.write(off, b"x" * n)


def test_close_removes_the_mapping_and_refuses_access(mem):
    before = _memfd_mappings()
    v = GpadlView.create(mem, [30, 32, HIGH + 1])
    assert _memfd_mappings() == before + 3
    v.close()
    assert _memfd_mappings() == before
    assert v.closed
    for access in (lambda: v.read(0, 1), lambda: v.write(0, b"x"), lambda: v.buf):
        with pytest.raises(GpadlError, match="closed"):
            access()
    v.close()   # twice is fine


def test_a_kept_memoryview_cannot_reach_guest_memory_after_close(mem):
    mem.write(40 * PAGE, b"secret")
    v = GpadlView.create(mem, [40])
    stale = v.buf[0:16]
    with pytest.raises(BufferError, match="host bug"):
        v.close()
    assert bytes(stale[:6]) == bytes(6)          # scratch pages, not the guest's
    stale[:6] = b"XXXXXX"
    assert mem.read(40 * PAGE, 6) == b"secret"
    stale.release()
