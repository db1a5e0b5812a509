"""A bounded counter for keys a guest chooses (unclaimed addresses), safe to read while vCPUs count.

A guest can touch any number of distinct addresses, so an unbounded Counter is a way for it
to grow the VMM's memory. This keeps at most `limit` keys (the space-saving scheme: a new key
evicts the least-counted one, whose count moves to `other`), so the heavy hitters stay listed
and `total` stays exact.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

DEFAULT_LIMIT = 64


class BoundedTally:
    """Counts per key for at most `limit` keys plus an exact total; reads return snapshots."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.total = 0        # every count ever added
        self.other = 0        # counts of keys no longer listed
        self.evicted = 0      # how many keys were dropped from the list

    def add(self, key: Hashable, n: int = 1) -> None:
        """Count `n` more for `key`, evicting the least-counted key when the list is full."""
        with self._lock:
            self.total += n
            counts = self._counts
            if key in counts:
                counts[key] += n
                return
            if len(counts) >= self.limit:
                victim = min(counts, key=counts.__getitem__)
                self.other += counts.pop(victim)
                self.evicted += 1
            counts[key] = n

    def items(self) -> list[tuple[Hashable, int]]:
        """A snapshot of (key, count) pairs, safe while other threads add."""
        with self._lock:
            return list(self._counts.items())

    def most_common(self, n: int | None = None) -> list[tuple[Hashable, int]]:
        """The listed keys, highest count first."""
        ranked = sorted(self.items(), key=lambda kv: kv[1], reverse=True)
        return ranked if n is None else ranked[:n]

    def summary(self) -> dict:
        """Totals for reports: exact total, the part no longer listed, and how many keys were dropped."""
        with self._lock:
            return {"total": self.total, "other": self.other, "evicted_keys": self.evicted,
                    "listed": len(self._counts)}

    def __getitem__(self, key: Hashable) -> int:
        with self._lock:
            return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)

    def __bool__(self) -> bool:
        return self.total > 0

    def __iter__(self):
        return iter([k for k, _ in self.items()])
