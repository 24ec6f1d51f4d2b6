"""Each fault turns into a clear, retryable answer, and the gateway recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import aiohttp
import asyncpg

from proxy.tools.devstack import LocalStack

from ..fix_gateway import KEY_A, KEY_B, TENANT_A, TENANT_B, Api
from .conftest import admin_query, assert_no_transaction_left_open


async def _until_ok(api: Api, seconds: float = 15.0) -> int:
    """Poll until a request succeeds; return how many failed first."""
    failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = await api.query("SELECT 1 AS one")
        if r.status == 200:
            return failures
        failures += 1
        assert r.status == 503 and r.body["error"]["retryable"] is True, r.body
        await asyncio.sleep(0.2)
    raise AssertionError("the gateway did not recover")


async def test_pgbouncer_stopped_fails_fast_and_recovers(fault_gateway: Any, fault_stack: LocalStack) -> None:
    async with fault_gateway() as api:
        assert (await api.query("SELECT 1")).status == 200
        fault_stack.stop_bouncer()
        try:
            for _ in range(3):
                started = time.monotonic()
                r = await api.query("SELECT 1")
                assert r.status == 503 and r.code == "database_unavailable", r.body
                assert r.headers["Retry-After"] == "1" and r.body["error"]["retryable"] is True
                assert time.monotonic() - started < 2.0
            assert (await api.request("GET", "/readyz", key=None, admin=True)).status == 503
            assert (await api.request("GET", "/healthz", key=None, admin=True)).status == 200
        finally:
            fault_stack.start_bouncer()
        await _until_ok(api)
        assert (await api.request("GET", "/readyz", key=None, admin=True)).status == 200
        results = [await api.query("SELECT 1") for _ in range(10)]
        assert all(r.status == 200 for r in results)
    await assert_no_transaction_left_open(fault_stack)


async def test_postgresql_restart_leaves_no_broken_connection(fault_gateway: Any, fault_stack: LocalStack) -> None:
    async with fault_gateway(database={"pool_min_size": 4, "pool_max_size": 4}) as api:
        assert [(await api.query("SELECT 1")).status for _ in range(8)] == [200] * 8
        fault_stack.restart_postgres()
        await _until_ok(api, 30)
        # every pooled connection is used again: none may still be broken
        statuses = await asyncio.gather(*(api.query("SELECT pg_sleep(0.05)") for _ in range(16)))
        assert [r.status for r in statuses] == [200] * 16
        assert (await api.request("GET", "/readyz", key=None, admin=True)).status == 200
    await assert_no_transaction_left_open(fault_stack)


async def test_client_disconnect_cancels_the_statement(fault_gateway: Any, fault_stack: LocalStack) -> None:
    async with fault_gateway(database={"pool_min_size": 1, "pool_max_size": 1}) as api:
        timeout = aiohttp.ClientTimeout(total=0.5)
        try:
            async with api.session.post(api.base + "/v1/query", json={"sql": "SELECT pg_sleep(20) AS hung"},
                                        headers={"Authorization": f"Bearer {KEY_A}"}, timeout=timeout) as r:
                await r.read()
            raise AssertionError("the request should have been abandoned by the client")
        except TimeoutError:
            pass
        running: list[Any] = []
        for _ in range(30):
            running = await admin_query(fault_stack, "SELECT pid FROM pg_stat_activity WHERE query LIKE "
                                                     "'%pg_sleep(20) AS hung%' AND pid <> pg_backend_pid()")
            if not running:
                break
            await asyncio.sleep(0.1)
        assert running == []
        # the one gateway connection is usable again
        r = await api.query("SELECT current_setting('app.tenant_id') AS t")
        assert r.status == 200 and r.body["rows"] == [{"t": TENANT_A}]
    await assert_no_transaction_left_open(fault_stack)


async def test_a_hang_up_on_a_frozen_backend_frees_its_connection_in_time(fault_gateway: Any,
                                                                          fault_stack: LocalStack) -> None:
    """The client hangs up while its backend has stopped answering (a frozen host): the
    cancellation cannot finish, so handing the connection back gives up after the pool's
    acquire timeout and terminates it, instead of holding the connection and the slot
    for as long as the backend stays frozen."""
    async with fault_gateway(database={"pool_min_size": 1, "pool_max_size": 1, "acquire_timeout_ms": 1000}) as api:
        assert (await api.query("SELECT 1")).status == 200
        timeout = aiohttp.ClientTimeout(total=1.0)

        async def stalled() -> None:
            with contextlib.suppress(TimeoutError):
                async with api.session.post(api.base + "/v1/query", json={"sql": "SELECT pg_sleep(3) AS stall"},
                                            headers={"Authorization": f"Bearer {KEY_A}"}, timeout=timeout) as r:
                    await r.read()

        client = asyncio.create_task(stalled())
        frozen: list[int] = []
        try:
            for _ in range(50):
                frozen = [row["pid"] for row in await admin_query(
                    fault_stack, "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(3) AS stall%' "
                                 "AND pid <> pg_backend_pid()")]
                if frozen:
                    break
                await asyncio.sleep(0.02)
            assert len(frozen) == 1
            os.kill(frozen[0], signal.SIGSTOP)
            await client  # the client gives up while the backend is frozen
            started = time.monotonic()
            statuses = []
            while time.monotonic() - started < 2.5:
                r = await api.query("SELECT current_setting('app.tenant_id') AS t", key=KEY_B)
                statuses.append(r.status)
                if r.status == 200:
                    assert r.body["rows"] == [{"t": TENANT_B}]
                    break
                assert r.code == "pool_timeout", r.body
            assert statuses[-1] == 200, statuses
            assert sum(s.busy for s in api.running.gateway.admission.pools.values()) == 0
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            client.cancel()
    await assert_no_transaction_left_open(fault_stack)


async def test_pool_exhausted_gives_pool_timeout_and_admin_stays_up(fault_gateway: Any,
                                                                   fault_stack: LocalStack) -> None:
    # max_concurrency 0: tenant A may take every slot (by default it gets half of them)
    async with fault_gateway(database={"pool_min_size": 2, "pool_max_size": 2, "acquire_timeout_ms": 300},
                             defaults={"max_concurrency": 0}) as api:
        slow = [asyncio.create_task(api.query("SELECT pg_sleep(1.5)")) for _ in range(2)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        r = await api.query("SELECT 1", key=KEY_B)
        assert r.status == 503 and r.code == "pool_timeout" and r.headers["Retry-After"] == "1"
        assert 0.25 < time.monotonic() - started < 1.2
        t0 = time.monotonic()
        assert (await api.request("GET", "/healthz", key=None, admin=True)).status == 200
        assert (await api.request("GET", "/metrics", key=None, admin=True)).status == 200
        assert time.monotonic() - t0 < 0.5
        assert [(await s).status for s in slow] == [200, 200]
    await assert_no_transaction_left_open(fault_stack)


async def test_error_mid_batch_rolls_back(fault_gateway: Any, fault_stack: LocalStack) -> None:
    async with fault_gateway() as api:
        r = await api.transaction([
            {"sql": "INSERT INTO accounts (id, balance) VALUES (901, 1)"},
            {"sql": "INSERT INTO accounts (id, balance) VALUES (901, 2)"},  # duplicate key
            {"sql": "SELECT 1"},
        ])
        assert r.status == 409 and r.code == "conflict" and r.body["error"]["sqlstate"] == "23505"
        assert await admin_query(fault_stack, "SELECT * FROM accounts WHERE id = 901") == []
    await assert_no_transaction_left_open(fault_stack)


async def test_deadlock_is_reported_retryable(fault_gateway: Any, fault_stack: LocalStack) -> None:
    async with fault_gateway() as api:
        await api.query("DELETE FROM accounts WHERE id IN (1, 2)")
        await api.query("INSERT INTO accounts (id, balance) VALUES (1, 0), (2, 0)")

        def crossing(first: int, second: int) -> list[dict[str, Any]]:
            return [{"sql": f"UPDATE accounts SET balance = balance + 1 WHERE id = {first}"},
                    {"sql": "SELECT pg_sleep(0.3)"},
                    {"sql": f"UPDATE accounts SET balance = balance + 1 WHERE id = {second}"}]

        a, b = await asyncio.gather(api.transaction(crossing(1, 2)), api.transaction(crossing(2, 1)))
        outcomes = sorted([a.status, b.status])
        assert outcomes == [200, 409], (a.body, b.body)
        loser = a if a.status == 409 else b
        assert loser.code == "deadlock_detected" and loser.body["error"]["sqlstate"] == "40P01"
        assert loser.body["error"]["retryable"] is True
        rows = await admin_query(fault_stack, "SELECT id, balance FROM accounts WHERE id IN (1, 2) ORDER BY id")
        assert [tuple(r) for r in rows] == [(1, 1), (2, 1)]  # only the winner's updates
    await assert_no_transaction_left_open(fault_stack)


async def test_serialization_failure_is_reported_retryable(fault_gateway: Any, fault_stack: LocalStack) -> None:
    async with fault_gateway() as api:
        await api.query("DELETE FROM accounts WHERE id IN (10, 11)")
        await api.query("INSERT INTO accounts (id, balance) VALUES (10, 100), (11, 100)")

        def withdraw(target: int) -> list[dict[str, Any]]:
            # write skew: each reads both balances, then withdraws from one
            return [{"sql": "SELECT sum(balance) FROM accounts WHERE id IN (10, 11)"},
                    {"sql": "SELECT pg_sleep(0.3)"},
                    {"sql": f"UPDATE accounts SET balance = balance - 150 WHERE id = {target}"}]

        a, b = await asyncio.gather(api.transaction(withdraw(10), isolation="serializable"),
                                    api.transaction(withdraw(11), isolation="serializable"))
        assert sorted([a.status, b.status]) == [200, 409], (a.body, b.body)
        loser = a if a.status == 409 else b
        assert loser.code == "serialization_failure" and loser.body["error"]["sqlstate"] == "40001"
        assert loser.body["error"]["retryable"] is True and loser.headers["Retry-After"] == "1"
    await assert_no_transaction_left_open(fault_stack)


_SLOW_COMMIT = """
CREATE TABLE IF NOT EXISTS public.slow_commit (tenant_id uuid NOT NULL DEFAULT current_tenant_id(), n int);
ALTER TABLE public.slow_commit OWNER TO app_owner;
ALTER TABLE public.slow_commit ENABLE ROW LEVEL SECURITY; ALTER TABLE public.slow_commit FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON public.slow_commit;
CREATE POLICY tenant_isolation ON public.slow_commit USING (tenant_id = current_tenant_id())
  WITH CHECK (tenant_id = current_tenant_id());
GRANT SELECT, INSERT ON public.slow_commit TO app;
CREATE OR REPLACE FUNCTION public.slow_commit_sleep() RETURNS trigger LANGUAGE plpgsql
  AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
ALTER FUNCTION public.slow_commit_sleep() OWNER TO app_owner;
DROP TRIGGER IF EXISTS slow_commit_at_commit ON public.slow_commit;
CREATE CONSTRAINT TRIGGER slow_commit_at_commit AFTER INSERT ON public.slow_commit
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.slow_commit_sleep();
"""


async def test_a_connection_lost_during_commit_is_outcome_unknown(fault_gateway: Any, fault_stack: LocalStack) -> None:
    """The COMMIT runs a deferred trigger for 1.5 s; PgBouncer dies meanwhile.  The backend
    commits anyway: the answer must not be a retryable "nothing happened"."""
    await _admin_script(fault_stack, _SLOW_COMMIT)
    async with fault_gateway() as api:
        loop = asyncio.get_running_loop()
        write = asyncio.create_task(api.query("INSERT INTO slow_commit (n) VALUES (7) RETURNING n"))
        await asyncio.sleep(0.7)  # the INSERT is done, the COMMIT sleeps in its trigger
        await loop.run_in_executor(None, fault_stack.stop_bouncer)
        try:
            r = await write
        finally:
            await loop.run_in_executor(None, fault_stack.start_bouncer)
        assert r.status == 502 and r.code == "transaction_outcome_unknown", r.body
        assert r.body["error"]["retryable"] is False and "Retry-After" not in r.headers
        await asyncio.sleep(1.5)  # the backend finishes its COMMIT
        rows = await admin_query(fault_stack, "SELECT count(*) AS n FROM slow_commit WHERE n = 7")
        assert rows[0]["n"] == 1, "the test meant a COMMIT that went through"
        # the gateway recovers once PgBouncer is back
        for _ in range(50):
            if (await api.query("SELECT 1 AS ok")).status == 200:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the gateway did not recover")
    await _admin_script(fault_stack, "DROP TABLE slow_commit; DROP FUNCTION slow_commit_sleep()")


async def _admin_script(stack: LocalStack, sql: str) -> None:
    conn = await asyncpg.connect(stack.admin_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
