"""``POST /sql``: the HTTP protocol of Neon's serverless driver, on the data port.

Opt-in (``server.neon_sql_endpoint``).  It lets ``neon()`` from ``@neondatabase/serverless``,
and what is built on it (Drizzle's ``neon-http``), run against the gateway by pointing
``neonConfig.fetchEndpoint`` at it.  Everything between reading the body and writing the
result is /v1's own path (handlers.execute): the bearer credential (API key or JWT, the
driver's ``authToken`` option) and ``X-Tenant-Id`` choose the tenant, then the guard, the
tenant's limits, the metrics and ``db.run_in_tenant_tx``.  The ``Neon-Connection-String``
header is ignored: its user and password authenticate nothing here.

Only the formats are Neon's:

* body ``{"query", "params", "arrayMode"?}``, or ``{"queries": [...]}`` run as one
  transaction, shaped by ``Neon-Batch-Isolation-Level``/``-Read-Only``/``-Deferrable``;
* parameters are PostgreSQL text (a JSON non-string becomes text as Neon makes it) and
  are read as the parameter's type would read that text;
* results ``{"fields", "rows", "command", "rowCount", "rowAsArray"}``, rows as arrays
  under ``Neon-Array-Mode: true`` (or a query's ``arrayMode``), values as PostgreSQL text
  under ``Neon-Raw-Text-Output: true`` (what the driver always asks for), otherwise as
  Neon converts them (booleans, int2/int4, floats and JSON as JSON values);
* errors ``{"message", "code": SQLSTATE, "severity"}`` plus the gateway's own error
  object; never PostgreSQL's DETAIL or HINT, which can carry other tenants' values.

A statement that would return more than the tenant's ``max_rows`` fails (SQLSTATE 54000)
instead of being cut short: the driver has no way to show that a result was truncated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ..config import Limits
from ..errors import INVALID_REQUEST, NOT_FOUND, ApiError, error_body
from ..pg.encode import check_nesting
from ..pg.pgtext import base_type, to_json, to_text
from ..pg.statement import Result
from ..pg.text_params import json_to_text, param_from_text
from . import handlers
from . import plan as plans
from .appkeys import ERROR_RENDERER, GATEWAY
from .plan import MAX_STATEMENTS, Plan, statement_parts

RAW_TEXT = "Neon-Raw-Text-Output"
ARRAY_MODE = "Neon-Array-Mode"
ISOLATION = "Neon-Batch-Isolation-Level"
READ_ONLY = "Neon-Batch-Read-Only"
DEFERRABLE = "Neon-Batch-Deferrable"
# PostgreSQL runs READ UNCOMMITTED as READ COMMITTED.
ISOLATION_LEVELS = {"Serializable": "serializable", "RepeatableRead": "repeatable read",
                    "ReadCommitted": "read committed", "ReadUncommitted": "read committed"}
_QUERY_FIELDS = frozenset({"query", "params", "arrayMode"})
# pg_type.typlen of the built-in types (by OID); other types report -1 (variable).
_TYPE_SIZES = {16: 1, 18: 1, 19: 64, 20: 8, 21: 2, 23: 4, 26: 4, 700: 4, 701: 8, 1082: 4, 1083: 8, 1114: 8,
               1184: 8, 1186: 16, 1266: 12, 2950: 16}


@dataclass(frozen=True, slots=True)
class NeonQuery:
    sql: str
    params: list[str | None]  # PostgreSQL text
    array_mode: bool


def _flag(request: web.Request, name: str) -> bool:
    """Neon's rule: a header is on when it is exactly ``true``."""
    return request.headers.get(name) == "true"


def _query(item: Any, where: str, default_array_mode: bool) -> NeonQuery:
    if not isinstance(item, dict):
        raise ApiError(INVALID_REQUEST, f"{where} must be an object")
    unknown = sorted(set(item) - _QUERY_FIELDS)
    if unknown:
        raise ApiError(INVALID_REQUEST, f"unknown field(s) in {where}: {', '.join(unknown)}")
    if isinstance(item.get("params"), list):  # first: statement_parts' message would say "the request.params"
        check_nesting(item["params"], "" if where == "the request" else f"{where}.")
    sql, params = statement_parts(item, f"{where}.", sql_key="query")
    array_mode = item.get("arrayMode", default_array_mode)
    if not isinstance(array_mode, bool):
        raise ApiError(INVALID_REQUEST, f"{where}.arrayMode must be true or false")
    return NeonQuery(sql=sql, params=[json_to_text(p) for p in params], array_mode=array_mode)


def parse_body(body: Mapping[str, Any], default_array_mode: bool) -> tuple[list[NeonQuery], bool]:
    """The queries of a Neon request, and whether it was a batch (one transaction)."""
    if "queries" not in body:
        return [_query(body, "the request", default_array_mode)], False
    unknown = sorted(set(body) - {"queries"})
    if unknown:
        raise ApiError(INVALID_REQUEST, f"unknown field(s) in the request: {', '.join(unknown)}")
    items = body["queries"]
    if not isinstance(items, list) or not items:
        raise ApiError(INVALID_REQUEST, "queries must be a non-empty array")
    if len(items) > MAX_STATEMENTS:
        raise ApiError(INVALID_REQUEST, f"at most {MAX_STATEMENTS} queries per transaction")
    return [_query(item, f"queries[{i}]", default_array_mode) for i, item in enumerate(items)], True


def convert_params(values: Sequence[Any], types: Sequence[tuple[str, str, str | None]]) -> list[Any]:
    """Text parameters -> driver values for the types PostgreSQL inferred for them."""
    if len(values) != len(types):
        raise ApiError(INVALID_REQUEST, f"the statement expects {len(types)} parameter(s), {len(values)} given",
                       sqlstate="08P01")
    return [param_from_text(i + 1, v, *t) for i, (v, t) in enumerate(zip(values, types, strict=True))]


def render_result(result: Result, array_mode: bool, raw_text: bool) -> dict[str, Any]:
    """One statement's result in Neon's shape."""
    labels = [label for _, label in result.columns]
    fields = [{"name": name, "dataTypeID": oid, "tableID": 0, "columnID": 0,
               "dataTypeSize": _TYPE_SIZES.get(oid, -1), "dataTypeModifier": -1, "format": "text"}
              for (name, _), oid in zip(result.columns, result.type_oids, strict=True)]
    if raw_text:
        values = [[to_text(v, base_type(t)) for v, t in zip(row, labels, strict=True)] for row in result.rows]
    else:
        values = [[to_json(v, t) for v, t in zip(row, labels, strict=True)] for row in result.rows]
    rows: list[Any] = values if array_mode else [
        dict(zip((name for name, _ in result.columns), row, strict=True)) for row in values]
    return {"fields": fields, "rows": rows, "command": result.command, "rowCount": result.row_count,
            "rowAsArray": array_mode}


def plan(request: web.Request, body: Mapping[str, Any], limits: Limits) -> Plan:
    """Read a Neon request into the gateway's plan: statements, options, and how to answer."""
    raw_text = _flag(request, RAW_TEXT)
    queries, batch = parse_body(body, _flag(request, ARRAY_MODE))
    settings: dict[str, Any] = {}
    echo: dict[str, str] = {}
    deferrable = False
    if batch:  # as in Neon, the transaction headers shape batches only
        level = request.headers.get(ISOLATION)
        if level is not None:
            if level not in ISOLATION_LEVELS:
                raise ApiError(INVALID_REQUEST, f"{ISOLATION} must be one of: {', '.join(ISOLATION_LEVELS)}")
            settings["isolation"] = ISOLATION_LEVELS[level]
            echo[ISOLATION] = level
        if _flag(request, READ_ONLY):
            settings["read_only"] = True
            echo[READ_ONLY] = "true"
        if _flag(request, DEFERRABLE):
            deferrable = True
            echo[DEFERRABLE] = "true"
    options = dataclasses.replace(plans.options(settings, limits), deferrable=deferrable)

    def render(results: list[Result]) -> Any:
        out = [render_result(r, q.array_mode, raw_text) for r, q in zip(results, queries, strict=True)]
        return {"results": out} if batch else out[0]

    return Plan(statements=[(q.sql, list(q.params)) for q in queries], options=options, render=render,
                convert=convert_params, strict_rows=True, headers=echo)


def error_response(err: ApiError, request_id: str) -> web.Response:
    """An error as Neon's endpoint answers it: 400 for what the request caused (the driver
    reads only a 400's body), while 413, 429 and 5xx keep their status and Retry-After."""
    status = err.kind.status if err.kind.status in (413, 429) or err.kind.status >= 500 else 400
    body = {"message": err.message, "code": err.sqlstate or "", "severity": "ERROR",
            "error": error_body(err, request_id)}
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


async def sql(request: web.Request) -> web.StreamResponse:
    """``POST /sql``: one query, or a batch in one transaction, in Neon's format."""
    if not request.app[GATEWAY].runtime.settings.server.neon_sql_endpoint:
        raise ApiError(NOT_FOUND, "the Neon-compatible endpoint is off (server.neon_sql_endpoint)")
    request[ERROR_RENDERER] = error_response
    return await handlers.execute(request, plan)
