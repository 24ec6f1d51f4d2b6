"""POST /sql, the Neon-compatible endpoint: the real @neondatabase/serverless driver and
Drizzle's neon-http against the running gateway, and the protocol details they rely on."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest_asyncio

from ..fix_gateway import KEY_A, KEY_AC, KEY_B, TENANT_A, TENANT_B, TENANT_C, Api, make_settings, running_gateway
from ..fix_stack import Stack
from ..openapi_doc import check_response

NEON_DIR = Path(__file__).resolve().parent.parent / "neon"


@pytest_asyncio.fixture(scope="module")
async def neon_api(stack: Stack, admin_db: asyncpg.Connection) -> AsyncIterator[Api]:
    """A gateway with the Neon endpoint on, shared by this module."""
    async with running_gateway(make_settings(stack, server={"neon_sql_endpoint": True})) as api:
        yield api


async def node(script: str, api: Api, **env: str) -> dict[str, Any]:
    """Run a script of tests/neon against the gateway; it prints one JSON object."""
    assert (NEON_DIR / "node_modules" / "@neondatabase" / "serverless").is_dir(), \
        "tests/neon's packages are missing: run `make setup` (npm ci in tests/neon)"
    proc = await asyncio.create_subprocess_exec(
        "node", str(NEON_DIR / script), cwd=NEON_DIR,
        env={**os.environ, "GATEWAY_SQL_URL": f"{api.base}/sql", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


async def sql(api: Api, body: Any, key: str | None = KEY_A, **headers: str) -> Any:
    r = await api.request("POST", "/sql", key=key, json=body, headers=headers)
    check_response("/sql", "POST", r.status, r.headers, r.body, r.headers.get("Content-Type"))
    return r


# -- the real driver --------------------------------------------------------------------------

async def test_neon_driver(neon_api: Api, admin_db: asyncpg.Connection) -> None:
    marker = f"neon-{uuid.uuid4()}"
    out = await node("driver.mjs", neon_api, GATEWAY_TOKEN_A=KEY_A, GATEWAY_TOKEN_B=KEY_B, MARKER=marker)
    # a select, every value parsed by the driver from the text the gateway sent
    assert out["select"] == [{"one": 1, "two": "x", "f": 1.5, "b": True, "arr": [1, 2], "j": {"a": [1, None]},
                              "big": "12345678901234", "num": "1.50", "nothing": None,
                              "at": "2024-01-02T03:04:05.500Z", "bytes": [1, 2]}]
    # parameters: numbers, an array and an object, as the driver sends them
    assert out["params"] == [{"next": 42, "t": "hello", "arr": [1, 2, 3], "j": {"k": "v"}}]
    assert out["fullResults"] == {"rows": [["x"]], "fields": [["t", 25]], "command": "SELECT", "rowCount": 1}
    assert out["seeded"] == [{"event_type": "a-1"}]
    # a batch is one transaction
    assert out["batch"] == [[{"event_type": marker, "data": {"n": 1}}], [{"event_type": marker, "data": {"n": 2}}],
                            [{"n": 2, "total": 3}]]
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1 AND tenant_id = $2",
                                   marker, uuid.UUID(TENANT_A)) == 2
    # ... all or nothing
    assert out["rollback"] == {"name": "NeonDbError", "message": "division by zero", "code": "22012",
                               "severity": "ERROR"}
    assert out["afterRollback"] == [{"n": 0}]
    # errors as the driver reads them: SQLSTATE in `code`, never PostgreSQL's DETAIL
    assert out["error"] == {"name": "NeonDbError", "message": 'relation "no_such_table" does not exist',
                            "code": "42P01", "severity": "ERROR"}
    assert out["conflict"]["code"] == "23505" and "detail" not in out["conflict"]
    assert "00000000-0000-4000-8000-000000000001" not in json.dumps(out["conflict"])
    assert out["rejected"] == {"name": "NeonDbError", "message": "SET/RESET is not allowed", "code": "",
                               "severity": "ERROR"}
    assert out["unauthenticated"]["message"] == "missing or invalid credentials"
    # tenant isolation: each key sees its own tenant's rows only
    assert out["tenantA"] == [{"tenant": TENANT_A}]
    assert out["tenantB"] == [{"tenant": TENANT_B}]
    assert out["markerSeenByB"] == [{"n": 0}]


async def test_drizzle_neon_http(neon_api: Api, admin_db: asyncpg.Connection) -> None:
    marker = f"drizzle-{uuid.uuid4()}"
    out = await node("drizzle.mjs", neon_api, GATEWAY_TOKEN_A=KEY_A, MARKER=marker)
    [inserted] = out["inserted"]
    assert inserted["eventType"] == marker and inserted["data"] == {"n": 7, "tags": ["x", "y"]}
    assert inserted["tenantId"] == TENANT_A
    [selected] = out["selected"]
    assert selected["id"] == inserted["id"] and selected["createdAtIsDate"] is True
    assert selected["data"] == {"n": 7, "tags": ["x", "y"]} and selected["metadata"] is None
    row = await admin_db.fetchrow("SELECT tenant_id, data FROM events WHERE id = $1", uuid.UUID(inserted["id"]))
    assert str(row["tenant_id"]) == TENANT_A and json.loads(row["data"]) == {"n": 7, "tags": ["x", "y"]}


# -- the protocol -----------------------------------------------------------------------------

_TEXT_CASES = [
    "1.5::float4", "0.1::float4", "1e15::float8", "123456789012345::float8", "1e-5::float8", "'NaN'::float8",
    "'-Infinity'::float4", "-0.0::float8", "1234567.0::float4", "0.000012345::float4", "3.14159265358979::float8",
    "0.0000000000::numeric", "'NaN'::numeric", "12.3400::numeric", "-5::int2", "9223372036854775807::int8",
    "true", "false", "'a b'::text", "''::text", "'\\x00ff10'::bytea", "'\\x'::bytea",
    "'2024-02-29 23:59:59.000001+00'::timestamptz", "'2024-02-29 23:59:59.5'::timestamp", "'0044-03-15'::date",
    "'infinity'::timestamptz", "'-infinity'::date", "'13:14:15.25'::time", "'13:14:15+05:30'::timetz",
    "'13:14:15-08'::timetz", "'1 year 2 mons 3 days 04:05:06.5'::interval", "'-1 day'::interval",
    "'{\"b\": [1, 2.5, null], \"a\": \"x\"}'::jsonb", "'{\"b\":  1}'::json",
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
    "ARRAY['a b', '', NULL, 'NULL', 'q\"uo\\te', '{x}', 'plain']", "ARRAY[[1, 2], [3, NULL]]",
    "ARRAY[1.5::float4, 0.1::float4]", "ARRAY['\\x01'::bytea]", "ARRAY['{\"a\": 1}'::jsonb]",
    "ARRAY['2024-01-01 00:00:00+00'::timestamptz]", "ARRAY[]::int[]", "ROW(1, 'a b', NULL, '', 'x\"y')",
    "'[1,5)'::int4range", "'empty'::int4range", "'(,3]'::int8range", "'[2024-01-01,2024-02-01)'::daterange",
    "B'10110'", "'10.1.2.3'::inet", "'10.0.0.0/8'::cidr", "'happy'::mood", "ARRAY['sad'::mood]",
    "'08:00:2b:01:02:03'::macaddr", "'(1.5,-2)'::point", "'((3,4),(1,2))'::box", "'[(1,2),(3,4)]'::lseg",
    "'{1,2,3}'::line", "'<(1,2),3>'::circle", "'((1,2),(3,4),(5,6))'::polygon", "'[(1,2),(3,4)]'::path",
    "'((1,2),(3,4))'::path", "ROW(ROW(1, 'x'), ARRAY[1, 2])",
    "'3.4028235e38'::float4", "'-3.4028234e38'::float4",  # fewer digits round past float4's maximum
    "'1 2'::int2vector", "''::int2vector", "'26 27'::oidvector", "ARRAY['1 2'::int2vector]",
    "'{[1,3), [5,7)}'::int4multirange", "'{}'::int4multirange", "ARRAY['{[1,2)}'::int4multirange]",
    "ARRAY['((1,1),(0,0))'::box, '((3,3),(2,2))'::box]", "'16/B374D848'::pg_lsn",
    "'a'::\"char\"", "''::\"char\"", "'\\351'::\"char\"",
]


async def test_raw_text_is_postgresqls_own_text(neon_api: Api, admin_db: asyncpg.Connection) -> None:
    """Every value comes out as the text PostgreSQL's output function prints for it."""
    columns = ", ".join(f"{expr} AS c{i}" for i, expr in enumerate(_TEXT_CASES))
    r = await sql(neon_api, {"query": f"SELECT {columns}"},
                  **{"Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"})
    assert r.status == 200, r.body
    [row] = r.body["rows"]
    # format('%s', x) is x through its type's output function; timestamptz on a UTC session.
    async with admin_db.transaction():
        await admin_db.execute("SET LOCAL TimeZone = 'UTC'")
        formatted = ", ".join(f"format('%s', c{i})" for i in range(len(_TEXT_CASES)))
        want = await admin_db.fetchrow(f"SELECT {formatted} FROM (SELECT {columns}) s")
    mismatches = [(_TEXT_CASES[i], got, want[i]) for i, got in enumerate(row) if got != want[i]]
    assert not mismatches
    assert [f["dataTypeID"] for f in r.body["fields"]][:3] == [700, 700, 701]


async def test_json_output_and_row_modes(neon_api: Api) -> None:
    """Without raw text, values convert as Neon converts them; arrayMode per query wins over the header."""
    query = ("SELECT true AS b, 7::int2 AS s, 8 AS i, 9::int8 AS big, 1.25::float8 AS f, 'NaN'::float4 AS nan, "
             "0.1::float4 AS f4, 2.50::numeric AS n, '{\"a\": [1]}'::jsonb AS j, ARRAY[1, NULL] AS arr, "
             "ARRAY[true] AS barr, 'x'::text AS t, '2024-01-02'::date AS d, NULL::int AS z")
    r = await sql(neon_api, {"query": query})
    assert r.body["rowAsArray"] is False and r.body["command"] == "SELECT" and r.body["rowCount"] == 1
    assert r.body["rows"] == [{"b": True, "s": 7, "i": 8, "big": "9", "f": 1.25, "nan": "NaN", "f4": 0.1, "n": "2.50",
                               "j": {"a": [1]}, "arr": [1, None], "barr": [True], "t": "x", "d": "2024-01-02",
                               "z": None}]
    r = await sql(neon_api, {"queries": [{"query": "SELECT 1 AS a, 2 AS b"},
                                         {"query": "SELECT 1 AS a, 2 AS b", "arrayMode": False}]},
                  **{"Neon-Array-Mode": "true"})
    assert [res["rows"] for res in r.body["results"]] == [[[1, 2]], [{"a": 1, "b": 2}]]
    assert [res["rowAsArray"] for res in r.body["results"]] == [True, False]


async def test_text_parameters(neon_api: Api) -> None:
    """Parameters are PostgreSQL text, read as the parameter's type reads text; other JSON becomes text."""
    r = await sql(neon_api, {"query": "SELECT $1::bool AS b, $2::bytea AS by, $3::timestamptz AS ts, "
                                      "$4::text[] AS ta, $5::int AS i, $6::jsonb AS j, $7::numeric AS n, "
                                      "$8::int[] AS ia, $9::date AS d, $10::uuid AS u, $11::text AS nothing, "
                                      "$12::jsonb AS jo, $13::timetz AS tz, $14::float8 AS f",
                             "params": ["yes", "\\x00ff", "2024-01-02 03:04:05+02", '{"a b","q\\"x",NULL}', 42,
                                        "[1, 2]", 1.5, [1, None, 3], "2024-02-29", TENANT_A, None, {"k": [True]},
                                        "10:00:00+01", "Infinity"]},
                  **{"Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"})
    assert r.status == 200, r.body
    assert r.body["rows"] == [["t", "\\x00ff", "2024-01-02 01:04:05+00", '{"a b","q\\"x",NULL}', "42", "[1, 2]",
                               "1.5", "{1,NULL,3}", "2024-02-29", TENANT_A, None, '{"k": [true]}', "10:00:00+01",
                               "Infinity"]]
    for value, sqlstate in (("forty-two", "22P02"), ("{1,", "22P02")):
        r = await sql(neon_api, {"query": "SELECT $1::int[] AS a", "params": [value]})
        assert (r.status, r.body["code"]) == (400, sqlstate), r.body
    r = await sql(neon_api, {"query": "SELECT $1::jsonb", "params": ["{not json"]})
    assert (r.status, r.body["code"]) == (400, "22P02")
    r = await sql(neon_api, {"query": "SELECT $1::int", "params": []})
    assert (r.status, r.body["code"], r.body["error"]["code"]) == (400, "08P01", "invalid_request")


async def test_batch_transaction_headers(neon_api: Api) -> None:
    settings = {"queries": [{"query": "SELECT current_setting('transaction_isolation') AS iso, "
                                      "current_setting('transaction_read_only') AS ro, "
                                      "current_setting('transaction_deferrable') AS d"}]}
    r = await sql(neon_api, settings, **{"Neon-Batch-Isolation-Level": "RepeatableRead",
                                         "Neon-Batch-Read-Only": "true", "Neon-Batch-Deferrable": "true"})
    assert r.status == 200, r.body
    assert r.body["results"][0]["rows"] == [{"iso": "repeatable read", "ro": "on", "d": "on"}]
    assert (r.headers["Neon-Batch-Isolation-Level"], r.headers["Neon-Batch-Read-Only"],
            r.headers["Neon-Batch-Deferrable"]) == ("RepeatableRead", "true", "true")
    r = await sql(neon_api, settings, **{"Neon-Batch-Isolation-Level": "ReadUncommitted"})
    assert r.body["results"][0]["rows"] == [{"iso": "read committed", "ro": "off", "d": "off"}]
    r = await sql(neon_api, settings, **{"Neon-Batch-Read-Only": "yes"})  # only exactly "true" is on
    assert r.body["results"][0]["rows"][0]["ro"] == "off"
    r = await sql(neon_api, settings, **{"Neon-Batch-Isolation-Level": "Chaos"})
    assert (r.status, r.body["error"]["code"]) == (400, "invalid_request")
    r = await sql(neon_api, {"queries": [{"query": "INSERT INTO events (event_type, data) VALUES ('ro', '{}')"}]},
                  **{"Neon-Batch-Read-Only": "true"})
    assert (r.status, r.body["code"]) == (400, "25006")
    # the batch headers shape batches only, as in Neon
    r = await sql(neon_api, {"query": settings["queries"][0]["query"]}, **{"Neon-Batch-Read-Only": "true"})
    assert r.body["rows"][0]["ro"] == "off" and "Neon-Batch-Read-Only" not in r.headers


async def test_results_over_max_rows_fail_instead_of_being_cut(neon_api: Api, admin_db: asyncpg.Connection) -> None:
    # tenant B's max_rows is 500 (fix_gateway): the driver could not tell a cut result from a whole one
    r = await sql(neon_api, {"query": "SELECT g FROM generate_series(1, 501) g"}, key=KEY_B)
    assert (r.status, r.body["code"]) == (400, "54000") and "max_rows" in r.body["message"]
    marker = f"neon-rows-{uuid.uuid4()}"
    r = await sql(neon_api, {"query": "INSERT INTO events (event_type, data) SELECT $1, '{}' "
                                      "FROM generate_series(1, 501) RETURNING id", "params": [marker]}, key=KEY_B)
    assert (r.status, r.body["code"]) == (400, "54000")
    assert await admin_db.fetchval("SELECT count(*) FROM events WHERE event_type = $1", marker) == 0
    r = await sql(neon_api, {"query": "SELECT g FROM generate_series(1, 500) g"}, key=KEY_B)
    assert r.status == 200 and r.body["rowCount"] == 500


async def test_same_tenancy_guard_and_metrics_as_v1(neon_api: Api) -> None:
    query = {"query": "SELECT current_setting('app.tenant_id') AS t"}
    r = await sql(neon_api, query, key=KEY_AC, **{"X-Tenant-Id": TENANT_C})
    assert r.body["rows"] == [{"t": TENANT_C}]
    r = await sql(neon_api, query, key=KEY_AC)
    assert (r.status, r.body["error"]["code"]) == (400, "tenant_required")
    r = await sql(neon_api, query, key=KEY_A, **{"X-Tenant-Id": TENANT_B})
    assert (r.status, r.body["error"]["code"]) == (400, "tenant_forbidden")
    r = await sql(neon_api, {"query": "SELECT set_config('app.tenant_id', $1, true)", "params": [TENANT_B]})
    assert (r.status, r.body["error"]["code"]) == (400, "statement_rejected")
    r = await sql(neon_api, {"query": "SELECT 1", "fullResults": True})
    assert (r.status, r.body["error"]["code"]) == (400, "invalid_request")
    # the Neon-Connection-String credentials authenticate nothing
    r = await sql(neon_api, query, key=None,
                  **{"Neon-Connection-String": "postgresql://app:secret@127.0.0.1:5432/appdb"})
    assert (r.status, r.body["error"]["code"]) == (400, "unauthenticated")
    metrics = await neon_api.request("GET", "/metrics", key=None, admin=True)
    assert 'endpoint="/sql"' in str(metrics.body)
