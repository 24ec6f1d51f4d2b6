"""The HTTP contract end to end: results, batches, limits, timeouts and every error code."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import asyncpg
import jwt

from ..fix_gateway import JWT_SECRET, KEY_A, KEY_ANY, KEY_B, TENANT_A, TENANT_B, TENANT_SUSPENDED, Api


def _token(**claims: object) -> str:
    now = int(time.time())
    payload = {"sub": "jwt-svc", "iss": "test-idp", "aud": "tenant-proxy", "iat": now, "exp": now + 60,
               "tenant_id": TENANT_A, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


async def test_query_result_shape(api: Api) -> None:
    r = await api.query("SELECT 1 AS one, 'x'::text AS two")
    assert r.status == 200
    assert r.body == {"columns": [{"name": "one", "type": "int4"}, {"name": "two", "type": "text"}],
                      "rows": [{"one": 1, "two": "x"}], "row_count": 1, "command": "SELECT", "truncated": False}
    r = await api.query("SELECT 1 AS one, 'x'::text AS two", row_format="array")
    assert r.body["rows"] == [[1, "x"]]


async def test_max_rows_truncates_and_cannot_be_raised(api: Api) -> None:
    r = await api.query("SELECT g FROM generate_series(1, 50) g", max_rows=10)
    assert r.body["row_count"] == 10 and r.body["truncated"] is True
    assert [row["g"] for row in r.body["rows"]] == list(range(1, 11))
    # tenant B's configured limit is 500: asking for more gives 500, not more
    r = await api.query("SELECT g FROM generate_series(1, 800) g", key=KEY_B, max_rows=100000)
    assert r.body["row_count"] == 500 and r.body["truncated"] is True
    r = await api.query("SELECT g FROM generate_series(1, 5) g", max_rows=5)
    assert r.body["truncated"] is False and r.body["row_count"] == 5


async def test_read_only_refuses_writes(api: Api) -> None:
    r = await api.query("INSERT INTO events (event_type, data) VALUES ('ro', '{}')", read_only=True)
    assert r.status == 422 and r.code == "sql_error" and r.body["error"]["sqlstate"] == "25006"


async def test_transaction_commits_all(api: Api, admin_db: asyncpg.Connection) -> None:
    marker = f"tx-{uuid.uuid4()}"
    r = await api.transaction([
        {"sql": "INSERT INTO events (event_type, data) VALUES ($1, '{\"n\": 1}')", "params": [marker]},
        {"sql": "INSERT INTO events (event_type, data) VALUES ($1, '{\"n\": 2}')", "params": [marker]},
        {"sql": "SELECT count(*) AS n FROM events WHERE event_type = $1", "params": [marker]},
    ], isolation="serializable")
    assert r.status == 200, r.body
    assert [res["command"] for res in r.body["results"]] == ["INSERT", "INSERT", "SELECT"]
    assert r.body["results"][2]["rows"] == [{"n": 2}]
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1", marker) == 2


async def test_transaction_rolls_back_entirely_when_last_statement_fails(api: Api,
                                                                         admin_db: asyncpg.Connection) -> None:
    marker = f"tx-{uuid.uuid4()}"
    r = await api.transaction([
        {"sql": "INSERT INTO events (event_type, data) VALUES ($1, '{}')", "params": [marker]},
        {"sql": "UPDATE events SET metadata = '{}' WHERE event_type = $1", "params": [marker]},
        {"sql": "SELECT 1 / 0"},
    ])
    assert r.status == 422 and r.code == "sql_error" and r.body["error"]["sqlstate"] == "22012"
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1", marker) == 0


async def test_timeout_cancels_sleep_and_connection_is_reused(gateway_with: object,
                                                             admin_db: asyncpg.Connection) -> None:
    # One gateway connection, so the request after the timeout necessarily reuses it.
    async with gateway_with(database={"pool_min_size": 1, "pool_max_size": 1}) as api:  # type: ignore[operator]
        started = time.monotonic()
        r = await api.query("SELECT pg_sleep(10)", timeout_ms=300)
        assert r.status == 504 and r.code == "statement_timeout" and r.body["error"]["sqlstate"] == "57014"
        assert time.monotonic() - started < 3
        pid_after = await api.query("SELECT pg_backend_pid() AS pid, current_setting('app.tenant_id') AS t")
        assert pid_after.status == 200 and pid_after.body["rows"][0]["t"] == TENANT_A
        running = await admin_db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(10)%' AND state = 'active'")
        assert running == 0


async def test_every_response_carries_a_request_id(api: Api) -> None:
    r = await api.query("SELECT 1")
    r2 = await api.query("SELECT 1")
    made = [r.headers["X-Request-Id"], r2.headers["X-Request-Id"]]
    assert made[0] != made[1] and all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made), made
    r = await api.request("POST", "/v1/query", json={"sql": "SELECT 1"}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    r = await api.query("SELECT 1", key="wrong")
    assert r.headers["X-Request-Id"] and r.body["error"]["request_id"] == r.headers["X-Request-Id"]
    r = await api.request("GET", "/nowhere", headers={"X-Request-Id": "zz-9"})
    assert r.status == 404 and r.code == "not_found" and r.headers["X-Request-Id"] == "zz-9"
    # The longest id accepted is too long for an OpenMetrics exemplar: the request still
    # succeeds (it used to fail while its latency was recorded) and keeps its id.
    longest = "r" * 128
    r = await api.request("POST", "/v1/query", json={"sql": "SELECT 1 AS one"}, headers={"X-Request-Id": longest})
    assert r.status == 200 and r.body["rows"] == [{"one": 1}] and r.headers["X-Request-Id"] == longest


async def test_health_on_both_ports(api: Api) -> None:
    for admin in (False, True):
        assert (await api.request("GET", "/healthz", key=None, admin=admin)).status == 200
        ready = await api.request("GET", "/readyz", key=None, admin=admin)
        assert ready.status == 200 and ready.body["status"] == "ready"


async def test_jwt_auth(api: Api) -> None:
    r = await api.query("SELECT current_setting('app.tenant_id') AS t", key=_token())
    assert r.status == 200 and r.body["rows"] == [{"t": TENANT_A}]
    r = await api.query("SELECT current_setting('app.tenant_id') AS t", key=_token(tenant_id=[TENANT_A, TENANT_B]),
                        tenant=TENANT_B)
    assert r.body["rows"] == [{"t": TENANT_B}]


# -- error codes --------------------------------------------------------------------------

async def test_unauthenticated_same_answer_for_every_cause(api: Api) -> None:
    causes = {
        "missing": None,
        "unknown key": "no-such-key",
        "expired jwt": _token(exp=int(time.time()) - 3600),
        "bad signature": jwt.encode({"tenant_id": TENANT_A, "exp": int(time.time()) + 60, "iss": "test-idp",
                                     "aud": "tenant-proxy"}, "another-secret-another-secret-12345", "HS256"),
        "wrong issuer": _token(iss="evil"),
        "wrong audience": _token(aud="other"),
        "garbage tenant claim": _token(tenant_id="not-a-uuid"),
    }
    bodies = set()
    for cause, key in causes.items():
        r = await api.query("SELECT 1", key=key)
        assert r.status == 401 and r.code == "unauthenticated", cause
        bodies.add(r.body["error"]["message"])
    assert len(bodies) == 1
    r = await api.request("POST", "/v1/query", key=None, json={"sql": "SELECT 1"},
                          headers={"Authorization": f"Basic {KEY_A}"})
    assert r.status == 401


async def test_tenant_errors(api: Api) -> None:
    assert (await api.query("SELECT 1", key=KEY_ANY)).code == "tenant_required"
    assert (await api.query("SELECT 1", key=KEY_B, tenant=TENANT_A)).code == "tenant_forbidden"
    r = await api.query("SELECT 1", key=KEY_ANY, tenant=TENANT_SUSPENDED)
    assert r.status == 403 and r.code == "tenant_suspended"
    r = await api.query("SELECT 1", key=KEY_ANY, tenant="'; DROP TABLE events; --")
    assert r.status == 400 and r.code == "invalid_request"


async def test_invalid_requests(api: Api) -> None:
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "must be a JSON object"),
        (b'{"sql": 42}', "sql must be a non-empty string"),
        (b'{"sql": "SELECT 1", "params": {"a": 1}}', "params must be an array"),
        (b'{"sql": "SELECT 1", "bogus": 1}', "unknown field(s) in the request: bogus"),
        (b'{"sql": "SELECT 1", "timeout_ms": -5}', "timeout_ms must be a positive integer"),
        (b'{"sql": "SELECT 1", "read_only": "yes"}', "read_only must be true or false"),
        (b'{"sql": "SELECT 1", "row_format": "csv"}', "row_format"),
        (b'{"sql": "SELECT $1::int + $2::int", "params": [1]}', "expects 2 parameter(s), 1 given"),
        (b'{"sql": "SELECT $1::int", "params": ["abc"]}', "parameter $1 (int4): expected an integer"),
        (b'{"sql": "SELECT $1::timestamptz", "params": [5]}', "parameter $1 (timestamptz)"),
        (b'{"sql": "SELECT $1::int", "params": [3000000000]}', "invalid input for query argument $1"),
    ]
    for raw, message in cases:
        r = await api.request("POST", "/v1/query", data=raw, headers={"Content-Type": "application/json"})
        assert r.status == 400 and r.code == "invalid_request", (raw, r.body)
        assert message in r.body["error"]["message"], (raw, r.body)
    r = await api.transaction([])
    assert r.code == "invalid_request"
    r = await api.transaction([{"sql": "SELECT 1", "extra": True}])
    assert r.code == "invalid_request" and "statements[0]" in r.body["error"]["message"]
    r = await api.query("SELECT 1", isolation="chaos")
    assert r.code == "invalid_request"


async def test_parameter_refused_after_prepare_leaves_no_transaction_open(api: Api,
                                                                        admin_db: asyncpg.Connection) -> None:
    """The BEGIN travels with the first Parse+Describe, and parameters are converted only
    once the statement's types are known: refusing one must still roll the BEGIN back
    (the test stack's PgBouncer has one server connection, so a leftover shows at once)."""
    for _ in range(3):
        r = await api.query("SELECT $1::int AS n", params=["abc"])
        assert r.code == "invalid_request", r.body
        r = await api.query("SELECT current_setting('transaction_isolation') AS iso", isolation="serializable")
        assert r.status == 200 and r.body["rows"] == [{"iso": "serializable"}], r.body
    assert await admin_db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                   "AND state LIKE 'idle in transaction%'") == 0


async def test_payload_too_large(gateway_with: object) -> None:
    async with gateway_with(server={"max_request_bytes": 2048}) as api:  # type: ignore[operator]
        r = await api.query("SELECT $1::text", "x" * 10000)
        assert r.status == 413 and r.code == "payload_too_large"
        assert (await api.query("SELECT 1")).status == 200


async def test_conflict_strips_detail(api: Api, admin_db: asyncpg.Connection) -> None:
    # the unique violation's DETAIL (the key's values) is not passed on
    a_id, a_at = await admin_db.fetchrow("SELECT id, created_at FROM events WHERE tenant_id = $1 LIMIT 1", TENANT_A)
    r = await api.query("INSERT INTO events (id, event_type, data, created_at) VALUES ($1, 'dup', '{}', $2)",
                        str(a_id), a_at.isoformat())
    assert r.status == 409 and r.code == "conflict" and r.body["error"]["sqlstate"] == "23505"
    text = str(r.body)
    assert str(a_id) not in text and "Key (" not in text and TENANT_A not in text


async def test_a_key_of_another_tenants_row_is_no_conflict(api: Api, admin_db: asyncpg.Connection) -> None:
    # every unique key of events starts with tenant_id: B's (id, created_at) is free for A
    b_id, b_at = await admin_db.fetchrow("SELECT id, created_at FROM events WHERE tenant_id = $1 LIMIT 1", TENANT_B)
    r = await api.transaction([
        {"sql": "INSERT INTO events (id, event_type, data, created_at) VALUES ($1, 'same-key', '{}', $2)",
         "params": [str(b_id), b_at.isoformat()]},
        {"sql": "SELECT tenant_id::text AS t, event_type FROM events WHERE id = $1", "params": [str(b_id)]},
        {"sql": "DELETE FROM events WHERE id = $1 AND event_type = 'same-key'", "params": [str(b_id)]}])
    assert r.status == 200, r.body
    assert r.body["results"][1]["rows"] == [{"t": TENANT_A, "event_type": "same-key"}]
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE id = $1", b_id) == 1


async def test_sql_errors(api: Api) -> None:
    r = await api.query("SELECT * FROM no_such_table")
    assert r.status == 400 and r.code == "sql_invalid" and r.body["error"]["sqlstate"] == "42P01"
    r = await api.query("SELECT 1/0")
    assert r.status == 422 and r.code == "sql_error" and r.body["error"]["sqlstate"] == "22012"


async def test_statement_rejected(api: Api) -> None:
    r = await api.query("SELECT 1; SELECT 2")
    assert r.status == 400 and r.code == "statement_rejected"
    r = await api.query("SET app.tenant_id = 'x'")
    assert r.code == "statement_rejected" and "SET" in r.body["error"]["message"]


async def test_internal_error_has_no_details(api: Api) -> None:
    # A statement making the database raise an internal error is the statement's doing: a
    # 4xx, so that no tenant can raise the gateway's 5xx rate at will (round four, F4).
    r = await api.query("SELECT internal_boom()")
    assert r.status == 422 and r.code == "sql_error" and r.body["error"]["sqlstate"] == "XX000"
    assert "secret" not in str(r.body) and "Traceback" not in str(r.body)


async def test_pool_timeout(gateway_with: object) -> None:
    # max_concurrency 0: the tenant may take the only slot itself (the default cap is half the slots)
    async with gateway_with(database={"pool_min_size": 1, "pool_max_size": 1,  # type: ignore[operator]
                                      "acquire_timeout_ms": 200}, defaults={"max_concurrency": 0}) as api:
        slow = asyncio.create_task(api.query("SELECT pg_sleep(1.5)"))
        await asyncio.sleep(0.3)
        r = await api.query("SELECT 1")
        assert r.status == 503 and r.code == "pool_timeout" and r.headers["Retry-After"] == "1"
        assert r.body["error"]["retryable"] is True
        assert (await slow).status == 200


async def test_database_unavailable(gateway_with: object, stack: object) -> None:
    from proxy.tools.devstack import free_port

    dsn = f"postgresql://app:secret@127.0.0.1:{free_port()}/appdb"
    async with gateway_with(database={"dsn": dsn}) as api:  # type: ignore[operator]
        started = time.monotonic()
        r = await api.query("SELECT 1")
        assert r.status == 503 and r.code == "database_unavailable" and r.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 2
        ready = await api.request("GET", "/readyz", key=None, admin=True)
        assert ready.status == 503
        assert (await api.request("GET", "/healthz", key=None, admin=True)).status == 200


async def test_method_not_allowed(api: Api) -> None:
    r = await api.request("GET", "/v1/query")
    assert r.status == 405 and r.code == "method_not_allowed" and r.headers["Allow"] == "POST"
