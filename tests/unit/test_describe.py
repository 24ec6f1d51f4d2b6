"""The description cache's bookkeeping (the database side is tests/integration/test_describe.py)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import asyncpg

from proxy.describe import SCHEMA_CHANGED, Descriptions, parse_message, pipelined


def _error(sqlstate: str, message: str = "boom") -> asyncpg.PostgresError:
    exc = asyncpg.PostgresError(message)
    exc.sqlstate = sqlstate  # type: ignore[attr-defined]
    exc.message = message  # type: ignore[attr-defined]
    return exc


def _remember(cache: Descriptions, sql: str, version: int = 7) -> None:
    cache.remember(sql, SimpleNamespace(), [("int4", "scalar", None)], [("n", "int4")], [23], version)


def test_entries_are_valid_for_their_version_only_and_bounded() -> None:
    cache = Descriptions(2)
    cache.version = 7
    _remember(cache, "a")
    _remember(cache, "b")
    assert cache.lookup("a") is not None  # a is now the most recent
    _remember(cache, "c")
    assert cache.lookup("b") is None and cache.lookup("a") is not None and len(cache) == 2
    cache.version = 8
    assert cache.lookup("a") is None
    assert (cache.hits, cache.misses) == (2, 2)


def test_only_read_committed_transactions_use_descriptions() -> None:
    cache = Descriptions(10)
    assert not cache.usable(None)  # version unknown
    cache.version, cache.read_committed_default = 1, True
    assert cache.usable(None) and cache.usable("read committed")
    assert not cache.usable("repeatable read") and not cache.usable("serializable")
    cache.read_committed_default = False
    assert not cache.usable(None)
    assert not Descriptions(0).usable("read committed")


def test_what_the_check_says() -> None:
    cache = Descriptions(10)
    cache.version = 7
    for sql in ("a", "b"):
        _remember(cache, sql)
    # errors of the caller's statement are not the check's verdict (the gateway asks the
    # check itself when a remembered statement fails: tests/integration/test_describe.py)
    for exc in (_error("42804"), _error("42501", "permission denied for table t"), _error("23505"),
                asyncpg.DataError("invalid input for query argument $1"), ValueError("bad row")):
        assert not cache.check_failed(exc)
    assert len(cache) == 2 and cache.stale == 0
    # the failed check forgets everything and has the version, search_path and isolation learnt again
    assert cache.check_failed(_error(SCHEMA_CHANGED, "schema version 12"))
    assert len(cache) == 0 and cache.version is None and cache.stale == 1
    # a check that cannot run any more turns descriptions off
    cache.version = 12
    _remember(cache, "a", 12)
    assert cache.check_failed(_error("42501", "permission denied for function check_schema_version"))
    assert not cache.available and len(cache) == 0 and not cache.usable("read committed")


def test_messages_are_well_formed() -> None:
    msg = parse_message("SELECT $1", [23, 25])
    assert msg[:1] == b"P" and struct.unpack("!i", msg[1:5])[0] == len(msg) - 1
    assert msg.endswith(b"SELECT $1\0" + struct.pack("!hII", 2, 23, 25))
    out = pipelined(["BEGIN", "SET LOCAL x = 1"])
    kinds, at = [], 0
    while at < len(out):
        kinds.append(out[at:at + 1])
        at += 1 + struct.unpack("!i", out[at + 1:at + 5])[0]
    assert at == len(out) and kinds == [b"P", b"B", b"E"] * 2
    cache = Descriptions(1)
    cache.search_path = "\"$user\", public, o'brien"
    assert cache.check_sql(5) == ("SELECT WHERE NOT tenant_ddl.check_schema_version(5, "
                                  "'\"$user\", public, o''brien')")
