"""The pooled connection: asyncpg's ``Connection`` as the gateway uses it, and what every
new one gets before its first request (the role audit, the type codecs)."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from ._asyncpg import skip_jit_toggle
from .encode import dumps
from .pgtext import float4_shortest
from .role import Finding, audit_role
from .wire import ConnectVia, SplicingTransport


class GatewayConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's type introspection (first use of an enum or other non-builtin type)
    toggles JIT with ``set_config('jit', ..., false)``: a session-level change through
    a pooled backend, and a call the hardened role may not make.  The role runs with
    ``jit = off`` (deploy/sql), so the toggle is skipped.

    ``gateway_writer``: the connection's ``SplicingTransport`` when made by wire.connect."""

    def __init__(self, protocol: Any, transport: Any, loop: Any, *args: Any, **kwargs: Any) -> None:
        self.gateway_writer: SplicingTransport | None = None
        if isinstance(loop, ConnectVia):
            self.gateway_writer = loop.writer
            loop = loop.real_loop
        if isinstance(transport, SplicingTransport):
            transport = transport._transport  # the gateway's own writes need no splicing
        super().__init__(protocol, transport, loop, *args, **kwargs)
        skip_jit_toggle(self)
        # True from the pipelined BEGIN until COMMIT or ROLLBACK: asyncpg's own idea of
        # the transaction status comes from the last ReadyForQuery, which can predate it.
        self.gateway_tx_open = False

    def set_gateway_tx_open(self, value: bool) -> None:
        self.gateway_tx_open = value  # a method, so that it reaches through the pool's proxy


async def no_reset(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's RESET ALL/UNLISTEN round trip: in transaction mode it would run on
    whichever backend PgBouncer picks.  Session state cannot be created (the guard and
    the database's grants forbid it), and asyncpg still rolls back an open transaction
    it knows of.  One it cannot know of (the request was cancelled right after the
    first Parse+Describe returned, before any ReadyForQuery) is rolled back here."""
    if getattr(conn, "gateway_tx_open", False):
        conn.gateway_tx_open = False
        await conn.execute("ROLLBACK")


class RoleCanBypassRls(Exception):
    """The gateway's database role ignores RLS: refuse to run any caller SQL through it."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        super().__init__("; ".join(f"{f.message} (fix: {f.fix})" for f in findings))


async def init_connection(conn: asyncpg.Connection) -> None:
    # Checked on every new connection, not only at start-up: the role may have been
    # altered, or the database may have been unreachable when the gateway started.
    fatal = await audit_role(conn, await conn.fetchval("SELECT current_user"))
    if fatal:
        raise RoleCanBypassRls(fatal)
    # json/jsonb pass through as the database's own text, embedded as-is in the response.
    # Binary format (jsonb's is a version byte, then the text) so rows and composites
    # that contain them decode too.
    await conn.set_type_codec("json", schema="pg_catalog", encoder=dumps, decoder=orjson.Fragment,
                              format="binary")
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=_jsonb_encode, decoder=_jsonb_decode,
                              format="binary")
    # Intervals keep months and days apart as PostgreSQL's own text.
    await conn.set_type_codec("interval", schema="pg_catalog", encoder=str, decoder=str, format="text")
    # An anonymous ROW(...) as PostgreSQL's own text, ``(1,"a b",)``: asyncpg decodes one
    # in binary, element by element, and would hand an element of a type it reads as text
    # (interval above, money, tsvector, regtype, macaddr, ...) the binary bytes.  Named
    # composite types still come out as objects.
    await conn.set_type_codec("record", schema="pg_catalog", encoder=str, decoder=str, format="text")
    # Types asyncpg decodes to something PostgreSQL does not print (an LSN as an integer,
    # a snapshot as a tuple): PostgreSQL's text, both ways.  ("char" too, as bytes, but
    # asyncpg's set_type_codec takes the name "char" for bpchar.)
    # Bit strings and geometric types as PostgreSQL's text too: asyncpg builds them bit by
    # bit and point by point in Python, so one large value would hold the event loop (that
    # every tenant shares) for seconds.  Network addresses likewise: asyncpg builds an
    # ipaddress object per value (8 us each: an array of a million would take 8 s).
    for name in ("pg_lsn", "txid_snapshot", "pg_snapshot", "bit", "varbit", "point", "line", "lseg", "box",
                 "path", "polygon", "circle", "inet", "cidr", "macaddr", "macaddr8"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=str, decoder=str, format="text")
    # float4 as the shortest decimal that reads back as the same float4 (0.1, as
    # PostgreSQL prints it, not the double 0.10000000149011612).
    await conn.set_type_codec("float4", schema="pg_catalog", encoder=_float4_encode, decoder=_float4_decode,
                              format="binary")


def _jsonb_encode(value: Any) -> bytes:
    return b"\x01" + dumps(value)  # dumps: an integer past 64 bits too


def _float4_encode(value: Any) -> bytes:
    return struct.pack("!f", value)


def _float4_decode(data: bytes) -> float:
    value: float = struct.unpack("!f", data)[0]
    return float(float4_shortest(value)) if math.isfinite(value) else value


def _jsonb_decode(data: bytes) -> orjson.Fragment:
    return orjson.Fragment(data[1:])
