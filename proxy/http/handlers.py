"""The data API's request path: ``POST /v1/query`` and ``POST /v1/transaction``.

Authenticate -> resolve the tenant -> read the body into a ``Plan`` (plan.py) -> admit
(rate, then a slot of the pool the request will use) -> guard -> run in the tenant's
transaction (pg/) -> encode.  Errors are raised as ApiError and rendered by the error
middleware only.  :func:`execute` is that path for every endpoint; an endpoint only
turns its body into a :class:`Plan` (``POST /sql`` in neon.py does too).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..config import Limits
from ..errors import (
    CLIENT_CLOSED,
    CONTROL_UNAVAILABLE,
    DATABASE_UNAVAILABLE,
    INTERNAL,
    INVALID_REQUEST,
    PAYLOAD_TOO_LARGE,
    STATEMENT_REJECTED,
    TENANT_MOVING,
    ApiError,
)
from ..observe.trace import RequestTrace
from ..pg.encode import dumps
from ..pg.pool import Pool
from ..pg.routing import Router
from ..pg.statement import Result, Statement, may_stream
from ..pg.transaction import Outcome, TxRequest
from ..policy import idempotency, jwks
from ..policy.tenancy import Tenant, resolve
from .appkeys import GATEWAY, REQUEST_ID, TRACE
from .plan import Options, Plan, query_plan, read_json, transaction_plan
from .streaming import JsonRowStream

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("tenant_proxy")

READ_ONLY_SQL_TRANSACTION = "25006"


def _tenant_header(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise ApiError(INVALID_REQUEST, f"{name} must be given at most once")
    return values[0] if values else None


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
    raw, body = await read_json(request, tenant.limits.max_request_bytes,
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

    db: Pool
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
                  trace: RequestTrace, db: Pool) -> web.StreamResponse:
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
                   timeout_ms=opts.timeout_ms, max_rows=opts.max_rows, claim=claim, encode=encode, sink=stream,
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


async def _run(router: Router, db: Pool, tenant: Tenant, tx: TxRequest, trace: RequestTrace) -> Outcome:
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
    return await execute(request, query_plan)


async def transaction(request: web.Request) -> web.StreamResponse:
    return await execute(request, transaction_plan)
