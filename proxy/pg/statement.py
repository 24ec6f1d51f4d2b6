"""One caller statement over the extended protocol, and the messages that precede it.

``run_statement``: Parse+Describe (asyncpg's prepare), then a single Bind+Execute+Sync with
a row limit (one more row than wanted, to detect truncation), reading a large result on
in batches into a ``RowSink``.  ``pipelined``: the gateway's own parameterless statements
(``BEGIN``, ``SET LOCAL``; the pool wall and ``COMMIT``) as raw messages to write in front
of it, or in front of its Sync.  The transaction around them is transaction.py's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import asyncpg
import orjson

from . import _asyncpg
from .classify import UndecodableValue
from .encode import convert_params, type_label


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Sequence[Any]
    command: str
    # How params become driver values for the types PostgreSQL inferred (default: JSON, encode.py).
    convert: Callable[[Sequence[Any], Sequence[tuple[str, str, str | None]]], list[Any]] | None = None
    row_bound: int | None = None  # the most rows it can return (its LIMIT), when known (guard.py)


@dataclass(slots=True)
class Result:
    columns: list[tuple[str, str]]
    rows: list[asyncpg.Record]
    row_count: int
    command: str
    truncated: bool
    streamed: bool = False  # the rows went to a RowSink as they came
    type_oids: list[int] = field(default_factory=list)  # of the columns, in order
    committed: bool = False  # the transaction's COMMIT travelled with the statement, and ran


class RowSink(Protocol):
    """Where a large result goes, batch by batch, while the transaction is still open."""

    threshold: int   # up to this many rows, results are returned whole instead
    batch_rows: int

    async def start(self, columns: list[tuple[str, str]]) -> None: ...

    async def rows(self, rows: list[asyncpg.Record]) -> bool:
        """Take a batch; False stops the stream (the response is as large as allowed)."""


# Extended-protocol messages for one parameterless statement, unnamed statement and portal:
# Parse (no parameter types), Bind (no parameters, default result format), Execute (all rows).
_BIND_EXECUTE = (b"B" + struct.pack("!i", 4 + 2 + 6) + b"\0\0" + b"\0\0" * 3
                 + b"E" + struct.pack("!i", 4 + 1 + 4) + b"\0" + b"\0\0\0\0")


def pipelined(statements: Sequence[str]) -> bytes:
    """``statements`` as Parse/Bind/Execute messages with no Sync after them.

    Written straight onto the connection just before asyncpg's own Parse+Describe+Flush
    (its ``prepare``), they run in the same round trip, ahead of it: asyncpg's prepare
    state skips the ParseComplete/BindComplete/CommandComplete replies they produce, and
    an error among them ends the prepare with that error (asyncpg then sends the Sync).
    This saves the round trip a separate ``BEGIN; SET LOCAL ...`` simple query costs."""
    out = bytearray()
    for sql in statements:
        query = sql.encode()
        out += b"P" + struct.pack("!i", 4 + 1 + len(query) + 1 + 2) + b"\0" + query + b"\0\0\0"
        out += _BIND_EXECUTE
    return bytes(out)


def may_stream(st: Statement, max_rows: int, threshold: int) -> bool:
    """Whether the statement's result may be larger than ``threshold`` rows: not when
    ``max_rows`` or its own LIMIT keeps it within."""
    return max_rows > threshold and (st.row_bound is None or st.row_bound > threshold)


async def run_statement(conn: asyncpg.Connection, st: Statement, timeout: float, max_rows: int,
                        sink: RowSink | None = None, commit: bytes | None = None) -> Result:
    """``commit``: messages that end the transaction (transaction.py's pool wall and COMMIT).  For a
    statement that returns rows and does not stream, they go in front of its Sync, so the
    transaction ends in the same round trip (``Result.committed``); an error in them
    raises as the statement's.  Its own command tag is lost to the COMMIT's then, but a
    statement that returns rows is counted by its rows.  Otherwise they are not sent.
    transaction.py passes them only for READ ONLY transactions (a failure after they were
    sent leaves the outcome unknown, which must not matter)."""
    state = await _asyncpg.prepare_unnamed(conn, st.sql, timeout)
    params = (st.convert or convert_params)(st.params, [_describe(t) for t in _asyncpg.parameter_types(state)])
    attributes = _asyncpg.result_attributes(state)
    columns = [(a.name, type_label(*_describe(a.type))) for a in attributes]
    meter = getattr(conn, "gateway_writer", None)  # wire.SplicingTransport: splices writes, meters reads
    _limit_per_element_reads(meter, attributes)
    oids = [a.type.oid for a in attributes]
    # The caller passes a sink only for a result that may be larger than its threshold
    # (``may_stream``): such a result is read through a named portal, in batches.
    streaming = sink is not None and bool(columns)
    # One Bind+Execute round trip with a row limit (one more than wanted, to detect
    # truncation) keeps a large result on the server.
    portal = _asyncpg.portal_name(conn) if streaming else ""
    first = sink.threshold + 1 if streaming and sink is not None else max_rows + 1
    writer = meter if commit is not None and columns and not streaming else None
    committed = False
    try:
        if writer is None:
            rows, status, done = await _asyncpg.bind_execute(conn, state, params, portal, first, timeout)
        else:
            writer.before_sync = commit
            try:
                rows, status, done = await _asyncpg.bind_execute(conn, state, params, portal, first, timeout)
            finally:
                sent = writer.before_sync is None
                writer.before_sync = None
            # The last CommandComplete is the COMMIT's (anything else: transaction.py finds the
            # transaction ended without its COMMIT, and refuses the result).
            committed = sent and status == b"COMMIT"
    except (ValueError, OverflowError) as exc:  # UnicodeDecodeError is a ValueError
        raise UndecodableValue(exc) from None
    if streaming and sink is not None and len(rows) > sink.threshold:
        return await _streamed(conn, state, portal, rows, st, columns, oids, timeout, max_rows, sink, meter)
    truncated = len(rows) > max_rows
    if truncated:
        del rows[max_rows:]
    text = status.decode() if status and not committed else ""  # a committed one's is the COMMIT's
    if text and done:
        tag, _, count = text.rpartition(" ")
        command = tag.split(" ")[0] if tag else text
        row_count = int(count) if count.isdigit() and not columns else len(rows)
    else:
        command, row_count = st.command, len(rows)
    return Result(columns=columns, rows=rows, row_count=row_count, command=command, truncated=truncated,
                  type_oids=oids, committed=committed)


# Arrays and composites are decoded element by element in Python on the event loop
# every tenant shares (1-3 us an element: a million timestamps took 2.3 s), so a result
# with such a column may bring in only this many bytes (a stream: per batch) before it is
# refused; array_to_json() passes an array through as the database's text instead.
ELEMENT_READ_BYTES = 2 << 20


def _limit_per_element_reads(meter: Any, attributes: Sequence[Any]) -> None:
    if meter is None or not meter.read_limit:
        return
    if any(a.type.kind in ("array", "composite") for a in attributes):
        meter.read_limit = min(meter.read_limit, meter.read_used + ELEMENT_READ_BYTES)
        meter.per_element = True


async def _streamed(conn: asyncpg.Connection, state: Any, portal: str, rows: list[asyncpg.Record], st: Statement,
                    columns: list[tuple[str, str]], oids: list[int], timeout: float, max_rows: int,
                    sink: RowSink, meter: Any) -> Result:
    """Past ``sink.threshold`` rows, hand the result to the sink batch by batch, reading
    the open portal on, instead of holding the whole result.  With a read meter (wire.py),
    a batch is sized to take about a quarter of its limit, by the rows read so far."""
    await sink.start(columns)
    sent, truncated, done = 0, False, False
    while rows:
        take = rows[:max_rows - sent]
        row_bytes = meter.read_used // len(rows) + 1 if meter is not None and meter.read_limit else 0
        if not await sink.rows(take):
            truncated = True  # the response reached max_response_bytes
            break
        sent += len(take)
        if len(take) < len(rows):
            truncated = True
            break
        if done:
            break
        del rows, take  # the batch went out: let its memory go before the next one comes in
        want = 1 if sent == max_rows else min(sink.batch_rows, max_rows - sent + 1)
        if row_bytes:
            meter.read_used = 0
            want = max(1, min(want, meter.read_limit // 4 // row_bytes))
        try:
            rows, _, done = await _asyncpg.execute_portal(conn, state, portal, want, timeout)
        except (ValueError, OverflowError) as exc:
            raise UndecodableValue(exc) from None
        if sent == max_rows:
            truncated = bool(rows)
            break
    return Result(columns=columns, rows=[], row_count=sent, command=st.command, truncated=truncated, streamed=True,
                  type_oids=oids)


# asyncpg names these "int2vector[]" and "oidvector[]", like the arrays of them.
_VECTOR_TYPES = {22: "int2vector", 30: "oidvector"}


def _describe(t: Any) -> tuple[str, str, str | None]:
    if t.oid in _VECTOR_TYPES:
        return _VECTOR_TYPES[t.oid], t.kind, None
    element = None
    if t.kind == "array":
        # asyncpg names built-in arrays "int4[]" and introspected ones after pg_type ("_my_enum").
        element = t.name[:-2] if t.name.endswith("[]") else t.name.removeprefix("_")
    return t.name, t.kind, element


def cap_bytes(results: Sequence[Result], budget: int) -> None:
    """Cut the rows of ``results`` (not streamed) where their size passes ``budget``
    bytes, marking each cut result ``truncated``, as a streamed one is cut at the tenant's
    max_response_bytes.  Sizes are estimates of the encoded JSON (text, bytes and JSON
    values by their length, anything else a few bytes): they bound the response, and
    cost a type check per value."""
    used = 0
    for result in results:
        if result.streamed:
            continue
        for i, row in enumerate(result.rows):
            used += _row_size(row, budget - used)
            if used > budget:
                del result.rows[i:]
                result.truncated = True
                break


def _row_size(row: Any, limit: int) -> int:
    """The row's estimated size, or any figure past ``limit`` once it is past it."""
    size = 0
    for value in row:
        if size > limit:
            return size
        if isinstance(value, (str, bytes)):
            size += len(value) + 8
        elif isinstance(value, orjson.Fragment):  # json/jsonb: the database's text, which it copies
            size += len(orjson.dumps(value)) + 8
        elif isinstance(value, (list, tuple)):
            size += _row_size(value, limit - size) + 8
        elif isinstance(value, Decimal):  # a numeric may hold 131,072 digits
            digits = value.as_tuple()
            size += len(digits.digits) + (abs(digits.exponent) if isinstance(digits.exponent, int) else 0) + 8
        else:
            size += 16
    return size
