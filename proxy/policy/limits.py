"""Fair access to one pool's transaction slots (one ``Scheduler`` per pool: policy/admission.py).

``Scheduler.admit(tenant, limits)`` is the door to the pool (the request's rate was
taken before, policy/rates.py):

1. the pool lends at most ``slots`` transactions at a time (its size), and each tenant
   at most ``max_concurrency`` of them (by default half of them, rounded up: a tenant
   alone can never take every slot; an explicit cap is divided by the live instances
   of the fleet, rounded up).  A request that cannot have one waits in its tenant's
   FIFO queue.  Freed slots go to the waiting tenants in **weighted round-robin**
   (deficit round-robin, one transaction = one unit, quantum = ``weight``), never
   first-come-first-served, so a tenant with 500 queued requests delays a tenant with
   one queued request by about one transaction.
2. A waiter queued behind its tenant's ``max_concurrency`` gets 503
   ``concurrency_limited`` after ``queue_timeout_ms``; one queued because every slot was
   busy gets 503 ``pool_timeout`` after the pool's ``acquire_timeout_ms``; both carry
   ``Retry-After``.  This is the request's only wait: the pool's connections are as
   many as its slots.

Memory: one small record per tenant with transactions in flight or waiting; idle ones
are dropped.  Single-threaded: runs on the event loop, no locks.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import MAX_CONCURRENCY_AUTO, Limits
from ..errors import CONCURRENCY_LIMITED, POOL_TIMEOUT, ApiError
from ..observe.pools import PoolStats


@dataclass(slots=True)
class _Tenant:
    inflight: int = 0
    queue: deque[tuple[asyncio.Future[None], Limits]] = field(default_factory=deque)
    deficit: float = 0.0


class Scheduler:
    """Admission to one pool for all tenants; ``slots`` is its transaction budget."""

    def __init__(self, slots: int, acquire_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 fleet_size: Callable[[], int] = lambda: 1) -> None:
        self.slots = slots
        self.acquire_timeout_s = acquire_timeout_s
        self.busy = 0
        self.clock = clock
        self.fleet_size = fleet_size
        self._tenants: dict[str, _Tenant] = {}
        self._ring: deque[str] = deque()  # tenants with waiters, in service order

    def resize(self, slots: int, acquire_timeout_s: float) -> None:
        """Change the transaction budget (config reload); waiters are served if it grew."""
        self.slots = slots
        self.acquire_timeout_s = acquire_timeout_s
        self._dispatch()

    def inflight(self) -> dict[str, int]:
        """Transactions in flight per tenant (tenants with none are left out)."""
        return {tenant: t.inflight for tenant, t in self._tenants.items() if t.inflight}

    def waiting(self) -> int:
        return sum(len(t.queue) for t in self._tenants.values())

    def _state(self, tenant: str) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant()
        return t

    def _cap(self, limits: Limits) -> int:
        """The tenant's share of this pool on this instance; 0: no cap."""
        cap = limits.max_concurrency
        if cap == MAX_CONCURRENCY_AUTO:
            return max(1, (self.slots + 1) // 2)  # the other half stays free for everyone else
        if cap > 0:
            return max(1, math.ceil(cap / max(1, self.fleet_size())))
        return 0

    def _at_cap(self, t: _Tenant, limits: Limits) -> bool:
        cap = self._cap(limits)
        return 0 < cap <= t.inflight

    async def admit(self, tenant: str, limits: Limits) -> float:
        """Wait for a slot; return the seconds spent waiting.  Pair with ``release``."""
        t = self._state(tenant)
        if not t.queue and self._can_start(t, limits):
            self._start(t)
            return 0.0
        now = self.clock()
        # Queued behind its own cap: the tenant's queue timeout.  Behind a full pool: the pool's.
        capped = self._at_cap(t, limits)
        timeout_s = limits.queue_timeout_ms / 1000 if capped else self.acquire_timeout_s
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        t.queue.append((future, limits))
        if tenant not in self._ring:
            self._ring.append(tenant)
        # The future is granted (_dispatch) or expired (the timer), whichever comes first;
        # a plain timer, not wait_for + shield (two more futures and callbacks per waiter).
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            await future
        except TimeoutError:
            self._forget(tenant, t, future)
            if capped or self._at_cap(t, limits):
                raise ApiError(CONCURRENCY_LIMITED, "too many requests in flight for this tenant",
                               retry_after_s=1) from None
            raise ApiError(POOL_TIMEOUT, "no database slot became free in time", retry_after_s=1) from None
        except asyncio.CancelledError:
            # Granted just before the cancellation arrived: hand the slot back.
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(tenant)
            else:
                self._forget(tenant, t, future)
            raise
        finally:
            timer.cancel()
        return self.clock() - now

    def release(self, tenant: str) -> None:
        t = self._tenants.get(tenant)
        if t is not None:
            t.inflight -= 1
            if not t.inflight and not t.queue:
                del self._tenants[tenant]
        self.busy -= 1
        self._dispatch()

    def _can_start(self, t: _Tenant, limits: Limits) -> bool:
        return self.busy < self.slots and not self._at_cap(t, limits)

    def _start(self, t: _Tenant) -> None:
        t.inflight += 1
        self.busy += 1

    def _forget(self, tenant: str, t: _Tenant, future: asyncio.Future[None]) -> None:
        t.queue = deque(item for item in t.queue if item[0] is not future)
        if not t.queue and tenant in self._ring:
            self._ring.remove(tenant)
            t.deficit = 0.0
        if not t.queue and not t.inflight:
            self._tenants.pop(tenant, None)

    def _dispatch(self) -> None:
        """Hand free slots to waiting tenants, deficit round-robin by weight."""
        blocked = 0
        while self.busy < self.slots and self._ring and blocked < len(self._ring):
            tenant = self._ring[0]
            t = self._tenants[tenant]
            while t.queue and t.queue[0][0].done():  # cancelled waiters
                t.queue.popleft()
            if not t.queue:
                self._ring.popleft()
                t.deficit = 0.0
                if not t.inflight:
                    del self._tenants[tenant]
                continue
            future, limits = t.queue[0]
            if self._at_cap(t, limits):
                self._ring.rotate(-1)
                blocked += 1
                continue
            if t.deficit < 1.0:
                t.deficit += limits.weight
                if t.deficit < 1.0:
                    self._ring.rotate(-1)
                    continue
            t.queue.popleft()
            t.deficit -= 1.0
            self._start(t)
            future.set_result(None)
            blocked = 0
            if not t.queue:
                self._ring.popleft()
                t.deficit = 0.0
            elif t.deficit < 1.0:
                self._ring.rotate(-1)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def pool_report(stats: PoolStats, recent: Iterable[tuple[float, float, float]], now: float, window_s: float,
                headroom: float = 1.5) -> dict[str, Any]:
    """Pool figures over the window and a size from Little's law: in flight = rate x time in system."""
    rows = [(wait, tx) for finished, wait, tx in recent if finished >= now - window_s]
    waits = sorted(w for w, _ in rows)
    busy_s = sum(tx for _, tx in rows)
    throughput = len(rows) / window_s
    mean_tx = busy_s / len(rows) if rows else 0.0
    in_flight = throughput * mean_tx
    return {
        "pool": stats.name,
        "size": stats.size,
        "max": stats.max,
        "in_use": stats.size - stats.idle,
        "waiting": stats.waiting,
        "timeouts_total": stats.timeouts,
        "acquire_wait_p50_s": _pick(waits, 0.5),
        "acquire_wait_p99_s": _pick(waits, 0.99),
        "utilisation": round(busy_s / (window_s * stats.max), 4) if stats.max else None,
        "recommended_size": max(2, math.ceil(in_flight * headroom)),
        "inputs": {"window_s": window_s, "transactions": len(rows), "throughput_per_s": round(throughput, 2),
                   "mean_transaction_s": round(mean_tx, 6), "mean_in_flight": round(in_flight, 3),
                   "headroom": headroom},
    }


def _pick(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None
