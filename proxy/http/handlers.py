"""Thin HTTP glue for the data API: ``POST /v1/query`` and ``POST /v1/transaction``.

Request path: authenticate -> resolve tenant -> validate body -> guard -> run in the
tenant's transaction -> encode.  Errors are raised as ApiError and rendered by the
error middleware only.  :func:`execute` is that path for every endpoint; an endpoint
only turns its body into a :class:`Plan` (``POST /sql`` in neon.py does too).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..config import Limits
from ..errors import (
    CLIENT_CLOSED,
    CONTROL_UNAVAILABLE,
    DATABASE_UNAVAILABLE,
    INTERNAL,
    INVALID_REQUEST,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    STATEMENT_REJECTED,
    TENANT_MOVING,
    ApiError,
)
from ..observe.trace import RequestTrace
from ..pg.encode import check_nesting, dumps
from ..pg.pool import ISOLATION_LEVELS, Database, Outcome, TxRequest
from ..pg.routing import Router
from ..pg.statement import Result, Statement, may_stream
from ..policy import idempotency, jwks
from ..policy.tenancy import Tenant, resolve
from .appkeys import GATEWAY, REQUEST_ID, TRACE
from .streaming import JsonRowStream

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("tenant_proxy")

MAX_STATEMENTS = 100
READ_ONLY_SQL_TRANSACTION = "25006"
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


async def _read_json(request: web.Request, max_bytes: int, timeout_s: float) -> tuple[bytes, dict[str, Any]]:
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
    rows: list[Any] = ([tuple(r) for r in result.rows] if row_format == "array"
                       else [dict(r.items()) for r in result.rows])
    return {
        "columns": [{"name": n, "type": t} for n, t in result.columns],
        "rows": rows,
        "row_count": result.row_count,
        "command": result.command,
        "truncated": result.truncated,
    }


def _tenant_header(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise ApiError(INVALID_REQUEST, f"{name} must be given at most once")
    return values[0] if values else None


def _query_plan(request: web.Request, body: Mapping[str, Any], limits: Limits) -> Plan:
    parts, opts = parse_query(body, limits)
    return Plan(parts, opts, render=lambda results: render(results[0], opts.row_format), stream=True)


def _transaction_plan(request: web.Request, body: Mapping[str, Any], limits: Limits) -> Plan:
    parts, opts = parse_transaction(body, limits)
    return Plan(parts, opts, render=lambda results: {"results": [render(r, opts.row_format) for r in results]})


async def execute(request: web.Request,
                  plan_for: Callable[[web.Request, Mapping[str, Any], Limits], Plan]) -> web.StreamResponse:
    """Authenticate, resolve the tenant, read the body into a plan, guard, admit, run, answer."""
    gw = request.app[GATEWAY]
    trace = request[TRACE]
    t0 = time.perf_counter()
    rt = gw.runtime
    principal = await jwks.authenticate(rt.authenticator, gw.jwks, request.headers.get("Authorization"))
    trace.caller = principal.name
    tenant: Tenant = resolve(principal, _tenant_header(request, rt.settings.tenancy.header), rt.settings)
    trace.tenant = tenant.id
    t1 = time.perf_counter()
    trace.auth_s = t1 - t0
    raw, body = await _read_json(request, tenant.limits.max_request_bytes,
                                 rt.settings.server.body_timeout_s)
    plan = plan_for(request, body, tenant.limits)
    # Admission first: the guard's parse costs CPU, so a tenant's rate and concurrency
    # bound its parses too (a long text is parsed off the event loop, guard_pool.py).
    # The rate is the tenant's; the slot is one of the pool the request will use.
    admission = gw.admission
    if admission.rates.remote:
        await admission.rates.take(tenant.id, tenant.limits)
    else:
        admission.rates.check(tenant.id, tenant.limits)
    opts = plan.options
    slot = _Slot(gw.router.choose(tenant.limits.cluster, opts.read_only, opts.consistency))
    slot_wait = await admission.admit(slot.db.name, tenant.id, tenant.limits)
    try:
        response = await _admitted(request, gw, tenant, plan, raw, trace, slot)
    finally:
        if slot.held:
            admission.release(slot.db.name, tenant.id)
        trace.wait_s = slot_wait + (trace.wait_s or 0.0)
    return response


@dataclass(slots=True)
class _Slot:
    """The pool a request was admitted to (it may change once: a paused read goes to the
    primary, a write held through a move to the tenant's new cluster)."""

    db: Database
    held: bool = True


async def _repin(gw: Gateway, slot: _Slot, tenant: Tenant, opts: Options) -> None:
    """Move the request's slot to the pool it must use now, if that is another one."""
    if gw.router.suits(slot.db, tenant.limits.cluster, opts.read_only, opts.consistency):
        return
    gw.admission.release(slot.db.name, tenant.id)
    slot.held = False
    slot.db = gw.router.choose(tenant.limits.cluster, opts.read_only, opts.consistency)
    await gw.admission.admit(slot.db.name, tenant.id, tenant.limits)
    slot.held = True


async def _guarded(gw: Gateway, tenant: Tenant, plan: Plan, trace: RequestTrace) -> list[Statement]:
    """The plan's statements with the guard's verdicts; refused ones raise."""
    rt = gw.runtime
    t2 = time.perf_counter()
    statements = []
    max_sql = tenant.limits.max_sql_bytes
    for sql, params in plan.statements:
        if len(sql) > max_sql // 4 and len(sql.encode("utf-8", "surrogatepass")) > max_sql:
            raise ApiError(PAYLOAD_TOO_LARGE, f"a statement's text is over this tenant's limit of {max_sql} bytes")
        verdict = await gw.parser.verdict(rt.guard, rt.settings.guard, sql, tenant.id)
        trace.fingerprint = trace.fingerprint or verdict.fingerprint or None
        if verdict.rejection is not None:
            raise ApiError(STATEMENT_REJECTED, verdict.rejection)
        statements.append(Statement(sql, params, verdict.command, plan.convert, verdict.row_bound(params)))
    trace.guard_s = time.perf_counter() - t2
    return statements


async def _admitted(request: web.Request, gw: Gateway, tenant: Tenant, plan: Plan, raw: bytes,
                    trace: RequestTrace, slot: _Slot) -> web.StreamResponse:
    """Guard, then run the plan in the tenant's transaction and answer."""
    statements = await _guarded(gw, tenant, plan, trace)
    held_until = None
    while True:
        try:
            return await _placed(request, gw, tenant.id, plan, statements, raw, trace, slot)
        except _Paused as paused:
            # A move's cut-over is short: the write waits for it, then runs where the tenant is now.
            hold = gw.runtime.settings.server.write_hold_s
            held_until = held_until or time.monotonic() + hold
            if paused.error.kind is not TENANT_MOVING or not await _pause_ends(gw, tenant.id, held_until):
                raise paused.error from None


class _Paused(Exception):
    def __init__(self, error: ApiError) -> None:
        self.error = error


async def _pause_ends(gw: Gateway, tenant_id: str, until: float) -> bool:
    while time.monotonic() < until:
        await asyncio.sleep(0.01)
        if not gw.runtime.settings.limits_for(tenant_id).moving:
            return True
    return False


async def _placed(request: web.Request, gw: Gateway, tenant_id: str, plan: Plan, statements: list[Statement],
                  raw: bytes, trace: RequestTrace, slot: _Slot) -> web.StreamResponse:
    """Run the plan where the tenant is placed now; a write refused by a pause raises ``_Paused``."""
    opts = plan.options
    # From here to the transaction's end nothing awaits before the write count is taken:
    # the placement and pause read now are the ones a move waits on (see Gateway.drain_writes).
    rt = gw.runtime
    tenant = Tenant(tenant_id, rt.settings.limits_for(tenant_id))
    paused = None if opts.read_only else _write_pause(gw, tenant.limits)
    if paused is not None:
        # Reads go on: the request runs READ ONLY, so PostgreSQL itself refuses any write
        # (through functions too), and that refusal becomes the pause's 503.
        opts = dataclasses.replace(opts, read_only=True, consistency="primary")
    await _repin(gw, slot, tenant, opts)
    # Reads are idempotent already, and a READ ONLY transaction could not store the key.
    claim = None if opts.read_only else idempotency.claim_for(
        request.headers.get(idempotency.HEADER), trace.endpoint, raw, rt.settings.idempotency.retention_s)
    if not opts.read_only:
        gw.writing[tenant.id] = gw.writing.get(tenant.id, 0) + 1
    try:
        return await _answer(request, gw, tenant, plan, opts, statements, claim, trace, slot.db)
    except ApiError as err:
        if paused is not None and err.sqlstate == READ_ONLY_SQL_TRANSACTION:
            raise _Paused(paused) from None
        raise
    finally:
        if not opts.read_only:
            left = gw.writing[tenant.id] - 1
            if left:
                gw.writing[tenant.id] = left
            else:
                del gw.writing[tenant.id]


def _write_pause(gw: Gateway, limits: Limits) -> ApiError | None:
    """Why this instance may not write for the tenant now, if it may not."""
    if limits.moving:  # `tenant-proxy move` is copying the tenant to another cluster
        return ApiError(TENANT_MOVING, "this tenant's data is being moved; retry shortly", retry_after_s=1)
    if gw.control is not None and not gw.control.fresh():
        return ApiError(CONTROL_UNAVAILABLE, "this gateway instance has lost touch with the control catalog; "
                        "writes are refused until it is back (reads are served)", retry_after_s=2)
    return None


async def _answer(request: web.Request, gw: Gateway, tenant: Tenant, plan: Plan, opts: Options,
                  statements: list[Statement], claim: idempotency.Claim | None,
                  trace: RequestTrace, db: Database) -> web.StreamResponse:
    """Run the plan in the tenant's transaction and answer."""
    rt = gw.runtime

    def encode(results: list[Result]) -> bytes:
        t3 = time.perf_counter()
        body = dumps(plan.render(results))
        trace.encode_s = time.perf_counter() - t3
        return body

    if claim is not None:
        gw.idempotent_tenants[tenant.id] = time.monotonic()
    server = rt.settings.server
    # A single statement without an idempotency key may stream a large result.
    streams = (plan.stream and claim is None and len(statements) == 1
               and may_stream(statements[0], opts.max_rows, server.stream_threshold_rows))
    stream = None if not streams else JsonRowStream(
        request, opts.row_format, tenant.limits.max_response_bytes, server.stream_threshold_rows,
        server.stream_batch_rows, server.stream_write_timeout_s)
    tx = TxRequest(tenant_id=tenant.id, statements=statements, read_only=opts.read_only, isolation=opts.isolation,
                   timeout_ms=opts.timeout_ms, max_rows=opts.max_rows, claim=claim, render=encode, sink=stream,
                   deferrable=opts.deferrable, strict_rows=plan.strict_rows,
                   deadline_s=tenant.limits.transaction_timeout_s, max_bytes=tenant.limits.max_response_bytes)
    try:
        outcome = await _run(gw.router, db, tenant, tx, trace)
        if stream is not None and outcome.results and outcome.results[0].streamed:
            trace.rows = outcome.results[0].row_count
            return await stream.finish(outcome.results[0])
    except Exception as exc:
        if stream is None or stream.response is None:
            raise
        # The 200 went out: an error answer now would be written into the chunked body.
        return _cut_stream(stream, request, trace, exc)
    if outcome.replay is not None:
        # Always 200: the gateway stores only 200 answers, and the record is a row of a tenant
        # table the caller's own SQL can change (a status of 101 went on the wire as such).
        return web.Response(body=outcome.replay.body, status=200, content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
    trace.rows = sum(len(r.rows) for r in outcome.results)
    payload = outcome.body if outcome.body is not None else encode(outcome.results)
    return web.Response(body=payload, content_type="application/json", headers=plan.headers)


def _cut_stream(stream: JsonRowStream, request: web.Request, trace: RequestTrace,
                exc: Exception) -> web.StreamResponse:
    """After a streamed response's 200: close the connection, so that the client sees a
    cut-off body, and record why."""
    if isinstance(exc, ApiError):
        trace.error_code = exc.kind.code
        log.log(logging.INFO if exc.kind is CLIENT_CLOSED else logging.WARNING, "request %s failed mid-stream: %s",
                request[REQUEST_ID], exc.message)
    else:
        trace.error_code = INTERNAL.code
        log.error("request %s failed mid-stream", request[REQUEST_ID], exc_info=exc)
    return stream.abort()


async def _run(router: Router, db: Database, tenant: Tenant, tx: TxRequest, trace: RequestTrace) -> Outcome:
    """On the pool admitted to; a replica that fails is taken out and the read goes to the
    primary instead (outside the primary's fair queue: rare, and short)."""
    try:
        return await db.run_in_tenant_tx(tx, trace)
    except ApiError as err:
        if err.kind is not DATABASE_UNAVAILABLE or not router.is_replica(db):
            raise
        router.mark_down(db)
        return await router.primary(tenant.limits.cluster).run_in_tenant_tx(tx, trace)


async def query(request: web.Request) -> web.StreamResponse:
    return await execute(request, _query_plan)


async def transaction(request: web.Request) -> web.StreamResponse:
    return await execute(request, _transaction_plan)
