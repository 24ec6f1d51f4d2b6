"""Application assembly: middlewares in order, routes, and starting/stopping both ports."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import __version__
from ..config import ConfigError, Limits, Settings, load_config, restart_needed
from ..control.sync import ControlSync
from ..control.view import Overlay, View
from ..errors import ApiError
from ..observe.access_log import AccessLog
from ..observe.metrics import Metrics
from ..observe.pools import PoolStats
from ..observe.trace import RequestTrace
from ..pg.classify import DATABASE_ERRORS
from ..pg.connection import RoleCanBypassRls
from ..pg.pool import Pool
from ..pg.routing import Router
from ..pg.statement import Statement
from ..pg.transaction import TxRequest
from ..policy import idempotency, jwks
from ..policy.admission import Admission
from ..policy.auth import Authenticator, KeySource
from ..policy.guard import Guard
from ..policy.guard_pool import ParseWorkers
from ..policy.jwks import JwksRefresher
from ..policy.rates import RedisUnavailable, open_limiter
from . import admin, handlers, neon, openapi, tls
from .appkeys import GATEWAY
from .errors import error_middleware
from .head_deadline import GatewayRunner
from .middleware import observe_middleware, request_id_middleware
from .worker_peers import WorkerSlot, start_peer_site

log = logging.getLogger("tenant_proxy")

_START_ERRORS: tuple[type[Exception], ...] = (RoleCanBypassRls, RedisUnavailable, *DATABASE_ERRORS)


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one config; a reload builds a new one and swaps it whole."""

    settings: Settings
    authenticator: Authenticator
    guard: Guard

    @classmethod
    def build(cls, settings: Settings, jwt_keys: KeySource | None = None, old: Runtime | None = None) -> Runtime:
        """``old``: the runtime replaced, whose guard (and its cache) and authenticator
        (and its verified tokens) carry over where their part of the settings did not change."""
        same_auth = old is not None and old.settings.auth == settings.auth and \
            old.settings.tenancy.id_format == settings.tenancy.id_format
        return cls(settings=settings,
                   authenticator=old.authenticator if old is not None and same_auth
                   else Authenticator(settings.auth, settings.tenancy.id_format, jwt_keys),
                   guard=old.guard if old is not None and old.settings.guard == settings.guard
                   else Guard(settings.guard))


@dataclass(slots=True)
class Gateway:
    """The running gateway's state, shared by both applications."""

    runtime: Runtime
    router: Router
    admission: Admission
    config_path: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    metrics: Metrics = field(init=False)
    # Limits set through PUT /admin/tenants/{id}/limits; dropped by the next reload.
    overrides: dict[str, Limits] = field(default_factory=dict)
    draining: bool = False
    runners: list[web.AppRunner] = field(default_factory=list)
    # Tenants that sent Idempotency-Keys, with when they last did: whose expired keys to purge.
    idempotent_tenants: dict[str, float] = field(default_factory=dict)
    # Fetches the JWT keys from the identity provider when auth.jwt.jwks_url is set.
    jwks: JwksRefresher | None = None
    # Parser processes for long statements (the guard's bounded parse).
    parser: ParseWorkers = field(default_factory=ParseWorkers)
    # The fleet's control catalog (control.dsn), None for a single instance.
    control: ControlSync | None = None
    # The settings as the config file gave them, before the catalog's view is put over them.
    file_settings: Settings | None = None
    # Transactions in flight that may write, per tenant: what a pause waits for.
    writing: dict[str, int] = field(default_factory=dict)
    # The access log's queue and writer thread (flushed by the stop).
    access: AccessLog = field(default_factory=AccessLog)
    # Which of `serve --workers N` this process is; None for a single process.
    worker: WorkerSlot | None = None
    # The data port's TLS context (server.tls_cert_file), its certificate reloaded in place.
    tls: ssl.SSLContext | None = None
    # The settings the gateway started with: what the listeners were made with.
    _started: Settings = field(init=False)
    _overlay: Overlay = field(default_factory=Overlay)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)
    _purger: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        s = self._started = self.runtime.settings
        self.metrics = Metrics(s.metrics, __version__, s.pinned_tenants, self.pool_stats, self.admission.inflight)
        self.admission.fleet_size = self.admission.rates.fleet_size = self.fleet_size
        self.admission.rates.on_redis = self.metrics.redis_up.set

    def fleet_size(self) -> int:
        """Live instances of the fleet (the control catalog's heartbeats), 1 without one."""
        return self.control.fleet_size if self.control is not None else 1

    def pool_stats(self) -> list[PoolStats]:
        return self.router.stats()

    @property
    def database(self) -> Pool:
        """The default cluster's primary pool."""
        return self.router.primary()

    async def reload(self) -> list[str]:
        """Re-read the config file and swap it in whole; on any problem keep the old one.

        Returns the problems (empty when the new config is in force)."""
        if self.config_path is None:
            problems = ["the gateway was started without a config file"]
        else:
            try:
                settings = load_config(self.config_path, self.env)
                tls.check_reload(self.tls, settings.server)
            except ConfigError as exc:
                problems = exc.problems
            else:
                try:
                    await self.apply(settings)
                    if self.tls is not None:  # only once the rest is in force: a rejected reload keeps the old pair
                        tls.load(self.tls, settings.server)
                    problems = []
                    restart = restart_needed(self._started, settings)
                    if restart:
                        log.warning("config reload: %s changed but need a restart; the old values stay in force",
                                    ", ".join(restart))
                except ConfigError as exc:  # the certificate files changed again since they were checked
                    problems = [f"{p} (the files changed during the reload: the rest of the new config is in "
                                "force; reload again)" for p in exc.problems]
                except RedisUnavailable as exc:
                    problems = [str(exc)]
                except _START_ERRORS as exc:
                    problems = [f"database: the new pools could not start ({type(exc).__name__})"]
        self.metrics.reloads.labels("error" if problems else "ok").inc()
        log.log(logging.WARNING if problems else logging.INFO, "config reload %s%s",
                "rejected: " if problems else "applied", "; ".join(problems))
        return problems

    async def apply(self, settings: Settings) -> None:
        """Swap in new settings.  In-flight requests keep the limits (and pool) they started with."""
        old = self.runtime.settings
        if settings.fleet_limits != old.fleet_limits:
            limiter = await open_limiter(settings.fleet_limits.redis_url, settings.fleet_limits.redis_timeout_ms)
            retired_limiter, self.admission.rates = self.admission.rates, limiter
            limiter.fleet_size, limiter.on_redis = self.fleet_size, self.metrics.redis_up.set
            await retired_limiter.close()
        self.file_settings = settings
        if self.control is not None and self.control.view is not None:
            settings = self._overlay(settings, self.control.view)
        if (settings.database, settings.clusters, settings.tenancy.guc) != (old.database, old.clusters,
                                                                             old.tenancy.guc):
            router = Router(settings)
            await router.start()
            retired, self.router = self.router, router
            task = asyncio.create_task(retired.close())  # waits for its in-flight transactions
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self.overrides.clear()
        self.jwks = await jwks.restart(self.jwks, settings.auth.jwt)
        self.runtime = Runtime.build(settings, self.jwks, self.runtime if self.jwks is None else None)
        self.admission.resize(self.router.pool_sizes(), settings.database.acquire_timeout_ms / 1000)
        self.metrics.configure(settings.metrics, settings.pinned_tenants)
        if settings.logging.level != old.logging.level:
            logging.getLogger().setLevel(settings.logging.level)

    def apply_view(self, view: View) -> None:
        """Put a new catalog view over the file's settings (called by the control sync)."""
        base = self.file_settings or self.runtime.settings
        self.runtime = Runtime.build(self._overlay(base, view), self.jwks, self.runtime)
        pinned = self.runtime.settings.pinned_tenants
        if pinned != self.metrics.pinned:  # pin_metrics set in the catalog
            self.metrics.configure(self.runtime.settings.metrics, pinned)

    async def drain_writes(self, tenants: set[str], timeout_s: float = 60.0) -> None:
        """Wait until no transaction that may write is in flight for any of ``tenants``."""
        deadline = time.monotonic() + timeout_s
        while any(self.writing.get(t) for t in tenants):
            if time.monotonic() > deadline:
                log.warning("tenants %s still have writes in flight after %g s", sorted(tenants), timeout_s)
                return
            await asyncio.sleep(0.01)

    async def start_control(self) -> None:
        """Join the fleet: read the catalog (its view becomes the settings) before serving."""
        s = self.runtime.settings
        if s.control.dsn is None:
            return
        self.file_settings = s
        address = s.control.address or f"{s.server.admin_host}:{s.server.admin_port}"
        self.control = ControlSync(s.control, address, self.apply_view, self.drain_writes,
                                   worker=None if self.worker is None else self.worker.index)
        await self.control.start()
        self.control.register_metrics(self.metrics.registry)

    def set_tenant_limits(self, tenant: str, limits: Limits) -> None:
        """Change one tenant's limits until the next reload."""
        settings = self.runtime.settings
        self.overrides[tenant] = limits
        self.runtime = dataclasses.replace(
            self.runtime, settings=dataclasses.replace(settings, tenants={**settings.tenants, tenant: limits}))

    async def purge_idempotency_keys(self) -> int:
        """Delete expired idempotency records, tenant by tenant under each tenant's RLS context."""
        retention = self.runtime.settings.idempotency.retention_s
        now = time.monotonic()
        deleted = 0
        for tenant, last_seen in list(self.idempotent_tenants.items()):
            purge = Statement(idempotency.PURGE_SQL, [retention], "DELETE")
            tx = TxRequest(tenant_id=tenant, statements=[purge], read_only=False, isolation=None,
                           timeout_ms=30_000, max_rows=1)
            cluster = self.runtime.settings.limits_for(tenant).cluster
            outcome = await self.router.primary(cluster).run_in_tenant_tx(tx, RequestTrace(endpoint="purge"))
            deleted += outcome.results[0].row_count
            if last_seen + retention < now:  # every key it wrote has now expired and gone
                del self.idempotent_tenants[tenant]
        return deleted

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(self.runtime.settings.idempotency.purge_interval_s)
            try:
                deleted = await self.purge_idempotency_keys()
            except ApiError as exc:
                log.warning("idempotency purge failed: %s", exc.message)
            else:
                log.debug("idempotency purge deleted %d expired keys", deleted)

    def start_background(self) -> None:
        self._purger = asyncio.create_task(self._purge_forever())

    async def close(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        if self.jwks is not None:
            await self.jwks.close()
        await self.router.close()
        await self.parser.close()
        await self.admission.rates.close()
        if self._closing:
            await asyncio.gather(*self._closing)


def _application(gateway: Gateway, client_max_size: int, middlewares: list[Any]) -> web.Application:
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    app[GATEWAY] = gateway
    admin.add_health_routes(app)
    return app


def create_apps(gateway: Gateway) -> tuple[web.Application, web.Application]:
    """The data application (public API) and the admin application."""
    settings = gateway.runtime.settings
    data = _application(gateway, settings.server.max_request_bytes,
                        [observe_middleware, error_middleware])
    data.router.add_post("/v1/query", handlers.query)
    data.router.add_post("/v1/transaction", handlers.transaction)
    data.router.add_post("/sql", neon.sql)  # answers 404 unless server.neon_sql_endpoint (read per request)
    admin_app = _application(gateway, 1024 * 1024,
                             [request_id_middleware, error_middleware, admin.admin_auth_middleware])
    admin.add_admin_routes(admin_app)
    document = openapi.serialise(openapi.load())
    for app in (data, admin_app):
        openapi.add_route(app, document)
    return data, admin_app


@dataclass(slots=True)
class RunningGateway:
    gateway: Gateway
    port: int
    admin_port: int

    async def stop(self) -> None:
        gw = self.gateway
        gw.draining = True
        for runner in gw.runners:
            await runner.cleanup()
        gw.runners.clear()
        await gw.close()
        await asyncio.get_running_loop().run_in_executor(None, gw.access.close)


def _quiet_cancelled_resets(loop: asyncio.AbstractEventLoop) -> None:
    """A request cancelled mid-query (the client hung up) leaves its transaction for
    asyncpg's release to roll back, which it reports through the loop's exception handler
    as if it were a bug.  It is the intended path here: log it at debug level only."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("Resetting connection with an active transaction"):
            log.debug("rolled back the transaction of a cancelled request")
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def start_gateway(settings: Settings, config_path: Path | None = None,
                        env: Mapping[str, str] | None = None, worker: WorkerSlot | None = None) -> RunningGateway:
    """Open the pools and bind both ports (port 0 picks a free one).

    ``config_path`` (and the ``env`` its ``${VARS}`` come from) enable reloads; ``worker``:
    one of several processes sharing the ports (SO_REUSEPORT), with a peer socket."""
    _quiet_cancelled_resets(asyncio.get_running_loop())
    context = tls.server_context(settings.server)  # first: a bad certificate opens nothing
    limiter = await open_limiter(settings.fleet_limits.redis_url, settings.fleet_limits.redis_timeout_ms)
    router = Router(settings)
    await router.start()
    refresher = await jwks.start(settings.auth.jwt)
    admission = Admission(limiter, settings.database.acquire_timeout_ms / 1000)
    admission.resize(router.pool_sizes(), settings.database.acquire_timeout_ms / 1000)
    gateway = Gateway(runtime=Runtime.build(settings, refresher), router=router, admission=admission,
                      config_path=config_path, env=env or {}, jwks=refresher, worker=worker, tls=context)
    try:
        await gateway.start_control()
    except BaseException:
        await gateway.close()
        raise
    gateway.start_background()
    data_app, admin_app = create_apps(gateway)
    ports = []
    for app, host, port, ssl_context in ((data_app, settings.server.host, settings.server.port, context),
                                         (admin_app, settings.server.admin_host, settings.server.admin_port, None)):
        # handler_cancellation: a client that hangs up cancels its request, and with it the
        # statement on the server (the connection is closed, never reused mid-query).
        # head_timeout: read per connection, so that a reload applies to new connections.
        runner = GatewayRunner(app, access_log=None, shutdown_timeout=settings.server.shutdown_timeout_s,
                               handler_cancellation=True, keepalive_timeout=settings.server.keepalive_timeout_s,
                               head_timeout=lambda: gateway.runtime.settings.server.header_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=worker is not None,
                           ssl_context=ssl_context)
        await site.start()
        gateway.runners.append(runner)
        ports.append(runner.addresses[-1][1])
    if worker is not None:
        gateway.runners.append(await start_peer_site(gateway, worker))
    return RunningGateway(gateway=gateway, port=ports[0], admin_port=ports[1])
