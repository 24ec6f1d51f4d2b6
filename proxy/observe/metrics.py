"""Every metric the gateway exports, with bounded tenant labels.  The only prometheus_client user.

At most ``metrics.tenant_label_limit`` tenants have their own ``tenant`` label at any
time: pinned tenants, then the heaviest by database time over the hotspot window
(``hotspots.HeavyHitters``).  Every other tenant's observations are recorded under
``tenant="__other__"``.  When a tenant leaves the labelled set its series are removed;
its later observations go to ``__other__`` and its earlier ones are not copied there,
so nothing is counted twice.  Requests that never resolved a tenant (bad credentials)
use ``tenant="__none__"``.

The per-request series (requests, rejections, the three histograms, rows) are plain
counters in dicts, written on the event loop without locks and turned into metric
families at scrape time: prometheus_client's own Counter and Histogram take a lock per
increment and validate every exemplar, which was about 9% of the gateway's CPU per
request.  A scrape copies them on the event loop (``snapshot``, well under a
millisecond at the label limit) and renders the copy in a worker thread
(``exposition``), so nothing is read while it changes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from ..config import MetricsConfig
from .families import Family, FamilyCopy
from .hotspots import HeavyHitters, TenantLoad, choose_labelled
from .pgbouncer import Snapshot
from .pools import PoolStats
from .trace import RequestTrace

OTHER = "__other__"
NO_TENANT = "__none__"
REJECT_REASONS = {
    "unauthenticated": "auth", "statement_rejected": "guard", "rate_limited": "rate",
    "concurrency_limited": "concurrency", "tenant_suspended": "suspended", "pool_timeout": "pool_timeout",
    "statement_timeout": "statement_timeout", "tenant_moving": "moving",
}
_REFRESH_S = 1.0
_RECENT = 512  # latencies kept per labelled tenant for the admin quantiles


def _sketch(cfg: MetricsConfig) -> HeavyHitters:
    return HeavyHitters(window_s=cfg.hotspot_window_s, capacity=max(64, 4 * cfg.tenant_label_limit),
                        hot_share=cfg.hotspot_share)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Metrics:
    """Declares the metrics on its own registry and records one request at a time."""

    def __init__(self, cfg: MetricsConfig, version: str, pinned: frozenset[str],
                 pools: Callable[[], list[PoolStats]], inflight: Callable[[], dict[str, int]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.pinned = pinned
        self.clock = clock
        # *_created series would double the exposition for no use on a dashboard.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Family("tenant_proxy_requests", "HTTP requests by tenant, endpoint and status code",
                                ("tenant", "endpoint", "code"))
        self.rejected = Family("tenant_proxy_rejected", "Requests refused before or instead of running, by reason",
                                ("tenant", "reason"))
        self.duration = Family("tenant_proxy_request_duration_seconds", "End-to-end request latency",
                                ("tenant", "endpoint"), histogram=True)
        self.pool_wait = Family("tenant_proxy_pool_wait_seconds",
                                 "Time waiting for a database connection or a tenant slot", ("tenant",),
                                 histogram=True)
        self.db_duration = Family("tenant_proxy_db_duration_seconds", "Database time, BEGIN to COMMIT",
                                   ("tenant",), histogram=True)
        self.rows = Family("tenant_proxy_rows_returned", "Rows returned to callers", ("tenant",))
        self._per_request = (self.requests, self.rejected, self.duration, self.pool_wait, self.db_duration,
                             self.rows)
        self.folded = 0
        self.reloads = Counter("tenant_proxy_config_reloads", "Config reloads by result", ["result"], registry=r)
        for result in ("ok", "error"):  # both series from the start: an alert's increase() sees the first
            self.reloads.labels(result)
        self.redis_up = Gauge("tenant_proxy_rate_limit_redis_up", "1 while the fleet's rate limits are kept in Redis "
                              "(0: limits.redis_url set but not answering, each instance enforces its share)",
                              registry=r)
        self.redis_up.set(1)
        Gauge("tenant_proxy_build_info", "Gateway version", ["version"], registry=r).labels(version).set(1)
        self._label_limit = Gauge("tenant_proxy_tenant_label_limit", "Most tenants with their own label",
                                  registry=r)
        self._label_limit.set(cfg.tenant_label_limit)
        self.hot = _sketch(cfg)
        self._labelled = choose_labelled((), pinned, cfg.tenant_label_limit)
        self._next_refresh = 0.0
        self.pgbouncer: Snapshot | None = None
        self._pools = pools
        self._inflight = inflight
        self._recent: dict[str, deque[tuple[float, float]]] = {}

    def configure(self, cfg: MetricsConfig, pinned: frozenset[str]) -> None:
        """Apply reloaded metrics settings.  Series and counters carry on; a changed window
        or label limit starts a fresh hotspot sketch, and the labelled set is recomputed now."""
        if (cfg.hotspot_window_s, cfg.tenant_label_limit) != (self.cfg.hotspot_window_s, self.cfg.tenant_label_limit):
            self.hot = _sketch(cfg)
        self.hot.hot_share = cfg.hotspot_share
        self.cfg = cfg
        self.pinned = pinned
        self._label_limit.set(cfg.tenant_label_limit)
        self._next_refresh = 0.0
        self._refresh(self.clock())

    # -- labels -------------------------------------------------------------------
    def label(self, tenant: str | None) -> str:
        if tenant is None:
            return NO_TENANT
        return tenant if tenant in self._labelled else OTHER

    def _assign(self, tenant: str | None) -> str:
        """The label for a new observation: a free slot goes to the tenant at once; when
        all are taken, the periodic refresh decides (heaviest tenants win)."""
        if tenant is not None and tenant not in self._labelled and len(self._labelled) < self.cfg.tenant_label_limit:
            self._labelled = self._labelled | {tenant}
        return self.label(tenant)

    def _refresh(self, now: float) -> None:
        if now < self._next_refresh:
            return
        self._next_refresh = now + _REFRESH_S
        new = choose_labelled(self.hot.top(self.cfg.tenant_label_limit, now), self.pinned,
                              self.cfg.tenant_label_limit)
        for gone in self._labelled - new:
            self._drop_series(gone)
        self._labelled = new

    def _drop_series(self, tenant: str) -> None:
        for family in self._per_request:
            family.drop_tenant(tenant)
        self._recent.pop(tenant, None)

    # -- recording ----------------------------------------------------------------
    def observe(self, trace: RequestTrace, status: int, duration_s: float, request_id: str) -> None:
        """Record one finished request (called once, by the middleware)."""
        now = self.clock()
        if trace.tenant is not None and trace.db_s is not None:
            self.hot.add(trace.tenant, trace.db_s, now)
        self._refresh(now)
        label = self._assign(trace.tenant)
        if label == OTHER:
            self.folded += 1
        self.requests.inc((label, trace.endpoint, str(status)))
        if trace.error_code is not None:
            reason = REJECT_REASONS.get(trace.error_code)
            if reason is not None:
                self.rejected.inc((label, reason))
        self.duration.observe((label, trace.endpoint), duration_s, request_id)
        key = (label,)
        if trace.wait_s is not None:
            self.pool_wait.observe(key, trace.wait_s)
        if trace.db_s is not None:
            self.db_duration.observe(key, trace.db_s)
            self.rows.inc(key, trace.rows)
        if label not in (OTHER, NO_TENANT):
            self._recent.setdefault(label, deque(maxlen=_RECENT)).append((duration_s, trace.wait_s or 0.0))

    def forget(self, tenant: str) -> None:
        """Drop a tenant's series and hotspot figures (after its data was purged)."""
        self._drop_series(tenant)
        self._labelled = self._labelled - {tenant}
        self.hot.forget(tenant)

    # -- reading ------------------------------------------------------------------
    def snapshot(self) -> _Scrape:
        """Everything a scrape shows, copied now (on the event loop, which writes it)."""
        now = self.clock()
        self._refresh(now)
        loads = [load for load in self.hot.top(self.cfg.tenant_label_limit, now) if load.tenant in self._labelled]
        inflight: dict[str, int] = {}
        for tenant, n in self._inflight().items():
            label = self.label(tenant)
            inflight[label] = inflight.get(label, 0) + n
        return _Scrape(self.registry, [f.copy() for f in self._per_request], self.folded, loads,
                       sorted(inflight.items()), self._pools(), self.pgbouncer)

    def exposition(self, accept: str | None, snapshot: _Scrape | None = None) -> tuple[bytes, str]:
        """Prometheus text, or OpenMetrics (with exemplars) when the scraper asks for it.
        Off the event loop, pass a ``snapshot`` taken on it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(snapshot or self.snapshot()), content_type

    def tenant_report(self, load: TenantLoad) -> dict[str, Any]:
        recent = list(self._recent.get(load.tenant, ()))
        latencies = [d for d, _ in recent]
        waits = [w for _, w in recent]
        return {
            "tenant": load.tenant,
            "labelled": load.tenant in self._labelled,
            "db_time_share_estimate": round(load.share, 4),
            "requests_per_s_estimate": round(load.requests_per_s, 2),
            "latency_p50_s_recent": _quantile(latencies, 0.5),
            "latency_p99_s_recent": _quantile(latencies, 0.99),
            "pool_wait_p99_s_recent": _quantile(waits, 0.99),
            "inflight": self._inflight().get(load.tenant, 0),
            "hot": load.hot,
        }

    def hotspots(self) -> list[dict[str, Any]]:
        now = self.clock()
        self._refresh(now)
        return [self.tenant_report(load) for load in self.hot.top(self.cfg.tenant_label_limit, now)]

    def tenant(self, tenant: str) -> dict[str, Any]:
        return self.tenant_report(self.hot.load_of(tenant, self.clock()))


@dataclass(frozen=True, slots=True)
class _Scrape:
    """One scrape's figures, copied on the event loop; ``collect`` runs anywhere."""

    registry: CollectorRegistry  # the metrics prometheus_client keeps itself (build info, reloads)
    per_request: list[FamilyCopy]
    folded: int
    loads: list[TenantLoad]       # the labelled tenants' hotspot figures
    inflight: list[tuple[str, int]]
    pools: list[PoolStats]
    pgbouncer: Snapshot | None

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        for family in self.per_request:
            yield family.family()
        yield CounterMetricFamily("tenant_proxy_tenants_folded",
                                  f"Requests recorded under tenant=\"{OTHER}\" instead of their own label",
                                  value=self.folded)
        share = GaugeMetricFamily("tenant_proxy_tenant_load_share",
                                  "Share of database time over the hotspot window (estimate)", labels=["tenant"])
        hot = GaugeMetricFamily("tenant_proxy_hot_tenants", "1 while the tenant is over the hotspot share",
                                labels=["tenant"])
        for load in self.loads:
            share.add_metric([load.tenant], load.share)
            hot.add_metric([load.tenant], 1.0 if load.hot else 0.0)
        yield share
        yield hot
        inflight = GaugeMetricFamily("tenant_proxy_inflight_requests", "Requests in progress", labels=["tenant"])
        for label, n in self.inflight:
            inflight.add_metric([label], n)
        yield inflight
        yield from _pool_families(self.pools)
        if self.pgbouncer is not None:
            yield from _pgbouncer_families(self.pgbouncer)


def _pool_families(pools: list[PoolStats]) -> Iterator[Metric]:
    conns = GaugeMetricFamily("tenant_proxy_pool_connections", "Gateway pool connections by state",
                              labels=["pool", "state"])
    waiting = GaugeMetricFamily("tenant_proxy_pool_waiting", "Requests waiting for a pool connection",
                                labels=["pool"])
    size = GaugeMetricFamily("tenant_proxy_pool_max", "Pool size limit", labels=["pool"])
    timeouts = CounterMetricFamily("tenant_proxy_pool_timeouts", "Acquire timeouts", labels=["pool"])
    for p in pools:
        conns.add_metric([p.name, "idle"], p.idle)
        conns.add_metric([p.name, "in_use"], p.size - p.idle)
        waiting.add_metric([p.name], p.waiting)
        size.add_metric([p.name], p.max)
        timeouts.add_metric([p.name], p.timeouts)
    yield from (conns, waiting, size, timeouts)


_POOL_COLUMNS = {
    "cl_active": ("pgbouncer_pools_client_active_connections", 1.0),
    "cl_waiting": ("pgbouncer_pools_client_waiting_connections", 1.0),
    "cl_active_cancel_req": ("pgbouncer_pools_client_active_cancel_connections", 1.0),
    "cl_waiting_cancel_req": ("pgbouncer_pools_client_waiting_cancel_connections", 1.0),
    "sv_active": ("pgbouncer_pools_server_active_connections", 1.0),
    "sv_active_cancel": ("pgbouncer_pools_server_active_cancel_connections", 1.0),
    "sv_being_canceled": ("pgbouncer_pools_server_being_canceled_connections", 1.0),
    "sv_idle": ("pgbouncer_pools_server_idle_connections", 1.0),
    "sv_used": ("pgbouncer_pools_server_used_connections", 1.0),
    "sv_tested": ("pgbouncer_pools_server_testing_connections", 1.0),
    "sv_login": ("pgbouncer_pools_server_login_connections", 1.0),
}
_STATS_COLUMNS = {
    "query_count": ("pgbouncer_stats_totals_queries_pooled", 1.0),
    "xact_count": ("pgbouncer_stats_totals_sql_transactions_pooled", 1.0),
    "bytes_received": ("pgbouncer_stats_totals_received_bytes", 1.0),
    "bytes_sent": ("pgbouncer_stats_totals_sent_bytes", 1.0),
    "query_time": ("pgbouncer_stats_totals_queries_duration_seconds", 1e-6),
    "xact_time": ("pgbouncer_stats_totals_server_in_transaction_seconds", 1e-6),
    "wait_time": ("pgbouncer_stats_totals_client_wait_seconds", 1e-6),
}
_LIST_NAMES = {
    "databases": "pgbouncer_databases", "users": "pgbouncer_users", "pools": "pgbouncer_pools",
    "free_clients": "pgbouncer_free_clients", "used_clients": "pgbouncer_used_clients",
    "login_clients": "pgbouncer_login_clients", "free_servers": "pgbouncer_free_servers",
    "used_servers": "pgbouncer_used_servers", "dns_names": "pgbouncer_cached_dns_names",
    "dns_zones": "pgbouncer_cached_dns_zones", "dns_queries": "pgbouncer_in_flight_dns_queries",
}


def _pgbouncer_families(snap: Snapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily("pgbouncer_up", "1 when PgBouncer's admin console answered", value=1.0 if snap.up else 0.0)
    for column, (name, scale) in _POOL_COLUMNS.items():
        fam = GaugeMetricFamily(name, f"SHOW POOLS {column}", labels=["database", "user"])
        for row in snap.pools:
            fam.add_metric([row["database"], row["user"]], float(row.get(column) or 0) * scale)
        yield fam
    maxwait = GaugeMetricFamily("pgbouncer_pools_client_maxwait_seconds", "Oldest waiting client's wait",
                                labels=["database", "user"])
    for row in snap.pools:
        maxwait.add_metric([row["database"], row["user"]],
                           float(row.get("maxwait") or 0) + float(row.get("maxwait_us") or 0) * 1e-6)
    yield maxwait
    for column, (name, scale) in _STATS_COLUMNS.items():
        cfam = CounterMetricFamily(name, f"SHOW STATS_TOTALS {column}", labels=["database"])
        for row in snap.stats:
            cfam.add_metric([row["database"]], float(row.get(column) or 0) * scale)
        yield cfam
    for item, name in _LIST_NAMES.items():
        if item in snap.lists:
            yield GaugeMetricFamily(name, f"SHOW LISTS {item}", value=snap.lists[item])
