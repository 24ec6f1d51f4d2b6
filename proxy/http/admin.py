"""Health endpoints (on both ports) and the admin application: metrics and hotspots."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from ..config import AdminToken, ConfigError, Limits, canonical_tenant_id, parse_limits
from ..control.catalog import PLACEMENT_KEYS, Catalog
from ..control.schema import CatalogError, CatalogNotFound
from ..errors import CONFIG_INVALID, CONTROL_UNAVAILABLE, INVALID_REQUEST, NOT_FOUND, UNAUTHENTICATED, ApiError
from ..observe import pgbouncer
from ..policy.auth import hash_key
from ..policy.limits import pool_report
from .appkeys import ADMIN_ACTOR, GATEWAY
from .worker_peers import merged_exposition

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Every change made through the admin API, one JSON object per line (the catalog's change
# log holds them too when there is one).
changes_log = logging.getLogger("tenant_proxy.changes")

PGBOUNCER_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """A real round trip through PgBouncer succeeds, and the gateway is not draining."""
    gw = request.app[GATEWAY]
    if gw.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not await gw.database.ping():
        return web.json_response({"status": "database unavailable"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; PgBouncer's figures are read now, with a short timeout."""
    gw = request.app[GATEWAY]
    dsn = gw.runtime.settings.database.pgbouncer_admin_dsn
    if dsn:
        gw.metrics.pgbouncer = await pgbouncer.read(dsn, PGBOUNCER_TIMEOUT_S)
    if gw.worker is not None:  # serve --workers: every worker's figures, added up
        body, content_type = await merged_exposition(gw, gw.worker, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})
    # Copied here, on the loop that writes the figures; rendering (the CPU work) runs off it.
    snapshot = gw.metrics.snapshot()
    body, content_type = await asyncio.get_running_loop().run_in_executor(
        None, gw.metrics.exposition, request.headers.get("Accept"), snapshot)
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


async def hotspots(request: web.Request) -> web.Response:
    """The current top tenants by database time (estimates over the hotspot window)."""
    gw = request.app[GATEWAY]
    return web.json_response({"window_s": gw.runtime.settings.metrics.hotspot_window_s,
                              "tenants": gw.metrics.hotspots()})


async def tenant(request: web.Request) -> web.Response:
    """One tenant's figures, whether or not it is in the top set, and its read-write
    transactions in flight (what `tenant-proxy move` waits on once writes are paused) and
    its cluster."""
    gw, tenant_id = request.app[GATEWAY], _tenant_id(request)
    return web.json_response({**gw.metrics.tenant(tenant_id), "writing": gw.writing.get(tenant_id, 0),
                              "cluster": gw.runtime.settings.limits_for(tenant_id).cluster})


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file (as SIGHUP does); a broken file is refused and the old config stays."""
    changes_log.info(orjson.dumps({"actor": request[ADMIN_ACTOR], "kind": "config.reload", "subject": "config"}
                                  ).decode())
    problems = await request.app[GATEWAY].reload()
    if problems:
        raise ApiError(CONFIG_INVALID, "config rejected; the previous config stays in force", problems=problems)
    return web.json_response({"status": "reloaded"})


async def config(request: web.Request) -> web.Response:
    """The effective config, secrets redacted, with the limits changed at run time."""
    gw = request.app[GATEWAY]
    body = gw.runtime.settings.redacted()
    body["runtime_overrides"] = {t: dataclasses.asdict(limits) for t, limits in gw.overrides.items()}
    body["config_file"] = str(gw.config_path) if gw.config_path else None
    return web.json_response(body)


def _tenant_id(request: web.Request) -> str:
    settings = request.app[GATEWAY].runtime.settings
    tid = canonical_tenant_id(request.match_info["tenant_id"], settings.tenancy.id_format)
    if tid is None:
        raise ApiError(INVALID_REQUEST, f"not a valid {settings.tenancy.id_format} tenant id")
    return tid


async def put_tenant_limits(request: web.Request) -> web.Response:
    """Change one tenant's limits now (only the keys given): in the control catalog, for the
    whole fleet and for good; without one, in this process until the next reload."""
    gw = request.app[GATEWAY]
    tid = _tenant_id(request)
    try:
        raw = await request.json()
    except ValueError:
        raise ApiError(INVALID_REQUEST, "the body must be a JSON object of limits") from None
    if not isinstance(raw, dict):
        raise ApiError(INVALID_REQUEST, "the body must be a JSON object of limits")
    try:
        limits = parse_limits(raw, gw.runtime.settings.limits_for(tid), path="limits")
    except ConfigError as exc:
        raise ApiError(INVALID_REQUEST, "invalid limits", problems=exc.problems) from None
    if limits.cluster not in gw.runtime.settings.clusters:
        raise ApiError(INVALID_REQUEST, "invalid limits",
                       problems=[f"limits.cluster: no cluster named {limits.cluster!r} (see clusters)"])
    if limits.suspended and limits.moving:
        raise ApiError(INVALID_REQUEST, "invalid limits", problems=["limits: a tenant cannot be suspended and moving"])
    actor = request[ADMIN_ACTOR]
    if gw.control is not None:
        await _catalog_limits(request, tid, raw, limits)
        return web.json_response({"tenant": tid, "limits": dataclasses.asdict(gw.runtime.settings.limits_for(tid))})
    before = gw.runtime.settings.limits_for(tid)
    gw.set_tenant_limits(tid, limits)
    changes_log.info(orjson.dumps({"actor": actor, "kind": "tenant.limits", "subject": tid,
                                   "before": dataclasses.asdict(before), "after": dataclasses.asdict(limits)}).decode())
    return web.json_response({"tenant": tid, "limits": dataclasses.asdict(limits)})


async def _catalog_limits(request: web.Request, tid: str, raw: dict[str, Any], limits: Limits) -> None:
    gw = request.app[GATEWAY]
    assert gw.control is not None
    state = None
    if "suspended" in raw or "moving" in raw:
        state = "moving" if limits.moving else "suspended" if limits.suspended else "active"
    stored = {k: v for k, v in raw.items() if k not in PLACEMENT_KEYS}
    async with _catalog(request) as cat:
        await cat.update_tenant(request[ADMIN_ACTOR], tid, state=state, cluster=raw.get("cluster"), limits=stored)
        version = await cat.version()
    await gw.control.caught_up(version)


@contextlib.asynccontextmanager
async def _catalog(request: web.Request) -> AsyncIterator[Catalog]:
    """The control catalog for one admin request; its refusals and outages as API errors."""
    gw = request.app[GATEWAY]
    if gw.control is None:
        raise ApiError(NOT_FOUND, "this gateway runs without a control catalog (control.dsn)")
    try:
        async with gw.control.catalog(gw.file_settings or gw.runtime.settings) as cat:
            yield cat
    except CatalogNotFound as exc:
        raise ApiError(NOT_FOUND, str(exc)) from None
    except CatalogError as exc:
        raise ApiError(INVALID_REQUEST, str(exc)) from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ApiError(CONTROL_UNAVAILABLE, f"the control catalog cannot be reached ({type(exc).__name__})",
                       retry_after_s=2) from None


async def fleet(request: web.Request) -> web.Response:
    """One entry per live instance of the fleet (this one alone without a catalog)."""
    gw = request.app[GATEWAY]
    if gw.control is None:
        s = gw.runtime.settings
        return web.json_response({"catalog": False, "instances": [
            {"id": "local", "address": f"{s.server.admin_host}:{s.server.admin_port}", "applied_version": None}]})
    async with _catalog(request) as cat:
        instances = await cat.fleet(gw.control.cfg.lease_s)
        version = await cat.version()
    return web.json_response({"catalog": True, "version": version, "this": gw.control.id, "instances": instances})


async def changes(request: web.Request) -> web.Response:
    """The catalog's change log, newest first (``?limit=``, ``?before=`` an id to page on)."""
    try:
        limit = int(request.query.get("limit", "100"))
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        raise ApiError(INVALID_REQUEST, "limit and before must be integers") from None
    if not 1 <= limit <= 1000:
        raise ApiError(INVALID_REQUEST, "limit must be between 1 and 1000")
    async with _catalog(request) as cat:
        rows = await cat.changes(limit, before)
    return web.json_response({"changes": rows})


def _admin_token(request: web.Request, tokens: tuple[AdminToken, ...]) -> str:
    """The name of the admin token the request carries; 401 without a valid one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token and len(token) <= 4096:
        digest = hash_key(token)
        for t in tokens:
            if hmac.compare_digest(t.sha256, digest):
                return t.name
    raise ApiError(UNAUTHENTICATED, "admin routes need a bearer token listed in admin.tokens")


@web.middleware
async def admin_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /admin route needs an admin token (health, metrics and the OpenAPI document do not)."""
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical.startswith("/admin"):
        tokens = request.app[GATEWAY].runtime.settings.admin.tokens
        # Without tokens the admin port is loopback only (config refuses anything else).
        request[ADMIN_ACTOR] = _admin_token(request, tokens) if tokens else "anonymous"
    return await handler(request)


async def forget_tenant_metrics(request: web.Request) -> web.Response:
    """Drop a tenant's metrics series and hotspot figures (`tenant-proxy purge` calls this)."""
    tid = _tenant_id(request)
    request.app[GATEWAY].metrics.forget(tid)
    return web.json_response({"tenant": tid, "metrics": "forgotten"})


async def pool(request: web.Request) -> web.Response:
    """Per pool: size, use, waits, timeouts, utilisation, and a size from Little's law."""
    gw = request.app[GATEWAY]
    window = float(gw.runtime.settings.metrics.hotspot_window_s)
    now = time.monotonic()
    reports = [pool_report(db.stats(), db.recent, now, window) for db in gw.router.databases()]
    return web.json_response({"pools": reports, "slots": gw.admission.slots, "slots_waiting": gw.admission.waiting()})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/hotspots", hotspots)
    app.router.add_get("/admin/tenants/{tenant_id}", tenant)
    app.router.add_put("/admin/tenants/{tenant_id}/limits", put_tenant_limits)
    app.router.add_delete("/admin/tenants/{tenant_id}/metrics", forget_tenant_metrics)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/config", config)
    app.router.add_get("/admin/pool", pool)
    app.router.add_get("/admin/fleet", fleet)
    app.router.add_get("/admin/changes", changes)
