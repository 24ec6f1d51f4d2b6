"""Health endpoints (on both ports) and the admin application: metrics and hotspots."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from aiohttp import web

from . import pgbouncer
from .config import ConfigError, canonical_tenant_id, parse_limits
from .errors import CONFIG_INVALID, INVALID_REQUEST, ApiError
from .keys import GATEWAY
from .limits import pool_report

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
    """One tenant's figures, whether or not it is in the top set."""
    return web.json_response(request.app[GATEWAY].metrics.tenant(_tenant_id(request)))


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file (as SIGHUP does); a broken file is refused and the old config stays."""
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
    """Change one tenant's limits now (only the keys given); kept until the next reload."""
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
    gw.set_tenant_limits(tid, limits)
    return web.json_response({"tenant": tid, "limits": dataclasses.asdict(limits)})


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
    return web.json_response({"pools": reports, "slots": gw.scheduler.slots, "slots_waiting": gw.scheduler.waiting()})


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
