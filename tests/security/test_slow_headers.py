"""Slow request heads (issue 18 finding 9, slowloris): a connection that has not delivered
a complete request head within ``server.header_timeout_s`` of its opening, or of the first
byte of its next request, is closed (proxy/http/head_deadline.py), on both ports; the wait
between two requests on a keep-alive connection is not counted, and a slow body is still
the body timeout's (408).  Raw sockets throughout: an HTTP client sends whole heads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from proxy.config import ConfigError

from ..fix_gateway import KEY_A, KEY_B, SEED, TENANT_B, Api, make_settings, running_gateway
from ..fix_stack import Stack

TIMEOUT_S = 1.0
MARGIN_S = 3.0  # a loaded test machine may be slow to run the timer and to report the close
PARTIAL = b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Slow: "
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest_asyncio.fixture(scope="module")
async def api(stack: Stack, admin_db: Any) -> AsyncIterator[Api]:
    settings = make_settings(stack, server={"header_timeout_s": TIMEOUT_S, "body_timeout_s": 3})
    async with running_gateway(settings) as a:
        yield a


async def connect(port: int, first: bytes = b"") -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
        await writer.drain()
    return reader, writer


async def closed_after(conn: Conn, started: float) -> float:
    """Wait for the server to close ``conn`` (EOF or reset, with nothing sent first);
    seconds since ``started``."""
    reader, writer = conn
    try:
        data = await asyncio.wait_for(reader.read(1), TIMEOUT_S + MARGIN_S)
    except ConnectionError:
        data = b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert data == b"", f"the server answered instead of closing: {data!r}"
    return time.monotonic() - started


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), 10)


async def assert_tenant_b_served(api: Api) -> None:
    r = await api.query("SELECT event_type FROM events WHERE event_type LIKE 'b-%' ORDER BY 1", key=KEY_B)
    assert r.status == 200, r.body
    assert [row["event_type"] for row in r.body["rows"]] == SEED[TENANT_B]


async def test_partial_heads_are_closed_while_others_are_served(api: Api) -> None:
    started = time.monotonic()
    conns = list(await asyncio.gather(*(connect(api.running.port, PARTIAL) for _ in range(100))))
    conns += await asyncio.gather(*(connect(api.running.port) for _ in range(10)))  # not a byte
    conns += await asyncio.gather(*(connect(api.running.admin_port, PARTIAL) for _ in range(10)))
    waits = [asyncio.create_task(closed_after(c, started)) for c in conns]
    await assert_tenant_b_served(api)  # meanwhile, an authenticated request is answered
    times = await asyncio.gather(*waits)
    assert min(times) >= TIMEOUT_S * 0.9, min(times)
    assert max(times) <= TIMEOUT_S + MARGIN_S, max(times)
    await assert_tenant_b_served(api)


async def test_a_trickled_head_is_closed_at_its_deadline(api: Api) -> None:
    """Every byte on time does not move the deadline: it counts from the first."""
    reader, writer = await connect(api.running.port, b"G")
    started = time.monotonic()

    async def trickle() -> None:
        for byte in b"ET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa":
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    trickler = asyncio.create_task(trickle())
    try:
        elapsed = await closed_after((reader, writer), started)
    finally:
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickler
    assert TIMEOUT_S * 0.9 <= elapsed <= TIMEOUT_S + MARGIN_S


async def test_next_head_on_a_keep_alive_connection(api: Api) -> None:
    """The idle time between two requests is keep-alive's: a complete request after a
    pause longer than the header timeout is answered; a partial one then is closed a
    header timeout after its first byte."""
    reader, writer = await connect(api.running.port, HEALTH)
    assert (await response(reader))[0] == 200
    await asyncio.sleep(TIMEOUT_S * 2.5)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # a head in two parts, well within the timeout
    await writer.drain()
    await asyncio.sleep(TIMEOUT_S / 3)
    writer.write(b"Host: x\r\n\r\n")
    assert (await response(reader))[0] == 200
    await asyncio.sleep(TIMEOUT_S * 1.5)
    writer.write(PARTIAL)
    await writer.drain()
    elapsed = await closed_after((reader, writer), time.monotonic())
    assert TIMEOUT_S * 0.9 <= elapsed <= TIMEOUT_S + MARGIN_S


async def test_a_head_begun_behind_a_request_is_timed(api: Api) -> None:
    """A partial head in the same packet as a complete request (pipelined) is timed from
    that packet (behind more requests than aiohttp queues, too)."""
    for first in (HEALTH + b"GET /healthz HT", HEALTH * 3 + PARTIAL, HEALTH * 40 + PARTIAL):
        started = time.monotonic()
        reader, writer = await connect(api.running.port, first)
        for _ in range(first.count(b"\r\n\r\n")):
            assert (await response(reader))[0] == 200
        elapsed = await closed_after((reader, writer), started)
        assert TIMEOUT_S * 0.9 <= elapsed <= TIMEOUT_S + MARGIN_S


async def test_a_request_whose_body_follows_is_not_cut_by_the_header_timeout(api: Api) -> None:
    """A complete request whose packet ends where it does is answered however long the
    connection then stays idle, and a body sent after its head is waited for."""
    body = b'{"sql": "SELECT 1 AS one"}'
    head = (b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY_A}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    reader, writer = await connect(api.running.port, head)
    await asyncio.sleep(TIMEOUT_S * 1.5)  # the body arrives later than a head may: body_timeout_s governs it
    writer.write(body)
    status, answer = await response(reader)
    assert status == 200, answer
    await asyncio.sleep(TIMEOUT_S * 2)
    writer.write(head + body)
    assert (await response(reader))[0] == 200
    writer.close()


async def test_a_slow_body_is_still_the_body_timeouts(api: Api) -> None:
    """A body trickled past the header timeout is cut off by body_timeout_s (3 s here) with
    408 request_timeout, not closed at the header timeout."""
    head = (b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY_A}\r\nContent-Length: 200\r\n\r\n".encode() + b'{"sql"')
    reader, writer = await connect(api.running.port, head)
    started = time.monotonic()

    async def trickle() -> None:
        for _ in range(40):
            await asyncio.sleep(0.25)
            writer.write(b" ")
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    trickler = asyncio.create_task(trickle())
    try:
        status, answer = await response(reader)
    finally:
        trickler.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await trickler
    assert status == 408 and b"request_timeout" in answer, answer
    assert 2.5 <= time.monotonic() - started <= 3 + MARGIN_S
    writer.close()


@pytest.mark.parametrize("value", [0, -1, "soon", True])
def test_header_timeout_is_checked_at_load(stack: Stack, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(stack, server={"header_timeout_s": value})
    assert info.value.problems == ["server.header_timeout_s: must be a number >= 0.1"]


async def test_an_idle_keep_alive_connection_is_closed(stack: Stack, admin_db: Any) -> None:
    """One complete request per connection, then silence: closed after keepalive_timeout_s
    (aiohttp's own default kept it an hour)."""
    settings = make_settings(stack, server={"keepalive_timeout_s": TIMEOUT_S})
    async with running_gateway(settings) as a:
        started = time.monotonic()
        reader, writer = await connect(a.running.port, HEALTH)
        assert (await response(reader))[0] == 200
        elapsed = await closed_after((reader, writer), started)
        assert TIMEOUT_S * 0.9 <= elapsed <= TIMEOUT_S + MARGIN_S
