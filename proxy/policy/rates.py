"""Per-tenant request rates: ``rate_per_s`` tokens a second, up to ``burst``.

Without ``limits.redis_url`` each instance keeps a token bucket per tenant, with its
share of the limit: the limit divided by the live instances of the fleet (control
catalog), or the whole limit for a single instance.

With ``limits.redis_url`` the fleet shares one bucket per tenant in Redis: GCRA (the
generic cell rate algorithm, a token bucket kept as one timestamp) in one server-side
script, on Redis's clock.  An instance takes a few tokens at a time (a lease, about 100 ms
of the tenant's rate, at least one) and spends them locally, so a busy tenant costs one
round trip per lease, not per request; a lease unused after a second is dropped (the
fleet then admits slightly less, never more).  When Redis does not answer within
``limits.redis_timeout_ms`` the instance falls back to its local share, says so once in
the log and in ``tenant_proxy_rate_limit_redis_up``, and tries Redis again a second later.
Requests are served throughout: a Redis outage never turns into a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Limits
from ..errors import RATE_LIMITED, ApiError

log = logging.getLogger("tenant_proxy.rates")

LEASE_S = 0.1          # tokens taken from Redis at a time: this long of the tenant's rate
LEASE_TTL_S = 1.0      # unused leased tokens are dropped after this
RETRY_REDIS_S = 1.0    # after a failure, the local share until this much later

# KEYS[1]: the tenant's key.  ARGV: emission interval (us), burst tolerance (us), tokens wanted.
# Returns {tokens granted, microseconds until one more would be}.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local free = math.floor((now + tolerance - tat) / emission) + 1
if free < 1 then return {0, tat - tolerance - now} end
if free > wanted then free = wanted end
tat = tat + free * emission
redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1)
return {free, 0}
"""


def refused(limits: Limits, wait_s: float) -> ApiError:
    return ApiError(RATE_LIMITED, f"over the tenant's rate limit of {limits.rate_per_s:g} requests/s",
                    retry_after_s=max(1, math.ceil(wait_s)))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    full_at: float = 0.0


class LocalBuckets:
    """One token bucket per tenant; idle full buckets are dropped."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._next_prune = 0.0

    def take(self, tenant: str, rate: float, burst: float) -> float:
        """Take a token; 0.0 when taken, else the seconds until one will be there."""
        now = self.clock()
        if now >= self._next_prune:
            self._prune(now)
        b = self._buckets.get(tenant)
        if b is None:
            b = self._buckets[tenant] = _Bucket(tokens=burst, stamp=now)
        b.tokens = min(burst, b.tokens + (now - b.stamp) * rate)
        b.stamp = now
        if b.tokens < 1.0:
            return (1.0 - b.tokens) / rate
        b.tokens -= 1.0
        b.full_at = now + (burst - b.tokens) / rate
        return 0.0

    def _prune(self, now: float) -> None:
        """Drop buckets that have refilled: they would start afresh anyway."""
        self._next_prune = now + 1.0
        for tenant in [t for t, b in self._buckets.items() if b.full_at <= now]:
            del self._buckets[tenant]


@dataclass(slots=True)
class _Lease:
    tokens: int = 0
    until: float = 0.0
    fetching: asyncio.Future[None] | None = None


class RateLimiter:
    """``check`` (local, no await) or ``take`` (Redis) a token for a request of a tenant."""

    def __init__(self, redis: Any = None, fleet_size: Callable[[], int] = lambda: 1, timeout_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 on_redis: Callable[[bool], None] = lambda up: None) -> None:
        self.redis = redis  # a redis.asyncio.Redis, or None
        self.fleet_size = fleet_size
        self.timeout_s = timeout_s
        self.clock = clock
        self.local = LocalBuckets(clock)
        self._script = redis.register_script(GCRA) if redis is not None else None
        self._leases: dict[str, _Lease] = {}
        self._redis_after = 0.0  # Redis is skipped until then (it failed)
        self._redis_up = True
        self.on_redis = on_redis  # told when Redis stops or starts answering

    @property
    def remote(self) -> bool:
        return self.redis is not None

    def check(self, tenant: str, limits: Limits) -> None:
        """The local share of the limit: the limit over the live instances."""
        if limits.rate_per_s <= 0:
            return
        n = max(1, self.fleet_size())
        wait = self.local.take(tenant, limits.rate_per_s / n, max(1.0, limits.burst / n))
        if wait:
            raise refused(limits, wait)

    async def take(self, tenant: str, limits: Limits) -> None:
        if limits.rate_per_s <= 0:
            return
        if self.clock() < self._redis_after:
            self.check(tenant, limits)
            return
        lease = self._leases.get(tenant)
        if lease is None:
            lease = self._leases[tenant] = _Lease()
        while True:
            if lease.tokens > 0 and self.clock() < lease.until:
                lease.tokens -= 1
                return
            if lease.fetching is None:
                break
            await asyncio.shield(lease.fetching)  # another request of the tenant is asking Redis
        lease.fetching = asyncio.get_running_loop().create_future()
        try:
            granted, wait_s = await self._ask(tenant, limits)
        except (OSError, TimeoutError, ConnectionError, _RedisError) as exc:
            self._redis_down(exc)
            self.check(tenant, limits)
            return
        finally:
            lease.fetching.set_result(None)
            lease.fetching = None
        if granted < 1:
            raise refused(limits, wait_s)
        lease.tokens, lease.until = granted - 1, self.clock() + LEASE_TTL_S
        if len(self._leases) > 10000:
            self._leases = {t: le for t, le in self._leases.items() if le.until > self.clock() or le.fetching}

    async def _ask(self, tenant: str, limits: Limits) -> tuple[int, float]:
        assert self._script is not None
        emission_us = 1_000_000 / limits.rate_per_s
        wanted = max(1, min(int(limits.burst), int(limits.rate_per_s * LEASE_S)))
        try:
            async with asyncio.timeout(self.timeout_s):
                granted, wait_us = await self._script(
                    keys=[f"tenant_proxy:rate:{tenant}"],
                    args=[int(emission_us), int(emission_us * max(0.0, limits.burst - 1)), wanted])
        except Exception as exc:
            if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
                raise
            raise _RedisError(str(exc)) from exc
        if not self._redis_up:
            self._redis_up = True
            log.warning("rate limits: Redis answers again; the fleet shares one bucket per tenant")
            self.on_redis(True)
        return int(granted), int(wait_us) / 1_000_000

    def _redis_down(self, exc: BaseException) -> None:
        self._redis_after = self.clock() + RETRY_REDIS_S
        if self._redis_up:
            self._redis_up = False
            log.warning("rate limits: Redis did not answer (%s); each instance enforces its share "
                        "(the limit / %d live instances) until it is back", type(exc).__name__, self.fleet_size())
            self.on_redis(False)


    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


class _RedisError(Exception):
    """Redis answered with an error (a script it refused, a read-only replica, ...)."""


class RedisUnavailable(Exception):
    """``limits.redis_url`` did not answer at start or reload."""


async def open_limiter(redis_url: str | None, timeout_ms: int) -> RateLimiter:
    """A limiter on Redis (checked with a PING, the script loaded) or, without a URL, local."""
    if redis_url is None:
        return RateLimiter()
    import redis.asyncio as aioredis

    from ..config import redact_dsn

    client = aioredis.from_url(redis_url, socket_timeout=max(1.0, timeout_ms / 1000),  # type: ignore[no-untyped-call]
                               socket_connect_timeout=2.0, health_check_interval=0)
    limiter = RateLimiter(client, timeout_s=timeout_ms / 1000)
    try:
        async with asyncio.timeout(5.0):
            await client.ping()
            await client.script_load(GCRA)
    except Exception as exc:
        await client.aclose()
        raise RedisUnavailable(f"limits.redis_url: Redis at {redact_dsn(redis_url)} does not answer "
                               f"({type(exc).__name__}: {exc})") from None
    return limiter
