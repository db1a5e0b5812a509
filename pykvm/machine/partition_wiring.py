"""Makes a `pykvm run` process a partition of a topology when `pykvm up` started it.

`pykvm up` starts each partition with its end of a socketpair to the broker and says
which in the environment: PYKVM_PARTITION=NAME, PYKVM_BROKER_FD=N (a single `pykvm run`
has no such variables and is unchanged). The partition greets the broker on it during
set-up, learns from its welcome what it uses, provides and may do, and gets: a proxied block offer per service it uses (as the policy agent allows), a
provider offer when it provides one, and bus limits from the policy. `pykvm ctl SOCK
policy` shows the agent's decisions.
"""

from __future__ import annotations

import os

from .. import errors

ENV = "PYKVM_PARTITION"
ENV_FD = "PYKVM_BROKER_FD"


def requested() -> bool:
    """True when this process was started as a partition by `pykvm up`."""
    return bool(os.environ.get(ENV))


def connect():
    """The PartitionLink on the broker socket the environment names (UsageError when it is not one)."""
    import socket
    import stat

    from ..bus.link import LinkError, PartitionLink

    name, spec = os.environ.get(ENV, ""), os.environ.get(ENV_FD, "")
    if not name or not spec.isdigit() or int(spec) < 3:
        raise errors.UsageError(f"{ENV}={name!r} {ENV_FD}={spec!r}: expected a partition name and the number "
                                "of the inherited broker socket (`pykvm up` sets both)")
    fd = int(spec)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise errors.UsageError(f"{ENV_FD}={fd}: not a socket")
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise errors.UsageError(f"{ENV_FD}={fd}: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise errors.UsageError(f"{ENV_FD}={fd}: not a unix stream socket")
    sock.set_inheritable(False)
    try:
        return PartitionLink.open(sock, name)
    except LinkError as e:
        raise errors.UsageError(str(e)) from None


def services(link):
    """(bus services, policy Ledger) the welcome gives this partition."""
    from ..bus.policy import Ledger, Rules, TopologyPolicy
    from ..bus.services.provider import ProviderService
    from ..bus.services.direct_proxy import DirectProxyService
    from ..bus.services.proxy import BlockProxyService

    w = link.welcome
    rules = Rules(**dict(w["rules"], versions=tuple(w["rules"].get("versions", ()))))
    agent = TopologyPolicy({link.name: rules}, {link.name: tuple(w["uses"])})
    ledger = Ledger(agent, link.name)
    out = []
    if w.get("provides"):
        out.append(ProviderService(link))
    interfaces = w.get("interfaces") or {}
    why_not = w.get("direct") or {}
    for index, target in enumerate(w["uses"]):
        if ledger.check("may_offer", target) is not None:
            continue
        kind = interfaces.get(target, "block")
        if kind == "echo" and why_not.get(target) is not None:   # echo has no brokered path: no offer
            link.log(f"{target}: not offered: {why_not[target]}")
        elif kind in ("echo", "block") and target in why_not and why_not[target] is None and \
                (kind == "echo" or target in interfaces):
            out.append(DirectProxyService(link, index, target, ledger, kind))
        else:
            out.append(BlockProxyService(link, index, target, ledger, remap_min=rules.remap_min_bytes))
    return out, ledger


