"""Virtual NUMA: node specs from the user (or a state file), checked, and their guest-physical layout.

A node has a startup size (the RAM it boots with), a minimum and maximum the balancer keeps
it within, a reserved hot-add range it may grow into, and a free-memory buffer target (percent
of committed memory to keep free). Everything here is untrusted input: `NumaConfig.from_json`
and the parsers check every field and raise NumaSpecError with a one-line reason.
"""

from __future__ import annotations

import re

from ..errors import NumaSpecError
from ..record import record
from .region import PAGE_SIZE

MIB = 1 << 20
GIB = 1 << 30
MAX_NODES = 8                 # struct pykvm_numa_info holds 8
MAX_VCPUS = 255
LOCAL_DISTANCE, REMOTE_DISTANCE, MAX_DISTANCE = 10, 20, 254
NODE_ALIGN = MIB              # node sizes and hot-add ranges in whole MiB
MAX_NODE_BYTES = 1 << 40
DEFAULT_BUFFER = 20           # percent of committed memory kept free

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": MIB, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}
_KEYS = ("mem", "cpus", "min", "max", "hotadd", "buffer")


@record(frozen=True)
class NodeSpec:
    """One node as configured: sizes in bytes, vCPU indexes, buffer target in percent."""

    mem: int
    cpus: tuple[int, ...]
    min: int
    max: int
    hotadd: int
    buffer: int = DEFAULT_BUFFER

    def as_json(self) -> dict:
        """Plain data for the saved configuration."""
        return {"mem": self.mem, "cpus": list(self.cpus), "min": self.min, "max": self.max,
                "hotadd": self.hotadd, "buffer": self.buffer}


@record(frozen=True)
class NodeLayout:
    """Where a node lives in guest-physical space: RAM ranges and the reserved hot-add range."""

    ranges: tuple[tuple[int, int], ...]
    hotadd: tuple[int, int]          # (base, length); length 0 when the node cannot grow


@record(frozen=True)
class NumaConfig:
    """The checked vNUMA configuration of one VM."""

    nodes: tuple[NodeSpec, ...]
    distances: tuple[tuple[int, ...], ...]
    vm_max: int                      # the balancer never gives the VM more than this in total

    @property
    def mem(self) -> int:
        """Total startup RAM."""
        return sum(n.mem for n in self.nodes)

    @property
    def cpus(self) -> int:
        """Number of vCPUs the nodes cover."""
        return sum(len(n.cpus) for n in self.nodes)

    def as_json(self) -> dict:
        """Plain data (MachineConfig keeps this, so saved states carry the topology)."""
        return {"nodes": [n.as_json() for n in self.nodes], "distances": [list(r) for r in self.distances],
                "vm_max": self.vm_max}

    @classmethod
    def from_json(cls, data) -> "NumaConfig":
        """Rebuild and re-check a configuration from plain data (a state file: untrusted)."""
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise NumaSpecError("vNUMA configuration: expected an object with a list of nodes")
        nodes = []
        for i, n in enumerate(data["nodes"]):
            if not isinstance(n, dict) or set(n) != set(_KEYS):
                raise NumaSpecError(f"vNUMA node {i}: expected exactly the keys {', '.join(_KEYS)}")
            cpus = n["cpus"]
            if not isinstance(cpus, list) or not all(type(c) is int for c in cpus):
                raise NumaSpecError(f"vNUMA node {i}: cpus must be a list of integers")
            for k in ("mem", "min", "max", "hotadd", "buffer"):
                if type(n[k]) is not int:
                    raise NumaSpecError(f"vNUMA node {i}: {k} must be an integer")
            nodes.append(NodeSpec(n["mem"], tuple(cpus), n["min"], n["max"], n["hotadd"], n["buffer"]))
        dist = data.get("distances")
        if not isinstance(dist, list) or not all(isinstance(r, list) for r in dist):
            raise NumaSpecError("vNUMA configuration: distances must be a list of rows")
        vm_max = data.get("vm_max")
        if type(vm_max) is not int:
            raise NumaSpecError("vNUMA configuration: vm_max must be an integer")
        return check(nodes, tuple(tuple(r) for r in dist), len(nodes) and sum(len(n.cpus) for n in nodes), vm_max)


def parse_size(text: str, what: str) -> int:
    """'256M', '1G', '512K' (bare number = MiB) in bytes, or NumaSpecError."""
    m = _SIZE.match(text)
    if not m:
        raise NumaSpecError(f"{what}: {text!r} is not a size like 256M or 1G")
    value = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if value > MAX_NODE_BYTES:
        raise NumaSpecError(f"{what}: {text} is larger than {MAX_NODE_BYTES >> 40} TiB")
    return value


def parse_cpus(text: str, what: str) -> tuple[int, ...]:
    """'0-1', '2', '0-1:4-5' (':' or '+' between pieces, as ',' separates keys) as vCPU indexes."""
    out: list[int] = []
    for piece in re.split(r"[:+]", text):
        m = re.fullmatch(r"\s*(\d{1,3})\s*(?:-\s*(\d{1,3})\s*)?", piece)
        if not m:
            raise NumaSpecError(f"{what}: cpus {text!r} is not a list like 0-1 or 0:2")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo or hi >= MAX_VCPUS:
            raise NumaSpecError(f"{what}: cpus range {piece.strip()} is empty or beyond vCPU {MAX_VCPUS - 1}")
        out += range(lo, hi + 1)
    if len(set(out)) != len(out):
        raise NumaSpecError(f"{what}: cpus {text!r} names a vCPU twice")
    return tuple(out)


def parse_node(text: str, index: int) -> dict:
    """One --numa-node value ('mem=256M,cpus=0-1[,min=..][,max=..][,hotadd=..][,buffer=PCT]') as raw fields."""
    what = f"--numa-node {text!r}"
    fields: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _KEYS:
            raise NumaSpecError(f"{what}: {part!r} is not one of {', '.join(k + '=' for k in _KEYS)}")
        if key in fields:
            raise NumaSpecError(f"{what}: {key}= given twice")
        if key == "cpus":
            fields[key] = parse_cpus(value, what)
        elif key == "buffer":
            if not re.fullmatch(r"\s*\d{1,4}\s*%?\s*", value):
                raise NumaSpecError(f"{what}: buffer={value} is not a percentage")
            fields[key] = int(value.strip().rstrip("%"))
        else:
            fields[key] = parse_size(value, f"{what} {key}=")
    if "mem" not in fields:
        raise NumaSpecError(f"{what}: mem= is required (node {index}'s startup size)")
    return fields


def parse_distances(text: str, nodes: int) -> tuple[tuple[int, ...], ...]:
    """--numa-distance '10,21;21,10' (rows split by ';') or 'I-J=D,...' pairs (symmetric) as a matrix."""
    text = text.strip()
    if "=" in text:
        rows = [[LOCAL_DISTANCE if i == j else REMOTE_DISTANCE for j in range(nodes)] for i in range(nodes)]
        for part in text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*=\s*(\d{1,3})\s*", part)
            if not m:
                raise NumaSpecError(f"--numa-distance: {part!r} is not I-J=DISTANCE")
            i, j, d = (int(g) for g in m.groups())
            if i >= nodes or j >= nodes or i == j:
                raise NumaSpecError(f"--numa-distance: {part.strip()} names no pair of two of the {nodes} nodes")
            rows[i][j] = rows[j][i] = d
        return tuple(tuple(r) for r in rows)
    rows = []
    for line in text.split(";"):
        try:
            rows.append(tuple(int(v) for v in line.split(",")))
        except ValueError:
            raise NumaSpecError(f"--numa-distance: row {line.strip()!r} is not comma-separated numbers") from None
    return tuple(rows)


def _default_node(mem: int, cpus: tuple[int, ...], f: dict) -> NodeSpec:
    hotadd = f.get("hotadd", mem)
    return NodeSpec(mem=mem, cpus=cpus, min=f.get("min", max(NODE_ALIGN, mem // 4 // NODE_ALIGN * NODE_ALIGN)),
                    max=f.get("max", mem + hotadd), hotadd=hotadd, buffer=f.get("buffer", DEFAULT_BUFFER))


def from_options(node_specs, numa: int | None, distance: str | None, mem: int | None, cpus: int | None,
                 memory_max: int | None = None) -> NumaConfig | None:
    """The vNUMA config the run options describe, or None without vNUMA.

    `mem` and `cpus` are None when the user did not give --mem / --cpus: then the nodes decide.
    """
    if not node_specs and numa is None:
        if distance is not None or memory_max is not None:
            raise NumaSpecError("--numa-distance and --memory-max need --numa-node or --numa")
        return None
    if node_specs and numa is not None:
        raise NumaSpecError("give either --numa N or --numa-node specs, not both")
    if node_specs:
        raw = [parse_node(t, i) for i, t in enumerate(node_specs)]
        if len(raw) > MAX_NODES:
            raise NumaSpecError(f"{len(raw)} nodes: at most {MAX_NODES}")
        if all("cpus" not in f for f in raw):      # spread the vCPUs like --numa does
            n = cpus if cpus is not None else len(raw)
            for f, c in zip(raw, _split_cpus(n, len(raw))):
                f["cpus"] = c
        nodes = []
        for i, f in enumerate(raw):
            if "cpus" not in f:
                raise NumaSpecError(f"node {i}: cpus= missing (give cpus= for every node or for none)")
            nodes.append(_default_node(f["mem"], f["cpus"], f))
        if mem is not None and mem != sum(n.mem for n in nodes):
            raise NumaSpecError(f"the nodes' mem= add up to {sum(n.mem for n in nodes) >> 20} MiB "
                                f"but --mem is {mem >> 20} MiB")
    else:
        if not 1 <= numa <= MAX_NODES:
            raise NumaSpecError(f"--numa {numa}: between 1 and {MAX_NODES} nodes")
        total = mem if mem is not None else 128 * MIB
        ncpu = cpus if cpus is not None else numa
        if total % (numa * NODE_ALIGN):
            raise NumaSpecError(f"--mem {total >> 20} MiB does not split into {numa} nodes of whole MiB")
        nodes = [_default_node(total // numa, c, {}) for c in _split_cpus(ncpu, numa)]
    ncpus = cpus if cpus is not None else max(c for n in nodes for c in n.cpus) + 1
    dist = parse_distances(distance, len(nodes)) if distance is not None else \
        tuple(tuple(LOCAL_DISTANCE if i == j else REMOTE_DISTANCE for j in range(len(nodes))) for i in range(len(nodes)))
    vm_max = memory_max if memory_max is not None else sum(n.max for n in nodes)
    return check(nodes, dist, ncpus, vm_max)


def _split_cpus(ncpu: int, nodes: int) -> list[tuple[int, ...]]:
    """vCPUs 0..ncpu-1 in nodes contiguous blocks (the first nodes get one more when it does not divide)."""
    if ncpu < nodes:
        raise NumaSpecError(f"{nodes} nodes need at least {nodes} vCPUs (--cpus {ncpu}); every node gets one")
    out, start = [], 0
    for i in range(nodes):
        n = ncpu // nodes + (1 if i < ncpu % nodes else 0)
        out.append(tuple(range(start, start + n)))
        start += n
    return out


def check(nodes, distances, ncpus: int, vm_max: int) -> NumaConfig:
    """Every rule a vNUMA machine obeys, first violation as NumaSpecError."""
    if not 1 <= len(nodes) <= MAX_NODES:
        raise NumaSpecError(f"{len(nodes)} nodes: between 1 and {MAX_NODES}")
    if type(ncpus) is not int or not 1 <= ncpus <= MAX_VCPUS:
        raise NumaSpecError(f"{ncpus!r} vCPUs: between 1 and {MAX_VCPUS}")
    owner: dict[int, int] = {}
    for i, n in enumerate(nodes):
        for c in n.cpus:
            if not 0 <= c < ncpus:
                raise NumaSpecError(f"node {i}: vCPU {c} does not exist (the VM has {ncpus})")
            if c in owner:
                raise NumaSpecError(f"vCPU {c} is in node {owner[c]} and node {i}")
            owner[c] = i
        for k in ("mem", "min", "max", "hotadd"):
            v = getattr(n, k)
            if not 0 <= v <= MAX_NODE_BYTES or v % NODE_ALIGN:
                raise NumaSpecError(f"node {i}: {k} {v} bytes is not a whole number of MiB up to 1 TiB")
        if n.mem < 2 * MIB:
            raise NumaSpecError(f"node {i}: mem {n.mem >> 20} MiB; each node needs at least 2 MiB")
        if not 0 < n.min <= n.mem <= n.max <= n.mem + n.hotadd:
            raise NumaSpecError(f"node {i}: need 0 < min ({n.min >> 20}M) <= mem ({n.mem >> 20}M) <= max "
                                f"({n.max >> 20}M) <= mem + hotadd ({(n.mem + n.hotadd) >> 20}M)")
        if not 0 <= n.buffer <= 1000:
            raise NumaSpecError(f"node {i}: buffer {n.buffer}% is not between 0 and 1000")
    missing = sorted(set(range(ncpus)) - owner.keys())
    if missing:
        raise NumaSpecError(f"vCPU {missing[0]} is in no node")
    size = len(nodes)
    if len(distances) != size or any(len(r) != size for r in distances):
        raise NumaSpecError(f"--numa-distance: need a {size}x{size} matrix")
    for i, row in enumerate(distances):
        for j, d in enumerate(row):
            if type(d) is not int:
                raise NumaSpecError(f"--numa-distance: {d!r} is not a number")
            if i == j and d != LOCAL_DISTANCE:
                raise NumaSpecError(f"--numa-distance: node {i} to itself must be {LOCAL_DISTANCE}, not {d}")
            if i != j and not LOCAL_DISTANCE < d <= MAX_DISTANCE:
                raise NumaSpecError(f"--numa-distance: {i}->{j} is {d}; remote distances are 11..{MAX_DISTANCE}")
    total = sum(n.mem for n in nodes)
    if type(vm_max) is not int or not total <= vm_max <= sum(n.max for n in nodes) or vm_max % PAGE_SIZE:
        raise NumaSpecError(f"--memory-max {vm_max!r}: must lie between the startup total ({total >> 20} MiB) "
                            f"and the sum of the nodes' max ({sum(n.max for n in nodes) >> 20} MiB)")
    return NumaConfig(tuple(nodes), tuple(tuple(r) for r in distances), vm_max)


def plan(cfg: NumaConfig, hole_start: int, hole_end: int = 4 * GIB) -> list[NodeLayout]:
    """Lay the nodes out one after another from 0, skipping the MMIO hole; hot-add ranges above all RAM."""
    out_ranges = []
    gpa = 0
    for n in cfg.nodes:
        left, ranges = n.mem, []
        while left:
            if hole_start <= gpa < hole_end:
                gpa = hole_end
            room = hole_start - gpa if gpa < hole_start else left
            take = min(left, room)
            ranges.append((gpa, take))
            gpa += take
            left -= take
        out_ranges.append(tuple(ranges))
    base = max(hole_end, (gpa + GIB - 1) // GIB * GIB)
    layouts = []
    for n, ranges in zip(cfg.nodes, out_ranges):
        layouts.append(NodeLayout(ranges, (base, n.hotadd)))
        base += (n.hotadd + GIB - 1) // GIB * GIB      # each node's reserve starts on its own GiB
    return layouts
