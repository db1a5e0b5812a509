"""The per-node memory balancer: from one node's pressure report, what to do with that node.

Each node is decided on its own numbers. Its target is the memory its demand needs plus the
node's free buffer (percent of demand), clamped to [min, max]. Demand is the committed pages,
or more when the pressure figure says the guest asked for pages it could not get (pressure
above 1000 per mille). A node below target grows (first by getting ballooned pages back, then
by hot-add from its reserve) as far as the VM-wide maximum allows; a node well above target
is asked to balloon the excess, never below its minimum. Hysteresis keeps a node from
oscillating around its target. Nothing one node needs ever shrinks another.
"""

from __future__ import annotations

from ..record import record

PER_MILLE = 1000


@record(frozen=True)
class NodeView:
    """The numbers one decision uses, in pages."""

    min: int
    max: int
    online: int               # what the guest has now
    ballooned: int            # what the host holds and could give back
    hot_room: int             # pages left in the hot-add reserve
    committed: int
    total: int
    pressure: int             # per mille (validated)
    buffer: int               # percent


@record(frozen=True)
class Decision:
    """What to do with one node: action is "balloon", "unballoon", "hotadd" or "none"."""

    action: str
    pages: int = 0
    target: int = 0
    reason: str = ""


def demand(v: NodeView) -> int:
    """Pages the node's guest wants: committed, or what the pressure figure implies when it is higher."""
    implied = v.pressure * v.total // PER_MILLE
    return max(v.committed, implied)


def target(v: NodeView) -> int:
    """Pages the node should have: demand plus its buffer, within [min, max]."""
    want = demand(v) * (100 + v.buffer) // 100
    return max(v.min, min(v.max, want))


def decide(v: NodeView, vm_headroom: int, hotadd_block: int, hysteresis: int) -> Decision:
    """One node's decision; vm_headroom = pages the VM may still grow by before its maximum."""
    t = target(v)
    if v.online < t:
        need = min(t - v.online, max(vm_headroom, 0))
        if need <= 0:
            return Decision("none", 0, t, "below target but the VM is at its maximum")
        if t - v.online < hysteresis and v.pressure <= PER_MILLE:
            return Decision("none", 0, t, "within hysteresis")
        if v.ballooned:
            return Decision("unballoon", min(need, v.ballooned), t, f"online {v.online} < target {t}")
        grow = min(max(need, hotadd_block), v.hot_room, v.max - v.online, max(vm_headroom, 0))
        grow = grow // hotadd_block * hotadd_block if grow >= hotadd_block else grow
        if grow <= 0:
            return Decision("none", 0, t, "below target but the hot-add reserve is used up")
        return Decision("hotadd", grow, t, f"online {v.online} < target {t}")
    excess = v.online - max(t, v.min)
    if excess >= hysteresis:
        return Decision("balloon", excess, t, f"online {v.online} > target {t}")
    return Decision("none", 0, t, "at target")
