"""The device access policy: one authority per VM bounds what the guest may do to each device register.

Each device ships a description (description.py, a TOML file next to its model) that lists its
registers and what each trust level gets: allow, deny, or translate (mask, clamp, shadow). The
authority plugs into DeviceManager as `access_filter`: when a device's range is linked into dispatch
(the device enters D0), `wrap(dev, kind, base, read_cb, write_cb)` decides once for the whole range:

  static   every register of the range is `allow` at this VM's trust level and the registers tile
           the range: the model's own callbacks are returned unwrapped, so the access costs nothing.
           Such ranges are *not* counted per access and their `access`/`width` fields are not
           enforced (the model decodes every access exactly as without a policy); they are listed
           in `static_ranges`. A device with no description is static for trusted guests.
  wrapped  anything else: a per-offset table of small handlers is built now (the access path does
           not parse or search), and every access is checked for direction and width, gets its
           register's action, and is counted per (device, register, action). An allowed access that
           fits its register takes the fast path: one list lookup gives how many bytes an access at
           that offset may have, one list slot per offset counts it, then the model's callback
           (about 60 ns on top of the model; scripts/bench_policy.py). Everything else goes to a
           per-offset handler. Offsets no register covers are denied (reads all ones, writes
           dropped) and counted under "<unlisted>". For untrusted guests a device with no
           description is denied completely ("<undescribed>"), and a device whose description does
           not fit its ranges is denied completely at any level ("<invalid-description>"; Machine
           refuses to start with one, so only a device plugged in later can get there).

An access must lie inside one register: narrower accesses to part of a register are fine (a mask
or shadow applies to the bytes touched), wider or straddling ones are denied, and so are partial
writes to a clamped register (clamping a fragment means nothing). Denials go to `audit` (a bounded
deque of Denial records) and to stderr, at most `log_limit` lines per device per `log_window`
seconds, then one "... N more suppressed" line. `stats()` returns the decision counts and
`summary()` a one-line account of denials for the end of a run.

Counts survive re-links (power cycles, replacements, a PCI BAR the guest moves: they are kept per
register position, so however many bases a guest tries, one table serves them) and are plain list
slots incremented without a lock: with several vCPUs hammering the same register an increment can
rarely be lost, which is acceptable for statistics.
"""

from __future__ import annotations

import collections
import sys
import threading
import time

from ..errors import DeviceConfigError, UsageError
from ..record import record
from . import description as _desc
from .description import TRUST_LEVELS, Description, Register

UNLISTED = "<unlisted>"
UNDESCRIBED = "<undescribed>"
INVALID = "<invalid-description>"
_MASK = [(1 << (8 * n)) - 1 for n in range(9)]
BIG_RANGE = 0x10000     # larger ranges keep their per-offset tables in dicts (only described offsets)


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


@record(frozen=True)
class Denial:
    """One refused access, as kept in `PolicyAuthority.audit`."""

    time: float
    device: str
    register: str
    space: str
    address: int          # port number or guest-physical address
    offset: int           # from the range base
    size: int
    write: bool
    value: int | None     # what a write carried
    reason: str

    def __str__(self) -> str:
        what = f"write {self.value:#x} to" if self.write else "read of"
        where = f"port {self.address:#x}" if self.space == "port" else f"mmio {self.address:#x}"
        return f"{self.device}: denied {self.size}-byte {what} {self.register} ({where}): {self.reason}"


class PolicyAuthority:
    """Per-VM enforcement of device descriptions at one trust level ("trusted" or "untrusted")."""

    def __init__(self, trust: str = "trusted", descriptions: dict[str, Description] | None = None, *,
                 log=None, log_limit: int = 5, log_window: float = 1.0, audit_size: int = 256,
                 clock=time.monotonic):
        if trust not in TRUST_LEVELS:
            raise UsageError(f"trust level {trust!r}: expected one of {', '.join(TRUST_LEVELS)}")
        self.trust = trust
        self.descriptions = _desc.shipped() if descriptions is None else dict(descriptions)
        self.log_limit = log_limit
        self.log_window = log_window
        self._log = log
        self._clock = clock
        self.audit: collections.deque[Denial] = collections.deque(maxlen=audit_size)
        self.denied = 0                                   # all denials, including those logged or not
        self._counts: list[int] = []                      # decision counters, one slot per key below
        self._slots: dict[tuple[str, str, str], int] = {}  # (device, register, action) -> slot
        self._shadows: dict[tuple[str, str, str], list] = {}  # (device, space, register) -> [value]
        self._rate: dict[str, list] = {}                  # device -> [window start, printed, suppressed]
        # (device, kind, base) -> "static" / "wrapped", for the ranges the devices decode now (a moved PCI BAR
        # replaces its entry: the guest picks the bases, so nothing here may grow with each one it tries)
        self.decisions: dict[tuple[str, str, int], str] = {}
        # (device, kind, n) -> ({offset: register}, read counts, write counts): allowed accesses per offset of
        # the device's n-th range of that kind, kept by register position, not address, across moves too
        self._ranges: dict[tuple[str, str, int], tuple] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ set-up
    def description_for(self, dev) -> Description | None:
        return _desc.for_device(dev, self.descriptions)

    def check(self, devices) -> None:
        """Check every device's description against its declared ranges (DescriptionError naming the file)."""
        for dev in devices:
            d = self.description_for(dev)
            if d is not None:
                d.check_ranges(dev)

    def _slot(self, device: str, register: str, action: str) -> int:
        key = (device, register, action)
        with self._lock:
            i = self._slots.get(key)
            if i is None:
                i = self._slots[key] = len(self._counts)
                self._counts.append(0)
            return i

    def _shadow(self, device: str, space: str, register: str) -> list:
        with self._lock:
            return self._shadows.setdefault((device, space, register), [0])

    def static_ranges(self) -> list[tuple[str, str, int]]:
        """(device, kind, base) of ranges linked unwrapped (not counted per access)."""
        with self._lock:            # a vCPU moving a BAR may drop an entry meanwhile
            return [k for k, v in self.decisions.items() if v.startswith("static")]

    # ------------------------------------------------------------------ the hook
    def wrap(self, dev, kind: str, base: int, read_cb, write_cb):
        """DeviceManager's access_filter: callbacks for `dev`'s `kind` range at `base` (see the module doc)."""
        ranges = list(dev.ports if kind == "port" else dev.mmio)
        index = next((i for i, (b, _n) in enumerate(ranges) if b == base), None)
        if index is None:
            raise DeviceConfigError(f"{dev.name}: no {kind} range at {base:#x} to apply the access policy to")
        length = ranges[index][1]
        desc = self.description_for(dev)
        key = (dev.name, kind, base)
        self._forget_moved(dev.name, kind, {b for b, _n in ranges})
        if desc is None:
            if self.trust == "trusted":
                self.decisions[key] = "static (no description)"
                return read_cb, write_cb
            regs: list[Register] = []
        else:
            try:
                desc.check_ranges(dev)
            except DeviceConfigError as e:
                # Machine checks every device before it runs (check()); a device plugged in later whose
                # description does not fit it is failed closed, never by raising out of dispatch.
                self.decisions[key] = f"denied: {e}"
                self._emit(f"pykvm: policy: {dev.name}: every access denied: {e}")
                return self._compile(dev.name, None, kind, base, index, length, [], read_cb, write_cb,
                                     (INVALID, f"the device's description does not fit it: {e}"))
            regs = desc.in_space(kind)
            if (sum(r.width for r in regs) == length
                    and all(r.action(self.trust).action == "allow" for r in regs)):
                self.decisions[key] = "static"
                return read_cb, write_cb
        self.decisions[key] = "wrapped"
        return self._compile(dev.name, desc, kind, base, index, length, regs, read_cb, write_cb)

    def _forget_moved(self, devname: str, kind: str, bases: set[int]) -> None:
        """Drop the decisions about ranges of the device that it no longer decodes (a BAR moved away)."""
        with self._lock:
            for key in [k for k in self.decisions if k[0] == devname and k[1] == kind and k[2] not in bases]:
                del self.decisions[key]

    # ------------------------------------------------------------------ building the tables
    def _range_counts(self, devname, kind, index, length, names):
        """The per-offset allow counters of a device's index-th range, kept across re-links and moves."""
        key = (devname, kind, index)
        with self._lock:
            rc = self._ranges.get(key)
            if rc is None or rc[0] != names:
                big = length > BIG_RANGE
                rc = self._ranges[key] = (names, {} if big else [0] * length, {} if big else [0] * length)
                if big:
                    for o in names:
                        rc[1][o] = rc[2][o] = 0
            return rc[1], rc[2]

    def _compile(self, devname, desc, kind, base, index, length, regs, rd, wr, nothing=None):
        """Wrapped callbacks for one range. Per offset: how many bytes an access starting there may have and
        still be plainly allowed (the fast path: one comparison, one counter), else a handler (the slow path:
        misfits, denials, translations)."""
        big = length > BIG_RANGE
        rfast: dict | list = {} if big else [0] * length
        wfast: dict | list = {} if big else [0] * length
        rslow: dict | list = {} if big else [None] * length
        wslow: dict | list = {} if big else [None] * length
        names = {}
        for r in regs:
            act = r.action(self.trust)
            rh, wh = self._read_handler(devname, kind, base, r, rd), self._write_handler(devname, kind, base, r, wr)
            fast_r = "r" in r.access and act.kind in ("allow", "mask", "clamp")   # such reads reach the model
            fast_w = "w" in r.access and act.kind == "allow"
            for o in range(r.offset, r.end):
                names[o] = r.name
                rfast[o] = r.end - o if fast_r else 0
                wfast[o] = r.end - o if fast_w else 0
                rslow[o] = rh
                wslow[o] = wh
        name, why = (UNLISTED, "no register at this offset") if desc is not None else nothing or \
            (UNDESCRIBED, "the device has no description; untrusted guests get no access to it")
        unl_r = self._deny_read(devname, kind, base, name, why)
        unl_w = self._deny_write(devname, kind, base, name, why)
        rcount, wcount = self._range_counts(devname, kind, index, length, names)

        if big:
            def read(offset, size, rfast=rfast, rcount=rcount, rd=rd, rslow=rslow, unl=unl_r):
                if size <= rfast.get(offset, 0):
                    rcount[offset] += 1
                    return rd(offset, size)
                return rslow.get(offset, unl)(offset, size)

            def write(offset, size, value, wfast=wfast, wcount=wcount, wr=wr, wslow=wslow, unl=unl_w):
                if size <= wfast.get(offset, 0):
                    wcount[offset] += 1
                    wr(offset, size, value)
                else:
                    wslow.get(offset, unl)(offset, size, value)
        else:
            for o in range(length):
                if rslow[o] is None:
                    rslow[o] = unl_r
                    wslow[o] = unl_w

            def read(offset, size, rfast=rfast, rcount=rcount, rd=rd, rslow=rslow):
                if size <= rfast[offset]:
                    rcount[offset] += 1
                    return rd(offset, size)
                return rslow[offset](offset, size)

            def write(offset, size, value, wfast=wfast, wcount=wcount, wr=wr, wslow=wslow):
                if size <= wfast[offset]:
                    wcount[offset] += 1
                    wr(offset, size, value)
                else:
                    wslow[offset](offset, size, value)

        read.policy_wrapped = write.policy_wrapped = True
        return read, write

    def _denier(self, devname, kind, base, register, reason):
        """A function recording one denial (counted, audited, logged rate-limited)."""
        slot = self._slot(devname, register, "deny")
        counts = self._counts

        def deny(offset, size, write, value, why=reason):
            counts[slot] += 1
            self._record(Denial(self._clock(), devname, register, kind, base + offset, offset, size, write,
                                value if write else None, why))
        return deny

    def _deny_read(self, devname, kind, base, register, reason):
        deny = self._denier(devname, kind, base, register, reason)

        def h(off, size):
            deny(off, size, False, None)
            return _MASK[size]
        return h

    def _deny_write(self, devname, kind, base, register, reason):
        deny = self._denier(devname, kind, base, register, reason)

        def h(off, size, value):
            deny(off, size, True, value)
        return h

    def _misfit(self, devname, kind, base, r: Register):
        deny = self._denier(devname, kind, base, r.name, "")

        def misfit(off, size, write, value=None):
            deny(off, size, write, value,
                 f"{size}-byte access at offset {off:#x} does not fit the register ({r.offset:#x}+{r.width})")
            return _MASK[size]
        return misfit

    def _read_handler(self, devname, kind, base, r: Register, rd):
        """The slow-path read handler of register r (allowed reads that fit never get here)."""
        act = r.action(self.trust)
        if "r" not in r.access:
            return self._deny_read(devname, kind, base, r.name, "read of a write-only register")
        if act.action == "deny":
            deny = self._denier(devname, kind, base, r.name, f"{self.trust}: deny")
            rv, lo = act.read_value, r.offset

            def denied(off, size):
                deny(off, size, False, None)
                return _MASK[size] if rv is None else (rv >> (8 * (off - lo))) & _MASK[size]
            return denied
        misfit = self._misfit(devname, kind, base, r)
        if act.kind != "shadow":
            return lambda off, size: misfit(off, size, False)
        counts, end, lo = self._counts, r.end, r.offset
        slot = self._slot(devname, r.name, "translate")
        cell = self._shadow(devname, kind, r.name)

        def shadow_read(off, size):
            if off + size > end:
                return misfit(off, size, False)
            counts[slot] += 1
            return (cell[0] >> (8 * (off - lo))) & _MASK[size]
        return shadow_read

    def _write_handler(self, devname, kind, base, r: Register, wr):
        """The slow-path write handler of register r (allowed writes that fit never get here)."""
        act = r.action(self.trust)
        if "w" not in r.access:
            return self._deny_write(devname, kind, base, r.name, "write to a read-only register")
        if act.action == "deny":
            return self._deny_write(devname, kind, base, r.name, f"{self.trust}: deny")
        counts, end, lo, misfit = self._counts, r.end, r.offset, self._misfit(devname, kind, base, r)
        if act.action == "allow":
            return lambda off, size, value: misfit(off, size, True, value)
        slot = self._slot(devname, r.name, "translate")
        if act.kind == "mask":
            mask = act.mask

            def mask_write(off, size, value):
                if off + size > end:
                    misfit(off, size, True, value)
                    return
                counts[slot] += 1
                wr(off, size, value & (mask >> (8 * (off - lo))) & _MASK[size])
            return mask_write
        if act.kind == "clamp":
            cl, ch, width = act.clamp[0], act.clamp[1], r.width
            partial = self._denier(devname, kind, base, r.name, "partial write to a clamped register")

            def clamp_write(off, size, value):
                if off != lo or size != width:
                    if off + size > end:
                        misfit(off, size, True, value)
                    else:
                        partial(off, size, True, value)
                    return
                counts[slot] += 1
                wr(off, size, cl if value < cl else ch if value > ch else value)
            return clamp_write
        cell = self._shadow(devname, kind, r.name)

        def shadow_write(off, size, value):
            if off + size > end:
                misfit(off, size, True, value)
                return
            counts[slot] += 1
            shift = 8 * (off - lo)
            m = _MASK[size] << shift
            cell[0] = (cell[0] & ~m) | ((value << shift) & m)
        return shadow_write

    # ------------------------------------------------------------------ denials
    def _emit(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
        else:
            print(line, file=sys.stderr)

    def _record(self, d: Denial) -> None:
        self.audit.append(d)
        self.denied += 1
        with self._lock:
            st = self._rate.get(d.device)
            lines = []
            if st is None or d.time - st[0] >= self.log_window:
                if st is not None and st[2]:
                    lines.append(f"pykvm: policy: {d.device}: ... {st[2]} more denials suppressed")
                st = self._rate[d.device] = [d.time, 0, 0]
            if st[1] < self.log_limit:
                st[1] += 1
                lines.append(f"pykvm: policy ({self.trust}): {d}")
            else:
                st[2] += 1
        for line in lines:
            self._emit(line)

    def flush_log(self) -> None:
        """Print the pending '... suppressed' counts now (the end of a run)."""
        with self._lock:
            pending = [(dev, st[2]) for dev, st in self._rate.items() if st[2]]
            for dev, _ in pending:
                self._rate[dev][2] = 0
        for dev, n in pending:
            self._emit(f"pykvm: policy: {dev}: ... {n} more denials suppressed")

    # ------------------------------------------------------------------ reports
    def _all_counts(self) -> dict[tuple[str, str, str], int]:
        out: dict = {}
        with self._lock:
            items = list(self._slots.items())
            ranges = list(self._ranges.items())
        for key, i in items:
            if self._counts[i]:
                out[key] = out.get(key, 0) + self._counts[i]
        for (dev, _kind, _base), (names, rcount, wcount) in ranges:
            for o, reg in names.items():
                n = rcount[o] + wcount[o]
                if n:
                    out[(dev, reg, "allow")] = out.get((dev, reg, "allow"), 0) + n
        return out

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """Decision counts of wrapped ranges: {device: {register: {"allow"|"deny"|"translate": n}}}."""
        out: dict = {}
        for (dev, reg, action), n in sorted(self._all_counts().items()):
            out.setdefault(dev, {}).setdefault(reg, {})[action] = n
        return out

    def totals(self) -> dict[str, int]:
        """Decision counts summed over every device and register."""
        t = {"allow": 0, "deny": 0, "translate": 0}
        for (_d, _r, action), n in self._all_counts().items():
            t[action] += n
        return t

    def summary(self) -> str | None:
        """One line about denials for the end of a run, or None when nothing was denied."""
        self.flush_log()
        per: dict[str, list[tuple[str, int]]] = {}
        for dev, regs in self.stats().items():
            for reg, acts in regs.items():
                if acts.get("deny"):
                    per.setdefault(dev, []).append((reg, acts["deny"]))
        if not per:
            return None
        total = sum(n for regs in per.values() for _, n in regs)
        parts = []
        for dev, regs in sorted(per.items()):
            regs.sort(key=lambda x: (-x[1], x[0]))
            parts.append(f"{dev} (" + ", ".join(f"{r} {n}" for r, n in regs) + ")")
        t = self.totals()
        return (f"pykvm: policy ({self.trust}): {total} access{'es' if total != 1 else ''} denied: "
                f"{'; '.join(parts)}; {t['translate']} translated, {t['allow']} allowed (counted ranges only)")

    # ------------------------------------------------------------------ state that moves with the VM
    def get_state(self) -> dict:
        """Shadow register values (what the guest reads back), as JSON data."""
        with self._lock:
            return {f"{d}/{s}/{r}": cell[0] for (d, s, r), cell in self._shadows.items()}

    def set_state(self, state: dict) -> None:
        """Load shadow values saved by get_state()."""
        for key, value in state.items():
            parts = str(key).split("/")
            if len(parts) != 3 or not isinstance(value, int) or value < 0:
                raise ValueError(f"policy state: bad shadow entry {key!r}: {value!r}")
            self._shadow(*parts)[0] = value
