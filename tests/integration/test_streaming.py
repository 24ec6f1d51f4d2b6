"""Large results stream from a server-side cursor as chunked JSON, within max_rows and
max_response_bytes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
from multidict import CIMultiDict

from ..fix_gateway import KEY_B, TENANT_A


async def _get(api: Any, sql: str, **body: Any) -> tuple[int, CIMultiDict[str], bytes]:
    async with api.session.post(api.base + "/v1/query", json={"sql": sql, **body},
                                headers={"Authorization": "Bearer test-key-a"}) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def test_large_result_streams_with_the_same_shape(gateway_with: Any) -> None:
    overrides = {"server": {"stream_threshold_rows": 100, "stream_batch_rows": 250},
                 "tenants": {TENANT_A: {"max_rows": 100_000}}}
    async with gateway_with(**overrides) as api:
        status, headers, raw = await _get(api, "SELECT g, 'row ' || g AS label FROM generate_series(1, 5000) g")
        assert status == 200 and headers.get("Transfer-Encoding") == "chunked"
        assert headers["X-Request-Id"] and "db;dur=" in headers["Server-Timing"]
        body = orjson.loads(raw)
        assert body["columns"] == [{"name": "g", "type": "int4"}, {"name": "label", "type": "text"}]
        assert body["row_count"] == 5000 and body["truncated"] is False and body["command"] == "SELECT"
        assert [r["g"] for r in body["rows"]] == list(range(1, 5001))
        # small results are not streamed
        status, headers, raw = await _get(api, "SELECT g FROM generate_series(1, 50) g")
        assert "Transfer-Encoding" not in headers and orjson.loads(raw)["row_count"] == 50
        # max_rows still applies, in array format too
        status, _, raw = await _get(api, "SELECT g FROM generate_series(1, 5000) g", max_rows=1234,
                                    row_format="array")
        body = orjson.loads(raw)
        assert body["row_count"] == 1234 and body["truncated"] is True and body["rows"][-1] == [1234]
        # exactly max_rows rows: not truncated
        _, _, raw = await _get(api, "SELECT g FROM generate_series(1, 300) g", max_rows=300)
        assert orjson.loads(raw)["truncated"] is False


async def test_max_response_bytes_stops_the_stream(gateway_with: Any) -> None:
    overrides = {"server": {"stream_threshold_rows": 10, "stream_batch_rows": 100},
                 "tenants": {TENANT_A: {"max_rows": 100_000, "max_response_bytes": 20_000}}}
    async with gateway_with(**overrides) as api:
        status, _, raw = await _get(api, "SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 10000) g")
        body = orjson.loads(raw)
        assert status == 200 and body["truncated"] is True
        assert 0 < body["row_count"] == len(body["rows"]) < 10000
        assert len(raw) < 20_000 + 500
        r = await api.query("SELECT 1 AS ok", key=KEY_B)
        assert r.status == 200


async def test_error_mid_stream_cuts_the_connection(gateway_with: Any) -> None:
    overrides = {"server": {"stream_threshold_rows": 10, "stream_batch_rows": 10},
                 "tenants": {TENANT_A: {"max_rows": 100_000}}}
    async with gateway_with(**overrides) as api:
        sql = "SELECT 1 / (50 - g) AS x FROM generate_series(1, 100) g"  # division by zero at row 50
        try:
            status, _, raw = await _get(api, sql)
        except Exception as exc:  # aiohttp reports the cut connection as a payload error
            assert "payload" in type(exc).__name__.lower() or "disconnect" in str(exc).lower(), exc
        else:
            assert status == 200
            try:
                orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass
            else:
                raise AssertionError("a failed stream must not look like a complete result")
        assert (await api.query("SELECT 1")).status == 200


async def _raw_post(api: Any, body: dict[str, Any]) -> bytes:
    """The bytes on the wire, up to the server closing the connection (10 s at most)."""
    reader, writer = await api.open_raw_query(body)
    try:
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


async def test_a_value_that_cannot_be_returned_mid_stream_cuts_the_connection(gateway_with: Any) -> None:
    """A decode error (or any other) after the 200 went out: the connection is cut, and no
    second response is written into the chunked body."""
    overrides = {"server": {"stream_threshold_rows": 10, "stream_batch_rows": 10},
                 "tenants": {TENANT_A: {"max_rows": 100_000}}}
    async with gateway_with(**overrides) as api:
        for bad in ("'5874897-12-31'::date", "'24:00:00'::time"):
            sql = f"SELECT g, CASE WHEN g = 50 THEN {bad} END AS v FROM generate_series(1, 100) g"
            wire = await _raw_post(api, {"sql": sql})
            assert wire.startswith(b"HTTP/1.1 200"), wire[:200]
            assert wire.count(b"HTTP/1.1") == 1, "a second response was written into the body"
            assert not wire.endswith(b"0\r\n\r\n"), "the body must not look complete"
        assert (await api.query("SELECT 1")).status == 200


async def test_a_client_that_stops_reading_is_cut_off_and_frees_its_connection(gateway_with: Any,
                                                                              admin_db: Any) -> None:
    """A streaming client that reads the headers and then nothing holds a pooled
    connection in its transaction: server.stream_write_timeout_s cuts it off.  (The test
    stack's PgBouncer has one server connection, so everyone else would wait on it.)"""
    overrides = {"server": {"stream_threshold_rows": 10, "stream_batch_rows": 500, "stream_write_timeout_s": 0.5},
                 "tenants": {TENANT_A: {"max_rows": 10_000_000, "max_response_bytes": 1 << 40}}}
    async with gateway_with(**overrides) as api:
        reader, writer = await api.open_raw_query(
            {"sql": "SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 1000000) g"})
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            reader._transport.pause_reading()  # and now read nothing more  # type: ignore[attr-defined]
            r = await asyncio.wait_for(api.query("SELECT 1 AS ok", key=KEY_B), 10)
            assert r.status == 200 and r.body["rows"] == [{"ok": 1}], r.body
            stuck = await admin_db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                            "AND state = 'idle in transaction'")
            assert stuck == 0
            text = (await api.request("GET", "/metrics", key=None, admin=True)).body
            assert 'code="499"' in text
        finally:
            writer.close()
