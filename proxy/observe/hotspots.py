"""Which tenants are hot right now: weighted Space-Saving over a sliding window.  Pure.

Memory is O(capacity), whatever the number of tenants: each window slot keeps at most
``capacity`` counters (Metwally et al., "Efficient computation of frequent and top-k
elements in data streams").  A counter's estimate over-counts by at most its recorded
error, and any tenant whose true share of the slot exceeds 1/capacity is guaranteed
to hold a counter.  The window is split into slots that expire in turn, so a tenant
that stops sending traffic drops out after one window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Counter:
    weight: float = 0.0   # database seconds
    requests: int = 0
    error: float = 0.0    # over-estimate inherited from the evicted counter


class SpaceSaving:
    """Weighted Space-Saving summary with at most ``capacity`` counters."""

    __slots__ = ("capacity", "counters", "requests", "total")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.counters: dict[str, _Counter] = {}
        self.total = 0.0
        self.requests = 0

    def add(self, key: str, weight: float) -> None:
        self.total += weight
        self.requests += 1
        c = self.counters.get(key)
        if c is None:
            if len(self.counters) >= self.capacity:
                victim = min(self.counters, key=lambda k: self.counters[k].weight)
                floor = self.counters.pop(victim).weight
                c = _Counter(weight=floor, error=floor)
            else:
                c = _Counter()
            self.counters[key] = c
        c.weight += weight
        c.requests += 1


@dataclass(frozen=True, slots=True)
class TenantLoad:
    tenant: str
    share: float          # of database time over the window (estimate; upper bound)
    requests_per_s: float  # estimate
    hot: bool


@dataclass
class HeavyHitters:
    """Top tenants by database time over ``window_s``, in ``slots`` rotating summaries."""

    window_s: float
    capacity: int
    hot_share: float
    slots: int = 6
    _ring: deque[tuple[float, SpaceSaving]] = field(default_factory=deque)

    def _current(self, now: float) -> SpaceSaving:
        slot_s = self.window_s / self.slots
        start = now - now % slot_s
        if not self._ring or self._ring[-1][0] < start:
            self._ring.append((start, SpaceSaving(self.capacity)))
        while self._ring and self._ring[0][0] <= now - self.window_s:
            self._ring.popleft()
        return self._ring[-1][1]

    def add(self, tenant: str, db_seconds: float, now: float) -> None:
        self._current(now).add(tenant, db_seconds)

    def _live(self, now: float) -> list[SpaceSaving]:
        self._current(now)
        return [s for _, s in self._ring]

    def _elapsed(self, now: float) -> float:
        if not self._ring:
            return self.window_s
        return max(min(self.window_s, now - self._ring[0][0]), 1e-3)

    def top(self, k: int, now: float) -> list[TenantLoad]:
        """The ``k`` heaviest tenants, heaviest first."""
        live = self._live(now)
        total = sum(s.total for s in live)
        weights: dict[str, float] = {}
        requests: dict[str, int] = {}
        for s in live:
            for key, c in s.counters.items():
                weights[key] = weights.get(key, 0.0) + c.weight
                requests[key] = requests.get(key, 0) + c.requests
        ranked = sorted(weights, key=lambda t: (-weights[t], t))[:k]
        elapsed = self._elapsed(now)
        return [self._load(t, weights[t], requests[t], total, elapsed) for t in ranked]

    def load_of(self, tenant: str, now: float) -> TenantLoad:
        """One tenant's estimate (zero when no slot holds a counter for it)."""
        live = self._live(now)
        total = sum(s.total for s in live)
        weight = sum(s.counters[tenant].weight for s in live if tenant in s.counters)
        requests = sum(s.counters[tenant].requests for s in live if tenant in s.counters)
        return self._load(tenant, weight, requests, total, self._elapsed(now))

    def _load(self, tenant: str, weight: float, requests: int, total: float, elapsed: float) -> TenantLoad:
        share = weight / total if total > 0 else 0.0
        return TenantLoad(tenant=tenant, share=min(share, 1.0), requests_per_s=requests / elapsed,
                          hot=share >= self.hot_share)

    def forget(self, tenant: str) -> None:
        """Drop a tenant's counters (its data is gone)."""
        for _, s in self._ring:
            s.counters.pop(tenant, None)



def choose_labelled(top: Iterable[TenantLoad], pinned: frozenset[str], limit: int) -> frozenset[str]:
    """The tenants that get their own label: pinned ones first, then the heaviest, ``limit`` in all."""
    chosen = set(sorted(pinned)[:limit])
    for load in top:
        if len(chosen) >= limit:
            break
        chosen.add(load.tenant)
    return frozenset(chosen)
