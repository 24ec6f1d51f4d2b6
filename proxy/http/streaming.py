"""Large results as a chunked JSON response, written while the rows are still being read.

The body has the same shape as a whole /v1/query result, with `row_count` and
`truncated` after the rows (they are only known at the end).  Memory stays at one batch
of rows, whatever the result size; `max_rows` and the tenant's `max_response_bytes`
still apply (`"truncated": true` when either stops the stream).  A failure after the
first bytes were sent cannot change the status any more: the connection is closed, so
the client sees a truncated body rather than a well-formed lie.  So does a client that
stops reading (``write_timeout_s`` per batch): it would otherwise hold a pooled
connection in its transaction for as long as it stalls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson
from aiohttp import web

from ..pg.classify import Context, Phase, classify
from ..pg.encode import dumps
from ..pg.statement import Result
from .appkeys import REQUEST_ID, TRACE


class JsonRowStream:
    """A RowSink (pg/statement.py) that writes the response as rows arrive."""

    def __init__(self, request: web.Request, row_format: str, max_bytes: int, threshold: int,
                 batch_rows: int, write_timeout_s: float = 30.0) -> None:
        self.request = request
        self.row_format = row_format
        self.max_bytes = max_bytes
        self.threshold = threshold
        self.batch_rows = batch_rows
        self.write_timeout_s = write_timeout_s
        self.response: web.StreamResponse | None = None
        self.written = 0
        self._names: list[str] = []
        self._first = True

    async def start(self, columns: list[tuple[str, str]]) -> None:
        self._names = [name for name, _ in columns]
        resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                           "X-Request-Id": self.request[REQUEST_ID],
                                           "Server-Timing": self.request[TRACE].server_timing()})
        resp.enable_chunked_encoding()
        self.response = resp
        await self._send(resp.prepare(self.request))
        await self._write(b'{"columns":' + orjson.dumps([{"name": n, "type": t} for n, t in columns]) + b',"rows":[')

    async def rows(self, rows: list[Any]) -> bool:
        items = shape_rows(rows, self.row_format)
        chunk = dumps(items)[1:-1]  # the rows without the enclosing brackets
        if not chunk:
            return True
        if not self._first:
            chunk = b"," + chunk
        if self.written + len(chunk) > self.max_bytes:
            return False
        self._first = False
        await self._write(chunk)
        return True

    async def finish(self, result: Result) -> web.StreamResponse:
        assert self.response is not None
        tail = {"row_count": result.row_count, "command": result.command, "truncated": result.truncated}
        await self._write(b"]," + orjson.dumps(tail)[1:])
        await self._send(self.response.write_eof())
        return self.response

    def abort(self) -> web.StreamResponse:
        """After an error mid-stream: cut the connection (the status line is long gone).
        Aborted, not closed: a close waits to send what is buffered, which a client that
        stopped reading never takes, and the connection would stay open."""
        assert self.response is not None
        if self.request.transport is not None:
            self.request.transport.abort()
        return self.response

    async def _write(self, data: bytes) -> None:
        assert self.response is not None
        self.written += len(data)
        await self._send(self.response.write(data))

    async def _send(self, sending: Awaitable[Any]) -> None:
        """Anything sent to the client.  A client that hung up, or that takes nothing for
        ``write_timeout_s``, is a failure of the stream phase (classify.py's hang-up)."""
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await sending
        except (TimeoutError, ConnectionError) as exc:
            error = classify(exc, Context(Phase.STREAM, write_timeout_s=self.write_timeout_s)).error
            assert error is not None
            raise error from None


def shape_rows(rows: Sequence[Any], row_format: str) -> list[Any]:
    """Rows as the response carries them: arrays of values, or objects by column name."""
    return [tuple(r) for r in rows] if row_format == "array" else [dict(r.items()) for r in rows]
