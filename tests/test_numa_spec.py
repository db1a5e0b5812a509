"""vNUMA specs: parsing, the one-line errors and their status, the layout, the boot-info block, iasl on the tables."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import abi
from pykvm.boot import bootinfo
from pykvm.boot.loader import numa_topology
from pykvm.errors import EXIT_BAD_NUMA, NumaSpecError
from pykvm.memory import numa

from .helpers import pykvm

M = 1 << 20
G = 1 << 30


def opts(*nodes, numa_n=None, distance=None, mem=None, cpus=None, memory_max=None):
    return numa.from_options(list(nodes), numa_n, distance, mem, cpus, memory_max)


def test_two_nodes_as_in_the_issue():
    cfg = opts("mem=256M,cpus=0-1", "mem=256M,cpus=2-3")
    assert cfg.mem == 512 * M and cfg.cpus == 4
    assert [n.cpus for n in cfg.nodes] == [(0, 1), (2, 3)]
    assert cfg.distances == ((10, 20), (20, 10))
    n = cfg.nodes[0]
    assert (n.min, n.max, n.hotadd, n.buffer) == (64 * M, 512 * M, 256 * M, 20)
    assert cfg.vm_max == 1024 * M


def test_numa_n_splits_memory_and_cpus_evenly():
    cfg = opts(numa_n=2, mem=100 * M, cpus=3)
    assert [n.mem for n in cfg.nodes] == [50 * M, 50 * M]
    assert [n.cpus for n in cfg.nodes] == [(0, 1), (2,)]


def test_distance_forms():
    assert opts("mem=8M,cpus=0", "mem=8M,cpus=1", distance="10,31;31,10").distances == ((10, 31), (31, 10))
    assert opts("mem=8M,cpus=0", "mem=8M,cpus=1", "mem=8M,cpus=2", distance="0-2=40").distances == \
        ((10, 20, 40), (20, 10, 20), (40, 20, 10))


def test_without_numa_nothing_changes():
    assert opts() is None


@pytest.mark.parametrize("nodes,kw,words", [
    (("mem=8M,cpus=0-1", "mem=8M,cpus=1"), {}, "vCPU 1 is in node 0 and node 1"),
    (("mem=8M,cpus=0", "mem=8M,cpus=2"), {}, "vCPU 1 is in no node"),
    (("mem=8M,cpus=0", "mem=8M,cpus=1"), {"mem": 32 * M}, "add up to 16 MiB but --mem is 32 MiB"),
    (("mem=8M,cpus=0", "mem=8M,cpus=1"), {"cpus": 3}, "vCPU 2 is in no node"),
    (("mem=8M,cpus=0", "mem=8M"), {}, "cpus= missing"),
    (("mem=8M,cpus=0,min=16M",), {}, "min"),
    (("mem=8M,cpus=0,max=4M",), {}, "min"),
    (("mem=8M,cpus=0,hotadd=0,max=16M",), {}, "mem + hotadd"),
    (("cpus=0",), {}, "mem= is required"),
    (("mem=8M,cpus=0,colour=red",), {}, "is not one of"),
    (("mem=8M,cpus=0,mem=8M",), {}, "given twice"),
    (("mem=lots,cpus=0",), {}, "is not a size"),
    (("mem=1M,cpus=0",), {}, "at least 2 MiB"),
    (("mem=8M,cpus=0", "mem=8M,cpus=1"), {"distance": "10,20;20"}, "2x2 matrix"),
    (("mem=8M,cpus=0", "mem=8M,cpus=1"), {"distance": "11,20;20,10"}, "to itself must be 10"),
    (("mem=8M,cpus=0", "mem=8M,cpus=1"), {"distance": "0-1=5"}, "remote distances are 11..254"),
    (("mem=8M,cpus=0", "mem=8M,cpus=1"), {"memory_max": 8 * M}, "--memory-max"),
])
def test_bad_specs_say_what_is_wrong(nodes, kw, words):
    with pytest.raises(NumaSpecError, match=words.replace("+", r"\+").replace("(", r"\(")):
        opts(*nodes, **kw)


def test_both_forms_at_once_refused():
    with pytest.raises(NumaSpecError, match="either"):
        opts("mem=8M,cpus=0", numa_n=1)


@pytest.mark.parametrize("args,words", [
    (["--numa-node", "mem=64M,cpus=0-1", "--numa-node", "mem=64M,cpus=1"], "vCPU 1 is in node 0 and node 1"),
    (["--numa-node", "mem=64M,cpus=0", "--numa-node", "mem=64M,cpus=2"], "vCPU 1 is in no node"),
    (["-m", "100M", "--numa-node", "mem=64M,cpus=0"], "add up to 64 MiB but --mem is 100 MiB"),
    (["--numa", "2", "--numa-distance", "10,20,30"], "2x2 matrix"),
])
def test_cli_bad_specs_are_one_line_with_their_status(args, words):
    r = pykvm("run", "hello", *args)
    err = r.stderr.decode()
    assert r.returncode == EXIT_BAD_NUMA == 32, err
    assert err.count("\n") == 1 and err.startswith("pykvm: error: ") and words in err


def test_layout_splits_around_the_hole_and_reserves_hot_add_above_ram():
    cfg = opts("mem=1G,cpus=0", "mem=3G,cpus=1,hotadd=512M")
    lay = numa.plan(cfg, abi.PYKVM_MMIO_HOLE)
    assert lay[0].ranges == ((0, G),)
    assert lay[1].ranges == ((G, abi.PYKVM_MMIO_HOLE - G), (4 * G, 3 * G - (abi.PYKVM_MMIO_HOLE - G)))
    top = lay[1].ranges[-1][0] + lay[1].ranges[-1][1]
    assert lay[0].hotadd == ((top + G - 1) // G * G, G)
    assert lay[1].hotadd == (lay[0].hotadd[0] + G, 512 * M)


def test_json_round_trip():
    cfg = opts("mem=8M,cpus=0,buffer=30", "mem=16M,cpus=1-2,min=4M,max=20M", distance="0-1=25")
    assert numa.NumaConfig.from_json(cfg.as_json()) == cfg


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=7),
                           max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(data=json_values, base=st.booleans())
def test_state_file_numa_config_only_ever_refused_cleanly(data, base):
    """A saved config is untrusted: anything but a valid one is a NumaSpecError, never another exception."""
    if base and isinstance(data, dict):
        good = opts("mem=8M,cpus=0", "mem=8M,cpus=1").as_json()
        good.update({k: v for k, v in data.items() if k in ("nodes", "distances", "vm_max")})
        data = good
    try:
        cfg = numa.NumaConfig.from_json(data)
    except NumaSpecError:
        return
    assert numa.NumaConfig.from_json(cfg.as_json()) == cfg


def test_boot_info_numa_block():
    cfg = opts("mem=8M,cpus=0:2", "mem=16M,cpus=1", distance="0-1=33")
    lay = numa.plan(cfg, abi.PYKVM_MMIO_HOLE)
    raw = bootinfo.numa_info(cfg, lay)
    ni = abi.ffi.from_buffer("struct pykvm_numa_info *", bytearray(raw))
    assert ni.magic == abi.PYKVM_NUMA_MAGIC and ni.size == len(raw) and ni.nr_nodes == 2
    assert ni.distance[0][1] == ni.distance[1][0] == 33 and ni.distance[1][1] == 10
    assert ni.nodes[0].cpus[0] == 0b101 and ni.nodes[0].nr_cpus == 2 and ni.nodes[1].cpus[0] == 0b10
    assert (ni.nodes[1].nr_ranges, ni.nodes[1].ranges[0].addr, ni.nodes[1].ranges[0].len) == (1, 8 * M, 16 * M)
    assert (ni.nodes[1].hotadd_addr, ni.nodes[1].hotadd_len) == lay[1].hotadd
    assert abi.PYKVM_BOOTINFO_ADDR + abi.ffi.sizeof("struct pykvm_boot_info") <= abi.PYKVM_NUMA_INFO_ADDR
    assert abi.PYKVM_NUMA_INFO_ADDR + len(raw) <= abi.PYKVM_CMDLINE_ADDR


def test_numa_tables_from_a_layout_pass_iasl(tmp_path):
    from .conftest import require_tool
    from .test_acpi_iasl import check_all

    iasl = require_tool("iasl")
    cfg = opts("mem=1G,cpus=0-1", "mem=3G,cpus=2-3,hotadd=512M", distance="0-1=21")
    topo = numa_topology(cfg, numa.plan(cfg, abi.PYKVM_MMIO_HOLE), 4)
    from pykvm.boot.acpi import Platform

    check_all(iasl, tmp_path, topo, Platform())
