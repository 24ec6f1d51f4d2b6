"""What a data request asks for: its JSON body read, checked and turned into a ``Plan``
(the statements, the options, how the results become the response).  Every endpoint
makes one (``POST /sql`` in neon.py too); handlers.py runs it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..config import Limits
from ..errors import INVALID_REQUEST, PAYLOAD_TOO_LARGE, REQUEST_TIMEOUT, ApiError
from ..pg.encode import check_nesting
from ..pg.statement import Result
from ..pg.transaction import ISOLATION_LEVELS
from .streaming import shape_rows

MAX_STATEMENTS = 100
ROW_FORMATS = ("object", "array")
CONSISTENCY = ("any", "primary")


@dataclass(frozen=True, slots=True)
class Options:
    read_only: bool
    isolation: str | None
    timeout_ms: int
    max_rows: int
    row_format: str
    consistency: str
    deferrable: bool = False


_HUGE = float(2 ** 63)


def _has_huge_float(value: Any) -> bool:
    """Whether a parsed body holds a float of 2**63 or more: where orjson may have read an
    integer too large for 64 bits (it reads those as floats).  Walks the values, not the bytes."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            if abs(v) >= _HUGE:
                return True
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


async def read_json(request: web.Request, max_bytes: int, timeout_s: float) -> tuple[bytes, dict[str, Any]]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(PAYLOAD_TOO_LARGE, f"request body over this tenant's limit of {max_bytes} bytes")
    try:
        if request.content.is_eof():  # it came with the headers: no wait, so no timer
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout_s):  # a client trickling its body is cut off
                raw = await request.read()
    except TimeoutError:
        raise ApiError(REQUEST_TIMEOUT, f"the request body did not arrive within {timeout_s:g} s") from None
    if len(raw) > max_bytes:
        raise ApiError(PAYLOAD_TOO_LARGE, f"request body over this tenant's limit of {max_bytes} bytes")
    if not raw:
        raise ApiError(INVALID_REQUEST, "the request body must be a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(INVALID_REQUEST, f"the request body is not valid JSON: {exc}") from None
    if _has_huge_float(body):
        # orjson reads an integer past 64 bits as a float, which would change a jsonb,
        # numeric or text parameter silently: such a body is read again, exactly (NaN and
        # Infinity, which the standard library would take, orjson refused already).
        try:
            body = json.loads(raw)
        except (RecursionError, ValueError) as exc:
            raise ApiError(INVALID_REQUEST, f"the request body is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ApiError(INVALID_REQUEST, "the request body must be a JSON object")
    return raw, body


def _check_fields(body: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(INVALID_REQUEST, f"unknown field(s) in {where}: {', '.join(unknown)}")


def _positive_int(body: Mapping[str, Any], key: str, limit: int) -> int:
    """A caller may lower a limit, never raise it: larger values are capped at the tenant's limit."""
    value = body.get(key)
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(INVALID_REQUEST, f"{key} must be a positive integer")
    return min(value, limit)


def _options(body: Mapping[str, Any], limits: Limits) -> Options:
    read_only = body.get("read_only", False)
    if not isinstance(read_only, bool):
        raise ApiError(INVALID_REQUEST, "read_only must be true or false")
    isolation = body.get("isolation")
    if isolation is not None and (not isinstance(isolation, str) or isolation.lower() not in ISOLATION_LEVELS):
        raise ApiError(INVALID_REQUEST, f"isolation must be one of: {', '.join(ISOLATION_LEVELS)}")
    row_format = body.get("row_format", "object")
    if row_format not in ROW_FORMATS:
        raise ApiError(INVALID_REQUEST, "row_format must be \"object\" or \"array\"")
    consistency = body.get("consistency", "any")
    if consistency not in CONSISTENCY:
        raise ApiError(INVALID_REQUEST, "consistency must be \"any\" (a replica may answer reads) or \"primary\"")
    return Options(read_only=read_only, isolation=isolation.lower() if isolation else None,
                   timeout_ms=_positive_int(body, "timeout_ms", limits.statement_timeout_ms),
                   max_rows=_positive_int(body, "max_rows", limits.max_rows), row_format=row_format,
                   consistency=consistency)


def options(settings: Mapping[str, Any], limits: Limits) -> Options:
    """Options from /v1-style settings (``read_only``, ``isolation``, ...), defaults filled in."""
    return _options(settings, limits)


ParamConverter = Callable[[Sequence[Any], Sequence[tuple[str, str, str | None]]], list[Any]]


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request asks for, whichever endpoint it came in by; :func:`execute` runs it."""

    statements: list[tuple[str, list[Any]]]
    options: Options
    render: Callable[[list[Result]], Any]  # the results -> the response's JSON value
    stream: bool = False                   # a single statement may stream a large result
    convert: ParamConverter | None = None  # how params become driver values (None: JSON values)
    strict_rows: bool = False              # more than max_rows rows fail instead of being cut off
    headers: Mapping[str, str] = field(default_factory=dict)  # added to a successful response


def statement_parts(item: Mapping[str, Any], where: str, sql_key: str = "sql") -> tuple[str, list[Any]]:
    """The SQL text and the parameter list of one statement object, checked."""
    sql = item.get(sql_key)
    if not isinstance(sql, str) or not sql.strip():
        raise ApiError(INVALID_REQUEST, f"{where}{sql_key} must be a non-empty string")
    params = item.get("params", [])
    if not isinstance(params, list):
        raise ApiError(INVALID_REQUEST, f"{where}params must be an array")
    check_nesting(params, where)  # before admission and the database, not deep in a conversion
    return sql, params


_QUERY_FIELDS = frozenset({"sql", "params", "read_only", "timeout_ms", "max_rows", "row_format", "isolation",
                           "consistency"})
_TX_FIELDS = frozenset({"statements", "read_only", "timeout_ms", "max_rows", "row_format", "isolation",
                        "consistency"})
_STATEMENT_FIELDS = frozenset({"sql", "params"})


def parse_query(body: Mapping[str, Any], limits: Limits) -> tuple[list[tuple[str, list[Any]]], Options]:
    """Validate a /v1/query body: unknown fields, wrong types and missing SQL are refused."""
    _check_fields(body, _QUERY_FIELDS, "the request")
    return [statement_parts(body, "")], _options(body, limits)


def parse_transaction(body: Mapping[str, Any], limits: Limits) -> tuple[list[tuple[str, list[Any]]], Options]:
    """Validate a /v1/transaction body."""
    _check_fields(body, _TX_FIELDS, "the request")
    items = body.get("statements")
    if not isinstance(items, list) or not items:
        raise ApiError(INVALID_REQUEST, "statements must be a non-empty array")
    if len(items) > MAX_STATEMENTS:
        raise ApiError(INVALID_REQUEST, f"at most {MAX_STATEMENTS} statements per transaction")
    parts = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(INVALID_REQUEST, f"statements[{i}] must be an object")
        _check_fields(item, _STATEMENT_FIELDS, f"statements[{i}]")
        parts.append(statement_parts(item, f"statements[{i}]."))
    return parts, _options(body, limits)


def render(result: Result, row_format: str) -> dict[str, Any]:
    return {
        "columns": [{"name": n, "type": t} for n, t in result.columns],
        "rows": shape_rows(result.rows, row_format),
        "row_count": result.row_count,
        "command": result.command,
        "truncated": result.truncated,
    }


def query_plan(request: web.Request, body: Mapping[str, Any], limits: Limits) -> Plan:
    parts, opts = parse_query(body, limits)
    return Plan(parts, opts, render=lambda results: render(results[0], opts.row_format), stream=True)


def transaction_plan(request: web.Request, body: Mapping[str, Any], limits: Limits) -> Plan:
    parts, opts = parse_transaction(body, limits)
    return Plan(parts, opts, render=lambda results: {"results": [render(r, opts.row_format) for r in results]})
