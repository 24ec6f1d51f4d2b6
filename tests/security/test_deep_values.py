"""Deeply nested values (issue 18 finding 8): a parameter nested hundreds or thousands of
levels once ended in a RecursionError and a 500.  Every shape is now refused with 400
``invalid_request`` naming the limit (encode.ARRAY_MAX_DIMENSIONS for arrays,
encode.JSON_MAX_DEPTH for JSON), or, where PostgreSQL itself takes the value and returns
it, answered correctly; and the gateway goes on serving other tenants.

Bodies are written as JSON text by hand: neither the standard library's encoder nor
orjson's will serialise values this deep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import pytest_asyncio

from proxy.pg.encode import ARRAY_MAX_DIMENSIONS, JSON_MAX_DEPTH

from ..fix_gateway import KEY_A, KEY_B, SEED, TENANT_B, Api, make_settings, running_gateway
from ..fix_stack import Stack


def deep_list(levels: int) -> str:
    return "[" * levels + "1" + "]" * levels


def deep_object(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def text(value: str) -> str:
    """A JSON string holding ``value``."""
    return orjson.dumps(value).decode()


def obj(**fields: str) -> str:
    """A JSON object from its fields' JSON texts."""
    return "{" + ", ".join(f"{text(k)}: {v}" for k, v in fields.items()) + "}"


@pytest_asyncio.fixture(scope="module")
async def api(stack: Stack, admin_db: Any) -> AsyncIterator[Api]:
    async with running_gateway(make_settings(stack, server={"neon_sql_endpoint": True})) as a:
        yield a


async def post(api: Api, path: str, body: str, key: str = KEY_A, raw_text: bool = False) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if raw_text:
        headers["Neon-Raw-Text-Output"] = "true"
    async with api.session.post(api.base + path, data=body.encode(), headers=headers) as resp:
        return resp.status, await resp.read()


def error(raw: bytes) -> dict[str, Any]:
    body = orjson.loads(raw)
    err: dict[str, Any] = body["error"]
    return err


async def assert_tenant_b_served(api: Api) -> None:
    r = await api.query("SELECT event_type FROM events WHERE event_type LIKE 'b-%' ORDER BY 1", key=KEY_B)
    assert r.status == 200, r.body
    assert [row["event_type"] for row in r.body["rows"]] == SEED[TENANT_B]


@pytest.mark.parametrize(("sql", "param", "message"), [
    # past JSON_MAX_DEPTH the body is refused as it is read, before admission and the database
    ("SELECT $1::int[]", deep_list(1000), f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels"),
    ("SELECT $1::int[]", deep_list(ARRAY_MAX_DIMENSIONS + 1),
     f"parameter $1 (int4[]): nested deeper than {ARRAY_MAX_DIMENSIONS} levels"),
    ("SELECT $1::text[]", "[" * 900 + '"x"' + "]" * 900, f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels"),
    ("SELECT $1::jsonb", deep_list(1000), f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels"),
    ("SELECT $1::jsonb", deep_object(1000), f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels"),
    ("SELECT $1::jsonb", deep_object(JSON_MAX_DEPTH + 1), f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels"),
    ("SELECT $1::json", '{"a": [1, ' + deep_object(300) + "]}",
     f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels"),
    ("SELECT $1::jsonb[]", "[" + deep_object(300) + "]", f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels"),
], ids=["int[]-1000", "int[]-7", "text[]-900", "jsonb-list-1000", "jsonb-object-1000", "jsonb-object-129",
        "json-mixed-300", "jsonb[]-element-300"])
async def test_deep_parameter_is_refused(api: Api, sql: str, param: str, message: str) -> None:
    status, raw = await post(api, "/v1/query", obj(sql=text(sql), params=f"[{param}]"))
    assert status == 400, raw
    err = error(raw)
    assert err["code"] == "invalid_request"
    assert err["message"].startswith(message), err["message"]
    await assert_tenant_b_served(api)


async def test_deep_parameter_in_a_transaction_is_refused(api: Api) -> None:
    statements = [obj(sql=text("SELECT 1")), obj(sql=text("SELECT $1::jsonb"), params=f"[{deep_object(1000)}]")]
    body = obj(statements="[" + ", ".join(statements) + "]")
    status, raw = await post(api, "/v1/transaction", body)
    assert status == 400, raw
    assert error(raw)["message"] == f"statements[1].params[0] is nested deeper than {JSON_MAX_DEPTH} levels"
    await assert_tenant_b_served(api)


async def test_values_at_the_limits_are_taken(api: Api) -> None:
    status, raw = await post(api, "/v1/query", obj(sql=text("SELECT $1::int[] AS a"),
                                                      params=f"[{deep_list(ARRAY_MAX_DIMENSIONS)}]"))
    assert status == 200, raw
    assert orjson.loads(raw)["rows"] == [{"a": orjson.loads(deep_list(ARRAY_MAX_DIMENSIONS))}]
    status, raw = await post(api, "/v1/query", obj(sql=text("SELECT $1::jsonb AS j"),
                                                      params=f"[{deep_object(JSON_MAX_DEPTH)}]"))
    assert status == 200, raw
    assert orjson.loads(raw)["rows"] == [{"j": orjson.loads(deep_object(JSON_MAX_DEPTH))}]


@pytest.mark.parametrize(("query", "param", "message", "sqlstate"), [
    ("SELECT $1::int[]", text("{" * 3000 + "1" + "}" * 3000),
     f"parameter $1 (int4[]): number of array dimensions ({ARRAY_MAX_DIMENSIONS + 1}) exceeds the maximum "
     f"allowed ({ARRAY_MAX_DIMENSIONS})", "54000"),
    ("SELECT $1::int[]", deep_list(1000), f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels", None),
    ("SELECT $1::int[]", deep_list(ARRAY_MAX_DIMENSIONS + 1),
     f"parameter $1 (int4[]): number of array dimensions ({ARRAY_MAX_DIMENSIONS + 1}) exceeds the maximum "
     f"allowed ({ARRAY_MAX_DIMENSIONS})", "54000"),
    ("SELECT $1::jsonb", deep_object(1000), f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels", None),
    ("SELECT $1::jsonb", deep_object(300), f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels", None),
    ("SELECT $1::text", "[" + deep_object(JSON_MAX_DEPTH) + "]",
     f"params[0] is nested deeper than {JSON_MAX_DEPTH} levels", None),
], ids=["text-array-3000", "json-list-1000", "json-list-7", "json-object-1000", "json-object-300",
        "json-list-of-object-129"])
async def test_neon_endpoint_deep_value_is_refused(api: Api, query: str, param: str, message: str,
                                                   sqlstate: str | None) -> None:
    status, raw = await post(api, "/sql", obj(query=text(query), params=f"[{param}]"))
    assert status == 400, raw
    body = orjson.loads(raw)
    assert (body["message"], body["code"]) == (message, sqlstate or "")
    assert body["error"]["code"] == "invalid_request"
    await assert_tenant_b_served(api)


async def test_neon_batch_names_the_query(api: Api) -> None:
    queries = [obj(query=text("SELECT 1")), obj(query=text("SELECT $1::jsonb"), params=f"[1, {deep_list(1000)}]")]
    body = obj(queries="[" + ", ".join(queries) + "]")
    status, raw = await post(api, "/sql", body)
    assert status == 400, raw
    assert orjson.loads(raw)["message"] == f"queries[1].params[1] is nested deeper than {JSON_MAX_DEPTH} levels"


async def test_neon_text_values_postgresql_reads(api: Api) -> None:
    """JSON text is PostgreSQL's to read: 3,000 levels it takes (and the answer is the
    value); far deeper it refuses with its own error, not the gateway's 500."""
    deep = "[" * 3000 + "]" * 3000
    status, raw = await post(api, "/sql", obj(query=text("SELECT $1::jsonb AS j"), params=f"[{text(deep)}]"))
    assert status == 200, raw
    assert b'"j":' + deep.encode() in raw
    deeper = "[" * 100_000 + "]" * 100_000
    status, raw = await post(api, "/sql", obj(query=text("SELECT $1::jsonb AS j"), params=f"[{text(deeper)}]"))
    assert status == 400, raw
    assert orjson.loads(raw)["code"] == "54001"  # stack depth limit exceeded
    # a number past 64 bits, which orjson cannot write, still becomes its text
    status, raw = await post(api, "/sql", obj(query=text("SELECT $1::text AS t"),
                                          params="[123456789012345678901234567890]"))
    assert status == 200, raw
    assert orjson.loads(raw)["rows"] == [{"t": "123456789012345678901234567890"}]
    await assert_tenant_b_served(api)


@pytest.mark.parametrize("path", ["/v1/query", "/sql"])
async def test_deep_jsonb_from_the_database(api: Api, path: str) -> None:
    """The database's jsonb is passed through as its own text, however deep (PostgreSQL
    bounds it by max_stack_depth): the answer is the value, never a 500."""
    field = "sql" if path == "/v1/query" else "query"
    for value in ("[" * 5000 + "]" * 5000, '{"a": ' * 5000 + "1" + "}" * 5000):
        sql = f"SELECT '{value}'::jsonb AS j"
        status, raw = await post(api, path, obj(**{field: text(sql)}))
        assert status == 200, raw[:300]
        assert b'"j":' + value.encode() in raw
        if path == "/sql":  # as PostgreSQL text, what Neon's driver asks for
            status, raw = await post(api, path, obj(**{field: text(sql)}), raw_text=True)
            assert status == 200, raw[:300]
            assert b'"j":' + text(value).encode() in raw
    sql = "SELECT (repeat('[', 100000) || repeat(']', 100000))::jsonb AS j"
    status, raw = await post(api, path, obj(**{field: text(sql)}))
    assert status in (400, 422), raw
    assert error(raw)["sqlstate"] == "54001"
    status, raw = await post(api, path, obj(**{field: text(sql.replace("100000", "5000"))}), key=KEY_B)
    assert status == 200, raw[:300]
    await assert_tenant_b_served(api)
