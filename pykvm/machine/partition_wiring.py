"""Makes a `pykvm run` process a partition of a topology when `pykvm up` started it.

`pykvm up` sets PYKVM_PARTITION=NAME@BROKER_SOCKET in each partition's environment (a
single `pykvm run` has no such variable and is unchanged). The partition connects to
the broker during set-up, learns from its welcome what it uses, provides and may do,
and gets: a proxied block offer per service it uses (as the policy agent allows), a
provider offer when it provides one, and bus limits from the policy. `pykvm ctl SOCK
policy` shows the agent's decisions.
"""

from __future__ import annotations

import os

from .. import errors

ENV = "PYKVM_PARTITION"


def requested() -> bool:
    """True when this process was started as a partition by `pykvm up`."""
    return bool(os.environ.get(ENV))


def connect():
    """The PartitionLink to the broker named in the environment (UsageError when it cannot be reached)."""
    from ..bus.link import LinkError, PartitionLink

    spec = os.environ.get(ENV, "")
    name, sep, path = spec.partition("@")
    if not sep or not name or not path:
        raise errors.UsageError(f"{ENV}={spec!r}: expected NAME@BROKER_SOCKET")
    try:
        return PartitionLink.connect(path, name)
    except LinkError as e:
        raise errors.UsageError(str(e)) from None


def services(link):
    """(bus services, policy Ledger) the welcome gives this partition."""
    from ..bus.policy import Ledger, Rules, TopologyPolicy
    from ..bus.services.provider import ProviderService
    from ..bus.services.proxy import BlockProxyService

    w = link.welcome
    rules = Rules(**dict(w["rules"], versions=tuple(w["rules"].get("versions", ()))))
    agent = TopologyPolicy({link.name: rules}, {link.name: tuple(w["uses"])})
    ledger = Ledger(agent, link.name)
    out = []
    if w.get("provides"):
        out.append(ProviderService(link))
    for index, target in enumerate(w["uses"]):
        if ledger.check("may_offer", target) is None:
            out.append(BlockProxyService(link, index, target, ledger, remap_min=rules.remap_min_bytes))
    return out, ledger


