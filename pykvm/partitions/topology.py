"""The topology file of `pykvm up` (TOML): partitions, the services they provide and use, and the policy.

    [[partition]]
    name = "storage"              # [a-z0-9_-]{1,32}, unique
    kernel = "bus-blocksvc"       # a path or a bundled guest
    memory = "16M"                # default 16M
    cpus = 1                      # 1..16, default 1
    cmdline = "sectors=2048"      # default ""
    trust = "trusted"             # or "untrusted" (default: conservative policy)
    provides = "disk0"            # at most one service, served by the guest (block)
    uses = ["disk0"]              # services of other partitions this one's guest sees
    restarts = 3                  # times a crashed partition is started again, default 0
    disk = "store.img"            # a raw host file served to this partition by the host's block
                                  # service (its `--disk`); an existing regular file of at least
                                  # one sector, no comma; relative to the current directory
    request_timeout = 30          # a provider silent this long (seconds, 0.1..3600) with requests
                                  # outstanding is lost: stopped, its oldest request answered E_IO

    [policy.trusted]              # overrides of the trusted defaults (bus/policy.py Rules)
    [policy.untrusted]            # overrides of the conservative untrusted defaults
    [policy.partition.NAME]       # overrides for one partition, on top of its trust level
                                  # (versions = ["1.0"]: the service versions it may open)

Everything is validated strictly: an unknown key, a wrong type, a value out of range, a
duplicate name, a service used but provided by no partition: TopologyError naming it.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib

from ..bus.policy import TRUSTED, UNTRUSTED, PolicyError, Rules, parse_rules
from ..devices.description import TRUST_LEVELS
from ..errors import MemorySizeError, TopologyError
from ..record import field, record
from ..units import parse_size

NAME = re.compile(r"[a-z0-9_-]{1,32}")
MAX_PARTITIONS = 16
_LEVEL_RULES = {"trusted": TRUSTED, "untrusted": UNTRUSTED}   # the bus rules each trust level starts from

_KEYS = {"name", "kernel", "memory", "cpus", "cmdline", "trust", "provides", "uses", "restarts", "disk",
         "request_timeout"}
REQUEST_TIMEOUT = 30.0


@record
class Partition:
    """One partition of the topology."""

    name: str
    kernel: str
    memory: int = 16 << 20
    cpus: int = 1
    cmdline: str = ""
    trust: str = "trusted"
    provides: str | None = None
    uses: tuple[str, ...] = ()
    restarts: int = 0
    disk: str | None = None         # absolute path of the host file given as --disk
    request_timeout: float = REQUEST_TIMEOUT
    rules: Rules = field(default_factory=Rules)


@record
class Topology:
    """The partitions, in file order."""

    partitions: list[Partition]

    def by_name(self, name: str) -> Partition | None:
        """The partition called name, or None."""
        return next((p for p in self.partitions if p.name == name), None)

    def provider_of(self, service: str) -> Partition | None:
        """The partition providing service, or None."""
        return next((p for p in self.partitions if p.provides == service), None)


def load(path) -> Topology:
    """Read and validate a topology file (TopologyError with a one-line reason)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise TopologyError(f"topology {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(f"topology {path}: not TOML: {e}") from None
    try:
        return parse(doc)
    except TopologyError as e:
        raise TopologyError(f"topology {path}: {e}") from None


def _str(value, where: str, pattern=None) -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        want = f"a string matching {pattern.pattern}" if pattern is not None else "a string"
        raise TopologyError(f"{where}: expected {want}, got {value!r}")
    return value


def _int(value, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TopologyError(f"{where}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _disk(value, where: str) -> str:
    """The absolute path of a partition's disk file, checked to be a regular file of a sector or more."""
    path = _str(value, where)
    if not path or "," in path or "\0" in path or len(path) > 4096:
        raise TopologyError(f"{where}: expected a file path without commas, got {value!r}")
    try:
        st = os.stat(path)
    except OSError as e:
        raise TopologyError(f"{where}: {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size < 512:
        raise TopologyError(f"{where}: {path} is not a regular file of at least 512 bytes")
    return os.path.abspath(path)


def _seconds(value, where: str, lo: float, hi: float) -> float:
    """A number of seconds in [lo, hi] as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise TopologyError(f"{where}: expected a number of seconds in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def parse(doc: dict) -> Topology:
    """A Topology from a parsed TOML document."""
    unknown = set(doc) - {"partition", "policy"}
    if unknown:
        raise TopologyError(f"unknown top-level key {sorted(unknown)[0]!r} (known: partition, policy)")
    entries = doc.get("partition")
    if not isinstance(entries, list) or not entries:
        raise TopologyError("no [[partition]] entries")
    if len(entries) > MAX_PARTITIONS:
        raise TopologyError(f"{len(entries)} partitions (at most {MAX_PARTITIONS})")
    policy = doc.get("policy", {})
    if not isinstance(policy, dict) or set(policy) - {*TRUST_LEVELS, "partition"}:
        raise TopologyError(f"policy: expected a table with {', '.join(TRUST_LEVELS)} and partition.NAME tables")
    try:
        base = {level: parse_rules(policy.get(level, {}), _LEVEL_RULES[level], f"policy.{level}")
                for level in TRUST_LEVELS}
    except PolicyError as e:
        raise TopologyError(str(e)) from None
    per = policy.get("partition", {})
    if not isinstance(per, dict):
        raise TopologyError("policy.partition: expected a table of partition names")
    parts: list[Partition] = []
    for i, e in enumerate(entries):
        where = f"partition[{i}]"
        if not isinstance(e, dict):
            raise TopologyError(f"{where}: expected a table")
        bad = set(e) - _KEYS
        if bad:
            raise TopologyError(f"{where}.{sorted(bad)[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
        if "name" not in e or "kernel" not in e:
            raise TopologyError(f"{where}: needs name and kernel")
        name = _str(e["name"], f"{where}.name", NAME)
        where = f"partition {name}"
        if any(p.name == name for p in parts):
            raise TopologyError(f"{where}: the name is used twice")
        try:
            mem = parse_size(_str(e.get("memory", "16M"), f"{where}.memory"))
        except MemorySizeError:
            raise TopologyError(f"{where}.memory: expected a size like 16M, got {e.get('memory')!r}") from None
        if not 2 << 20 <= mem <= 4 << 30:
            raise TopologyError(f"{where}.memory: {mem} bytes is outside [2M, 4G]")
        trust = _str(e.get("trust", "trusted"), f"{where}.trust")
        if trust not in TRUST_LEVELS:
            raise TopologyError(f"{where}.trust: expected {' or '.join(TRUST_LEVELS)}, got {trust!r}")
        uses = e.get("uses", [])
        if not isinstance(uses, list) or len(uses) > 4:
            raise TopologyError(f"{where}.uses: expected a list of at most 4 service names")
        uses = tuple(_str(u, f"{where}.uses", NAME) for u in uses)
        if len(set(uses)) != len(uses):
            raise TopologyError(f"{where}.uses: a service is listed twice")
        provides = e.get("provides")
        if provides is not None:
            provides = _str(provides, f"{where}.provides", NAME)
        try:
            rules = base[trust]
            if name in per:
                rules = parse_rules(per[name], rules, f"policy.partition.{name}")
        except PolicyError as err:
            raise TopologyError(str(err)) from None
        parts.append(Partition(name=name, kernel=_str(e["kernel"], f"{where}.kernel"), memory=mem,
                               cpus=_int(e.get("cpus", 1), f"{where}.cpus", 1, 16),
                               cmdline=_str(e.get("cmdline", ""), f"{where}.cmdline"), trust=trust,
                               provides=provides, uses=uses,
                               restarts=_int(e.get("restarts", 0), f"{where}.restarts", 0, 100),
                               disk=_disk(e["disk"], f"{where}.disk") if "disk" in e else None,
                               request_timeout=_seconds(e.get("request_timeout", REQUEST_TIMEOUT),
                                                        f"{where}.request_timeout", 0.1, 3600),
                               rules=rules))
    topo = Topology(parts)
    for name in per:
        if topo.by_name(name) is None:
            raise TopologyError(f"policy.partition.{name}: no such partition")
    disks: dict[str, str] = {}
    for p in parts:                    # two VMMs writing one file would corrupt it
        if p.disk is not None:
            key = os.path.realpath(p.disk)
            if key in disks:
                raise TopologyError(f"partition {p.name}.disk: {p.disk} is also the disk of {disks[key]}")
            disks[key] = p.name
    seen = set()
    for p in parts:
        if p.provides is not None:
            if p.provides in seen:
                raise TopologyError(f"partition {p.name}.provides: {p.provides} is provided twice")
            seen.add(p.provides)
    for p in parts:
        for u in p.uses:
            if u not in seen:
                raise TopologyError(f"partition {p.name}.uses: no partition provides {u}")
            if u == p.provides:
                raise TopologyError(f"partition {p.name}.uses: {u} is its own service")
    return topo
