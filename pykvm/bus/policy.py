"""Policy agents: the root asks one at every decision point between partitions.

An agent answers each question with None (allowed) or the reason for a refusal. The
questions: may a partition see an offer (may_offer), open it at a version (may_open),
send this request (may_request: writes, request size, rate per channel), have its buffers
remapped instead of copied (may_remap), and how much of the bus it may use (bus_limits).
TopologyPolicy, the default, reads the topology file's [policy] section; an untrusted
partition starts from UNTRUSTED, the conservative defaults. A Ledger wraps an agent: it
counts every decision and logs every refusal (rate-limited) for `pykvm ctl SOCK policy`.
"""

from __future__ import annotations

import re
import sys
import threading
import time

from ..record import fields, record, replace
from .host import Limits
from .messages import version_text, versions_text


class PolicyError(ValueError):
    """A policy section that does not validate; the message names the key."""


@record(frozen=True)
class Rules:
    """What one partition may do with the services of others."""

    write: bool = True                    # may write to block services
    max_request_sectors: int = 256        # per client request
    requests_per_second: int = 0          # per channel; 0 = unlimited
    burst: int = 64                       # requests a channel may send at once above the rate
    remap: bool = True                    # may buffers be remapped into the service partition
    remap_min_bytes: int = 4096           # requests from this size are remapped (when remap); smaller ones copied:
    #   remapping wins from 2 KiB in scripts/bench_partitions.py, and below a page it would show the
    #   service partition more of the client's page than the request's bytes
    max_gpadls: int = 64                  # bus Limits of the partition
    max_gpadl_pages: int = 4096
    max_total_pages: int = 16384
    max_outstanding: int = 64             # relayed requests unanswered per channel (a flood is refused, then closed)
    versions: tuple[int, ...] = ()        # service versions the partition may open; () = any
    direct: bool = True                   # may its channels go guest to guest (pykvm/bus/direct.py)


TRUSTED = Rules()
UNTRUSTED = Rules(write=False, max_request_sectors=16, requests_per_second=200, burst=16, remap=False,
                  max_gpadls=8, max_gpadl_pages=64, max_total_pages=256, max_outstanding=16,
                  direct=False)
_BOUNDS = {"max_request_sectors": (1, 256), "remap_min_bytes": (512, 1 << 20),
           "requests_per_second": (0, 10**7), "burst": (1, 10**6),
           "max_gpadls": (1, 4096), "max_gpadl_pages": (1, 1 << 20), "max_total_pages": (1, 1 << 22),
           "max_outstanding": (1, 4096)}
_VERSION = re.compile(r"(\d{1,5})\.(\d{1,5})")
MAX_VERSIONS = 8


def parse_versions(value, where: str) -> tuple[int, ...]:
    """A list of "MAJOR.MINOR" strings as version numbers (0x10001 for "1.1"); PolicyError names the bad entry."""
    if not isinstance(value, list) or len(value) > MAX_VERSIONS:
        raise PolicyError(f"{where}: expected a list of at most {MAX_VERSIONS} versions like \"1.0\", got {value!r}")
    out = []
    for v in value:
        m = _VERSION.fullmatch(v) if isinstance(v, str) else None
        major, minor = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        if m is None or not 1 <= major <= 0xFFFF or minor > 0xFFFF:
            raise PolicyError(f"{where}: expected versions like \"1.0\" (major 1..65535, minor 0..65535), got {v!r}")
        n = major << 16 | minor
        if n in out:
            raise PolicyError(f"{where}: version {v} is listed twice")
        out.append(n)
    return tuple(out)


def parse_rules(table, base: Rules, where: str) -> Rules:
    """base with the keys of a TOML table applied; PolicyError on an unknown key, a wrong type or a value out of range."""
    if not isinstance(table, dict):
        raise PolicyError(f"{where}: expected a table")
    known = {f.name: f for f in fields(Rules)}
    changes = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise PolicyError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        if key == "versions":
            value = parse_versions(value, f"{where}.{key}")
        elif f.type in ("bool", bool):
            if not isinstance(value, bool):
                raise PolicyError(f"{where}.{key}: expected true or false, got {value!r}")
        else:
            lo, hi = _BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise PolicyError(f"{where}.{key}: expected an integer in [{lo}, {hi}], got {value!r}")
        changes[key] = value
    return replace(base, **changes)


class PolicyAgent:
    """The questions the root asks; each returns None (allowed) or a refusal reason. Allows everything."""

    def may_offer(self, partition: str, service: str):
        """May `partition` see the offer of `service`?"""
        return None

    def may_open(self, partition: str, service: str, version: int):
        """May `partition` open `service` at `version`?"""
        return None

    def may_write(self, partition: str, service: str):
        """May `partition` write to the block service `service`?"""
        return None

    def may_request(self, partition: str, service: str, op: str, sectors: int, outstanding: int = 0):
        """May `partition` send this request on its `service` channel now (with `outstanding` unanswered)?"""
        return None

    def may_remap(self, partition: str, service: str, nbytes: int):
        """May a transfer of nbytes be done by remapping the client's pages into the service partition?"""
        return None

    def bus_limits(self, partition: str) -> Limits:
        """The bus Limits of the partition."""
        return Limits()


class TopologyPolicy(PolicyAgent):
    """The default agent: Rules per partition from the topology, token-bucket rate limits per channel."""

    def __init__(self, rules: dict[str, Rules], visible: dict[str, tuple[str, ...]], clock=time.monotonic):
        self.rules = rules                 # partition -> Rules
        self.visible = visible             # partition -> the services its topology entry uses
        self.clock = clock
        self._buckets: dict[tuple[str, str], list[float]] = {}

    def _rules(self, partition: str) -> Rules:
        return self.rules.get(partition, UNTRUSTED)

    def may_offer(self, partition, service):
        if service not in self.visible.get(partition, ()):
            return f"{partition} does not use {service} in the topology"
        return None

    def may_open(self, partition, service, version):
        allowed = self._rules(partition).versions
        if allowed and version not in allowed:
            return (f"{partition} may not use {service} at version {version_text(version)} "
                    f"(its policy allows {versions_text(allowed)})")
        return None

    def may_write(self, partition, service):
        if not self._rules(partition).write:
            return f"{partition} may not write to {service}"
        return None

    def may_request(self, partition, service, op, sectors, outstanding=0):
        r = self._rules(partition)
        if sectors > r.max_request_sectors:
            return f"{partition}: a {sectors}-sector request is over its {r.max_request_sectors}-sector limit"
        if outstanding >= r.max_outstanding:
            return f"{partition}: {outstanding} requests unanswered on {service} (at most {r.max_outstanding})"
        if r.requests_per_second:
            now = self.clock()
            b = self._buckets.setdefault((partition, service), [float(r.burst), now])
            b[0] = min(float(r.burst), b[0] + (now - b[1]) * r.requests_per_second)
            b[1] = now
            if b[0] < 1:
                return f"{partition}: over {r.requests_per_second} requests/s on {service}"
            b[0] -= 1
        return None

    def may_remap(self, partition, service, nbytes):
        if not self._rules(partition).remap:
            return f"{partition} may not have its pages remapped into another partition"
        return None

    def bus_limits(self, partition):
        r = self._rules(partition)
        return Limits(max_gpadls=r.max_gpadls, max_gpadl_pages=r.max_gpadl_pages, max_total_pages=r.max_total_pages)


class Ledger:
    """An agent with every decision counted and every refusal logged (rate-limited)."""

    LOG_FIRST = 20          # refusals logged in full, then one line per LOG_EVERY

    LOG_EVERY = 1000

    def __init__(self, agent: PolicyAgent, partition: str, log=None):
        self.agent = agent
        self.partition = partition
        self.log = log or (lambda msg: print(f"pykvm: policy: {msg}", file=sys.stderr))
        self.lock = threading.Lock()
        self.allowed: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.last_refusals: list[str] = []
        self.refusal_count = 0

    def check(self, question: str, *args):
        """Ask the agent `question` (may_offer, may_request, ...) for this partition; the refusal reason or None."""
        reason = getattr(self.agent, question)(self.partition, *args)
        with self.lock:
            book = self.allowed if reason is None else self.refused
            book[question] = book.get(question, 0) + 1
            if reason is not None:
                self.refusal_count += 1
                self.last_refusals = (self.last_refusals + [reason])[-16:]
                n = self.refusal_count
                if n <= self.LOG_FIRST or n % self.LOG_EVERY == 0:
                    self.log(f"refused: {reason}" + (f" ({n} refusals so far)" if n > self.LOG_FIRST else ""))
        return reason

    def bus_limits(self) -> Limits:
        """The partition's bus Limits, from the agent."""
        return self.agent.bus_limits(self.partition)

    def snapshot(self) -> dict:
        """Counts and recent refusals as plain data."""
        with self.lock:
            return {"partition": self.partition, "agent": type(self.agent).__name__, "allowed": dict(self.allowed),
                    "refused": dict(self.refused), "refusals": self.refusal_count,
                    "last_refusals": list(self.last_refusals)}
