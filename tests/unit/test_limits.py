"""Per-tenant rates, concurrency queues and fair sharing of the pool's slots."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config import Limits
from proxy.errors import ApiError
from proxy.observe.pools import PoolStats
from proxy.policy.limits import Scheduler, pool_report
from proxy.policy.rates import LocalBuckets, RateLimiter


async def settle() -> None:
    """Let granted waiters wake up (a grant resolves the future their admit awaits)."""
    for _ in range(10):
        await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_and_retry_after() -> None:
    clock = Clock()
    rates = RateLimiter(clock=clock)
    limits = Limits(rate_per_s=2, burst=2)
    for _ in range(2):
        rates.check("a", limits)
    with pytest.raises(ApiError) as info:
        rates.check("a", limits)
    assert info.value.kind.code == "rate_limited" and info.value.kind.status == 429
    assert info.value.retry_after_s == 1
    slow = Limits(rate_per_s=0.1, burst=1)
    rates.check("b", slow)
    with pytest.raises(ApiError) as info:
        rates.check("b", slow)
    assert info.value.retry_after_s == 10
    clock.now += 0.5  # one token back for "a"
    rates.check("a", limits)
    rates.check("other", limits)  # buckets are per tenant


def test_idle_buckets_are_dropped_only_once_full() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    assert buckets.take("a", 1.0, 1.0) == 0.0
    clock.now += 1.1
    assert buckets.take("x", 1.0, 1.0) == 0.0  # triggers the sweep
    assert "a" not in buckets._buckets  # "a" had refilled: dropped, it starts afresh with a full bucket
    assert buckets.take("a", 1.0, 1.0) == 0.0 and buckets.take("a", 1.0, 1.0) > 0


def test_the_local_share_divides_the_limit_by_the_fleet() -> None:
    """Without Redis, each of N live instances enforces rate/N (burst/N, at least 1)."""
    clock = Clock()
    rates = RateLimiter(clock=clock, fleet_size=lambda: 4)
    limits = Limits(rate_per_s=20, burst=20)
    served = 0
    for _ in range(100):  # 5 s at 20/s offered to this one instance
        for _ in range(20):
            try:
                rates.check("a", limits)
                served += 1
            except ApiError:
                pass
        clock.now += 0.25
    assert 100 // 4 <= served <= (20 * 25 + 20) // 4 + 1


async def test_a_fleet_cap_is_divided_by_the_live_instances() -> None:
    fleet = [3]
    s = Scheduler(slots=10, acquire_timeout_s=1, fleet_size=lambda: fleet[0])
    limits = Limits(max_concurrency=6, queue_timeout_ms=20)
    assert [await s.admit("a", limits) for _ in range(2)] == [0.0, 0.0]  # 6 / 3 instances
    with pytest.raises(ApiError) as info:
        await s.admit("a", limits)
    assert info.value.kind.code == "concurrency_limited"
    fleet[0] = 2  # an instance left: the share is recomputed
    await s.admit("a", limits)
    with pytest.raises(ApiError):
        await s.admit("a", limits)


async def test_concurrency_queue_then_timeout() -> None:
    s = Scheduler(slots=10, acquire_timeout_s=5)
    limits = Limits(max_concurrency=1, queue_timeout_ms=50)
    await s.admit("a", limits)
    waiter = asyncio.create_task(s.admit("a", limits))
    await asyncio.sleep(0.01)
    assert not waiter.done() and s.waiting() == 1
    s.release("a")
    assert await waiter >= 0.0  # granted
    assert s.inflight() == {"a": 1}
    with pytest.raises(ApiError) as info:
        await s.admit("a", limits)
    assert info.value.kind.code == "concurrency_limited" and info.value.retry_after_s == 1
    s.release("a")
    assert s.inflight() == {} and s.busy == 0 and s.waiting() == 0


async def test_full_pool_gives_pool_timeout() -> None:
    s = Scheduler(slots=1, acquire_timeout_s=0.05)
    await s.admit("a", Limits())
    with pytest.raises(ApiError) as info:
        await s.admit("b", Limits(queue_timeout_ms=10_000))
    assert info.value.kind.code == "pool_timeout"
    s.release("a")


async def _grant_order(s: Scheduler, waiters: list[tuple[str, asyncio.Task[float]]], holder: str) -> list[str]:
    """Release one slot at a time and record who gets it."""
    order = []
    current = holder
    for _ in range(len(waiters)):
        s.release(current)
        await settle()
        done = [(t, w) for t, w in waiters if w.done() and (t, w) not in order]
        assert len(done) == 1
        order.append(done[0])
        current = done[0][0]
    return [t for t, _ in order]


async def test_round_robin_not_first_come_first_served() -> None:
    s = Scheduler(slots=1, acquire_timeout_s=30)
    await s.admit("hog", Limits())
    waiters = [("hog", asyncio.create_task(s.admit("hog", Limits()))) for _ in range(500)]
    await settle()
    waiters.append(("quiet", asyncio.create_task(s.admit("quiet", Limits()))))
    await settle()
    order = await _grant_order(s, waiters, "hog")
    # the quiet tenant's single request waits for at most one hog transaction
    assert order.index("quiet") <= 1
    s.release(order[-1])


async def test_weighted_shares() -> None:
    s = Scheduler(slots=1, acquire_timeout_s=30)
    await s.admit("x", Limits())
    heavy, light = Limits(weight=3), Limits(weight=1)
    waiters = []
    for _ in range(40):
        waiters.append(("heavy", asyncio.create_task(s.admit("heavy", heavy))))
        waiters.append(("light", asyncio.create_task(s.admit("light", light))))
    await settle()
    order = await _grant_order(s, waiters, "x")
    first = order[:40]
    assert first.count("heavy") == 30 and first.count("light") == 10
    s.release(order[-1])


async def test_cancelled_waiter_gives_its_turn_away() -> None:
    s = Scheduler(slots=1, acquire_timeout_s=30)
    await s.admit("a", Limits())
    gone = asyncio.create_task(s.admit("b", Limits()))
    stays = asyncio.create_task(s.admit("c", Limits()))
    await settle()
    gone.cancel()
    await settle()
    s.release("a")
    await settle()
    assert stays.done() and s.inflight() == {"c": 1}
    s.release("c")
    assert s.busy == 0


async def test_a_waiter_cancelled_right_after_its_grant_hands_the_slot_back() -> None:
    s = Scheduler(slots=1, acquire_timeout_s=30)
    await s.admit("a", Limits())
    waiter = asyncio.create_task(s.admit("b", Limits()))
    await settle()
    s.release("a")   # grants b's slot at once
    waiter.cancel()  # before b's admit has resumed
    await settle()
    assert waiter.cancelled() and s.busy == 0 and s.inflight() == {}
    assert await asyncio.wait_for(s.admit("c", Limits()), 1) == 0.0
    assert s.inflight() == {"c": 1}


async def test_resize_serves_waiters() -> None:
    s = Scheduler(slots=1, acquire_timeout_s=30)
    await s.admit("a", Limits())
    waiter = asyncio.create_task(s.admit("b", Limits()))
    await settle()
    assert not waiter.done()
    s.resize(2, 30)
    await settle()
    assert waiter.done()


def test_pool_report_littles_law() -> None:
    stats = PoolStats(name="primary", size=10, idle=6, max=20, waiting=1, timeouts=3)
    # 600 transactions of 20 ms in 60 s: 10/s x 0.02 s = 0.2 in flight on average
    recent = [(50.0 + i * 0.05, 0.001 * (i % 10), 0.02) for i in range(600)]
    r = pool_report(stats, recent, now=80.0, window_s=60.0)
    assert r["in_use"] == 4 and r["timeouts_total"] == 3
    assert r["inputs"]["throughput_per_s"] == 10.0 and r["inputs"]["mean_transaction_s"] == 0.02
    assert r["recommended_size"] == 2  # ceil(0.2 x 1.5), at least 2
    assert r["acquire_wait_p99_s"] == pytest.approx(0.009) and r["utilisation"] == 0.01
    busy = [(50.0 + i * 0.001, 0.0, 0.5) for i in range(6000)]
    assert pool_report(stats, busy, now=60.0, window_s=60.0)["recommended_size"] == 75  # 100/s x 0.5 s x 1.5
