"""The door to the database path: the tenant's rate (``rates``, policy/rates.py; taken by
the handler, without an await when it is local), then a slot of
the one pool the request will use (a ``limits.Scheduler`` per pool: each cluster's
primary and each replica), so that a flood on one pool never takes the turn of a tenant
waiting for another, and the weighted round-robin decides on every pool.  A request
waits once, in its pool's fair queue: the pool has as many connections as slots."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ..config import Limits
from .limits import Scheduler
from .rates import RateLimiter


class Admission:
    def __init__(self, rates: RateLimiter, acquire_timeout_s: float,
                 fleet_size: Callable[[], int] = lambda: 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.rates = rates
        self.acquire_timeout_s = acquire_timeout_s
        self.fleet_size = fleet_size
        self.clock = clock
        self.pools: dict[str, Scheduler] = {}

    def resize(self, pools: Iterable[tuple[str, int]], acquire_timeout_s: float) -> None:
        """The pools (name, size) now in use (start, config reload).  A pool kept keeps its
        queue and counts; one gone is dropped (its requests release into nothing)."""
        self.acquire_timeout_s = acquire_timeout_s
        sizes = dict(pools)
        self.pools = {name: self.pools.get(name) or Scheduler(size, acquire_timeout_s, self.clock, self._fleet)
                      for name, size in sizes.items()}
        for name, scheduler in self.pools.items():
            scheduler.resize(sizes[name], acquire_timeout_s)

    def _fleet(self) -> int:
        return self.fleet_size()

    @property
    def slots(self) -> int:
        return sum(s.slots for s in self.pools.values())

    async def admit(self, pool: str, tenant: str, limits: Limits) -> float:
        """Wait for a slot of ``pool``; the seconds waited.  Pair with ``release``."""
        return await self.pools[pool].admit(tenant, limits)

    def release(self, pool: str, tenant: str) -> None:
        scheduler = self.pools.get(pool)
        if scheduler is not None:
            scheduler.release(tenant)

    def inflight(self) -> dict[str, int]:
        """Transactions in flight per tenant, over every pool."""
        out: dict[str, int] = {}
        for scheduler in self.pools.values():
            for tenant, n in scheduler.inflight().items():
                out[tenant] = out.get(tenant, 0) + n
        return out

    def waiting(self) -> int:
        return sum(s.waiting() for s in self.pools.values())
