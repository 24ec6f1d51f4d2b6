"""The streaming sink on a real aiohttp server: a client that is gone surfaces as
client_closed_request, never as an OSError (which pg/classify.py would take for the database
failing, and a replica serving the read would be taken out of rotation)."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.errors import CLIENT_CLOSED, ApiError
from proxy.http.appkeys import REQUEST_ID, TRACE
from proxy.http.streaming import JsonRowStream
from proxy.observe.trace import RequestTrace
from proxy.pg.statement import Result


async def _serve(close_before_start: bool) -> list[Any]:
    seen: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        request[REQUEST_ID] = "test"
        request[TRACE] = RequestTrace(endpoint="/x")
        sink = JsonRowStream(request, "array", 1 << 30, 10, 10)
        try:
            if close_before_start:
                assert request.transport is not None
                request.transport.close()  # the client's connection is gone
            await sink.start([("g", "int4")])
            assert request.transport is not None
            request.transport.close()
            await sink.rows([(1,), (2,)])
        except ApiError as exc:
            seen.append(exc.kind)
        except Exception as exc:  # the test reports what leaked
            seen.append(exc)
        return sink.abort() if sink.response is not None else web.Response()

    app = web.Application()
    app.router.add_post("/x", handler)
    async with TestServer(app) as server, aiohttp.ClientSession() as http:
        try:
            async with http.post(server.make_url("/x")) as r:  # a GET would be retried
                await r.read()
        except aiohttp.ClientError:
            pass  # the cut connection
    return seen


async def test_a_write_to_a_client_that_is_gone_is_client_closed() -> None:
    assert await _serve(close_before_start=False) == [CLIENT_CLOSED]


async def test_a_client_gone_before_the_first_write_is_client_closed() -> None:
    assert await _serve(close_before_start=True) == [CLIENT_CLOSED]


async def test_finishing_a_stream_to_a_client_that_is_gone_is_client_closed() -> None:
    seen: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        request[REQUEST_ID] = "test"
        request[TRACE] = RequestTrace(endpoint="/x")
        sink = JsonRowStream(request, "array", 1 << 30, 10, 10)
        await sink.start([("g", "int4")])
        assert request.transport is not None
        request.transport.close()
        try:
            await sink.finish(Result(columns=[("g", "int4")], rows=[], row_count=0, command="SELECT", truncated=False))
        except ApiError as exc:
            seen.append(exc.kind)
        return sink.abort()

    app = web.Application()
    app.router.add_post("/x", handler)
    async with TestServer(app) as server, aiohttp.ClientSession() as http:
        try:
            async with http.post(server.make_url("/x")) as r:
                await r.read()
        except aiohttp.ClientError:
            pass
    assert seen == [CLIENT_CLOSED]
