"""Parsing and validation behind proxy.config: raw YAML -> Settings, every problem by key path."""

from __future__ import annotations

import ipaddress
import math
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .auth import admin_tokens, api_keys, jwt_config
from .model import (
    DEFAULT_CLUSTER,
    GUC_RE,
    HEADER_RE,
    LIMIT_KEYS,
    SLUG_RE,
    AdminConfig,
    AuthConfig,
    ClusterConfig,
    ConfigError,
    ControlConfig,
    DatabaseConfig,
    FleetLimitsConfig,
    GuardConfig,
    IdempotencyConfig,
    Limits,
    LoggingConfig,
    MetricsConfig,
    ServerConfig,
    Settings,
    TenancyConfig,
    canonical_tenant_id,
    redact_dsn,
)
from .reader import Reader


def _limits(r: Reader, raw: Any, path: str, base: Limits) -> Limits:
    if raw is None:
        return base
    if not isinstance(raw, dict):
        r.fail(path, "must be a mapping")
        return base
    r.unknown(raw, LIMIT_KEYS, path)
    rate = r.number(raw, "rate_per_s", path, base.rate_per_s, lo=0.0)
    return Limits(
        statement_timeout_ms=r.int_(raw, "statement_timeout_ms", path, base.statement_timeout_ms, lo=1),
        max_rows=r.int_(raw, "max_rows", path, base.max_rows, lo=1),
        suspended=r.bool_(raw, "suspended", path, base.suspended),
        pin_metrics=r.bool_(raw, "pin_metrics", path, base.pin_metrics),
        max_concurrency=r.int_(raw, "max_concurrency", path, base.max_concurrency, lo=0),
        rate_per_s=rate,
        burst=r.int_(raw, "burst", path, max(base.burst, math.ceil(rate)), lo=1),
        queue_timeout_ms=r.int_(raw, "queue_timeout_ms", path, base.queue_timeout_ms, lo=0),
        max_request_bytes=r.int_(raw, "max_request_bytes", path, base.max_request_bytes, lo=64),
        weight=r.number(raw, "weight", path, base.weight, lo=0.01),
        cluster=r.str_(raw, "cluster", path, default=base.cluster) or base.cluster,
        max_response_bytes=r.int_(raw, "max_response_bytes", path, base.max_response_bytes, lo=1024),
        moving=r.bool_(raw, "moving", path, base.moving),
        max_sql_bytes=r.int_(raw, "max_sql_bytes", path, base.max_sql_bytes, lo=64),
        transaction_timeout_ms=r.int_(raw, "transaction_timeout_ms", path, base.transaction_timeout_ms, lo=1),
    )


def parse_limits(raw: Any, base: Limits, path: str = "limits") -> Limits:
    """Validate one tenant's limit overrides (for the admin API); raise ConfigError."""
    r = Reader({})
    limits = _limits(r, raw, path, base)
    if r.problems:
        raise ConfigError(r.problems)
    return limits


def _items(raw: Mapping[str, Any], key: str) -> list[tuple[Any, Any]]:
    value = raw.get(key)
    return list(value.items()) if isinstance(value, dict) else []


def _names(r: Reader, raw: Mapping[str, Any], key: str, section: str,
           default: tuple[str, ...] = ()) -> list[str]:
    value = raw.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        r.fail(f"{section}.{key}", "must be a list of names")
        return list(default)
    return value


def _dsn(r: Reader, raw: Mapping[str, Any], path: str, required: bool) -> str:
    dsn = r.str_(raw, "dsn", path, required=required) or ""
    if dsn and not dsn.startswith(("postgresql://", "postgres://")):
        r.fail(f"{path}.dsn", "must be a postgresql:// URL")
    return dsn


def _admin_dsn(r: Reader, raw: Mapping[str, Any], path: str) -> str | None:
    dsn = r.str_(raw, "admin_dsn", path)
    if dsn is not None and not dsn.startswith(("postgresql://", "postgres://")):
        r.fail(f"{path}.admin_dsn", "must be a postgresql:// URL")
    return dsn


def _replicas(r: Reader, raw: Mapping[str, Any], path: str) -> tuple[str, ...]:
    value = raw.get("replicas", [])
    if not isinstance(value, list):
        r.fail(f"{path}.replicas", "must be a list of postgresql:// URLs")
        return ()
    out = []
    for i, item in enumerate(value):
        dsn = item
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            r.fail(f"{path}.replicas[{i}]", "must be a postgresql:// URL")
        else:
            out.append(dsn)
    return tuple(out)


_SECTIONS = frozenset({"server", "database", "clusters", "tenancy", "defaults", "tenants", "auth", "guard",
                       "metrics", "idempotency", "logging", "control", "admin", "limits"})


def parse_config(raw: Any, env: Mapping[str, str]) -> Settings:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    r = Reader(env)
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping"])
    r.unknown(raw, _SECTIONS, "")
    raw = r.expand(raw, "")
    server = _server(r, raw)
    database = _database(r, raw)
    clusters = _clusters(r, raw, database)
    if database.pool_min_size > database.pool_max_size:
        r.fail("database.pool_min_size", f"must be <= pool_max_size ({database.pool_max_size})")
    tenancy = _tenancy(r, raw)
    id_format = tenancy.id_format if tenancy.id_format in ("uuid", "slug") else "uuid"
    for path, limits in (("defaults", raw.get("defaults")), *((f"tenants.{k}", v) for k, v in _items(raw, "tenants"))):
        if isinstance(limits, dict) and "moving" in limits:
            r.fail(f"{path}.moving", "is set only by `tenant-proxy move` (through the control catalog or the admin "
                                     "API), never in the file")
    defaults = _limits(r, raw.get("defaults"), "defaults", Limits())
    tenants = _tenants(r, raw, defaults, id_format, clusters)
    control = _control(r, raw, server)
    auth, admin = _auth(r, raw, id_format, control, server)
    guard, metrics, idempotency, logging = _guard(r, raw), _metrics(r, raw), _idempotency(r, raw), _logging(r, raw)
    fleet_limits = _fleet_limits(r, raw)
    if r.problems:
        raise ConfigError(r.problems)
    return Settings(database=database, server=server, tenancy=tenancy, defaults=defaults, tenants=tenants,
                    auth=auth, guard=guard, metrics=metrics, idempotency=idempotency, logging=logging,
                    clusters=clusters, control=control, admin=admin, fleet_limits=fleet_limits)


_SERVER_KEYS = frozenset({"host", "port", "admin_host", "admin_port", "max_request_bytes", "shutdown_timeout_s",
                          "body_timeout_s", "header_timeout_s", "keepalive_timeout_s", "drain_s",
                          "stream_threshold_rows", "stream_batch_rows", "stream_write_timeout_s",
                          "neon_sql_endpoint", "write_hold_s", "tls_cert_file", "tls_key_file",
                          "tls_client_ca_file"})


def _server(r: Reader, raw: Mapping[str, Any]) -> ServerConfig:
    s = r.section(raw, "server", _SERVER_KEYS)
    server = ServerConfig(
        host=r.str_(s, "host", "server", default="127.0.0.1") or "127.0.0.1",
        port=r.int_(s, "port", "server", 8080, lo=0, hi=65535),
        admin_host=r.str_(s, "admin_host", "server", default="127.0.0.1") or "127.0.0.1",
        admin_port=r.int_(s, "admin_port", "server", 9090, lo=0, hi=65535),
        max_request_bytes=r.int_(s, "max_request_bytes", "server", 1024 * 1024, lo=1024),
        shutdown_timeout_s=float(r.int_(s, "shutdown_timeout_s", "server", 10, lo=0, hi=3600)),
        body_timeout_s=r.number(s, "body_timeout_s", "server", 10.0, lo=0.1),
        header_timeout_s=r.number(s, "header_timeout_s", "server", 10.0, lo=0.1),
        keepalive_timeout_s=r.number(s, "keepalive_timeout_s", "server", 75.0, lo=0.1),
        drain_s=r.number(s, "drain_s", "server", 0.0, lo=0.0),
        stream_threshold_rows=r.int_(s, "stream_threshold_rows", "server", 1000, lo=1),
        stream_batch_rows=r.int_(s, "stream_batch_rows", "server", 1000, lo=1),
        stream_write_timeout_s=r.number(s, "stream_write_timeout_s", "server", 30.0, lo=0.1),
        neon_sql_endpoint=r.bool_(s, "neon_sql_endpoint", "server", False),
        write_hold_s=r.number(s, "write_hold_s", "server", 2.0, lo=0.0),
        tls_cert_file=r.str_(s, "tls_cert_file", "server"),
        tls_key_file=r.str_(s, "tls_key_file", "server"),
        tls_client_ca_file=r.str_(s, "tls_client_ca_file", "server"),
    )
    if server.port and server.port == server.admin_port and server.host == server.admin_host:
        r.fail("server.admin_port", "must differ from server.port")
    if (server.tls_cert_file is None) != (server.tls_key_file is None):
        r.fail("server.tls_key_file", "server.tls_cert_file and server.tls_key_file go together")
    if server.tls_client_ca_file is not None and server.tls_cert_file is None:
        r.fail("server.tls_client_ca_file", "needs server.tls_cert_file and server.tls_key_file (HTTPS)")
    return server


def _database(r: Reader, raw: Mapping[str, Any]) -> DatabaseConfig:
    if "database" not in raw:
        r.fail("database", "is required")
    d = r.section(raw, "database", {"dsn", "pool_min_size", "pool_max_size", "acquire_timeout_ms",
                                    "connect_timeout_ms", "pgbouncer_admin_dsn", "replicas", "admin_dsn"})
    database = DatabaseConfig(
        dsn=_dsn(r, d, "database", required="database" in raw),
        pool_min_size=r.int_(d, "pool_min_size", "database", 2, lo=0),
        pool_max_size=r.int_(d, "pool_max_size", "database", 20, lo=1),
        acquire_timeout_ms=r.int_(d, "acquire_timeout_ms", "database", 2000, lo=1),
        connect_timeout_ms=r.int_(d, "connect_timeout_ms", "database", 2000, lo=1),
        pgbouncer_admin_dsn=r.str_(d, "pgbouncer_admin_dsn", "database"),
        replicas=_replicas(r, d, "database"),
        admin_dsn=_admin_dsn(r, d, "database"),
    )
    return database


def _clusters(r: Reader, raw: Mapping[str, Any], database: DatabaseConfig) -> dict[str, ClusterConfig]:
    clusters = {DEFAULT_CLUSTER: ClusterConfig(DEFAULT_CLUSTER, database.dsn, database.replicas,
                                               database.admin_dsn)}
    raw_clusters = raw.get("clusters") or {}
    if not isinstance(raw_clusters, dict):
        r.fail("clusters", "must be a mapping of cluster name to {dsn, replicas}")
        return clusters
    for name, c in raw_clusters.items():
        path = f"clusters.{name}"
        if not isinstance(c, dict):
            r.fail(path, "must be a mapping with dsn and optional replicas")
            continue
        if name == DEFAULT_CLUSTER or not SLUG_RE.match(str(name)):
            r.fail(path, f"must be a lower-case name other than {DEFAULT_CLUSTER!r} (that is the database section)")
            continue
        r.unknown(c, {"dsn", "replicas", "admin_dsn"}, path)
        clusters[name] = ClusterConfig(name, _dsn(r, c, path, required=True), _replicas(r, c, path),
                                       _admin_dsn(r, c, path))
    return clusters


def _tenancy(r: Reader, raw: Mapping[str, Any]) -> TenancyConfig:
    t = r.section(raw, "tenancy", {"guc", "id_format", "header", "column", "schemas", "global_tables"})
    tenancy = TenancyConfig(
        guc=r.str_(t, "guc", "tenancy", default="app.tenant_id") or "app.tenant_id",
        id_format=r.str_(t, "id_format", "tenancy", default="uuid") or "uuid",
        header=r.str_(t, "header", "tenancy", default="X-Tenant-Id") or "X-Tenant-Id",
        column=r.str_(t, "column", "tenancy", default="tenant_id") or "tenant_id",
        schemas=tuple(_names(r, t, "schemas", "tenancy", default=("public",))),
        global_tables=tuple(_names(r, t, "global_tables", "tenancy")),
    )
    if not GUC_RE.match(tenancy.guc):
        r.fail("tenancy.guc", "must be a custom setting name like app.tenant_id (lower case, one dot)")
    if tenancy.id_format not in ("uuid", "slug"):
        r.fail("tenancy.id_format", f"must be uuid or slug, got {tenancy.id_format!r}")
    if not HEADER_RE.match(tenancy.header):
        r.fail("tenancy.header", "must be an HTTP header name")
    return tenancy


def _tenants(r: Reader, raw: Mapping[str, Any], defaults: Limits, id_format: str,
             clusters: Mapping[str, ClusterConfig]) -> dict[str, Limits]:
    tenants: dict[str, Limits] = {}
    raw_tenants = raw.get("tenants") or {}
    if not isinstance(raw_tenants, dict):
        r.fail("tenants", "must be a mapping of tenant id to limits")
        raw_tenants = {}
    if defaults.cluster not in clusters:
        r.fail("defaults.cluster", f"no cluster named {defaults.cluster!r}")
    for tid, override in raw_tenants.items():
        canon = canonical_tenant_id(str(tid), id_format)
        if canon is None:
            r.fail(f"tenants.{tid}", f"is not a valid {id_format} tenant id")
            continue
        if canon in tenants:
            r.fail(f"tenants.{tid}", "the same tenant is listed twice")
        tenants[canon] = _limits(r, override, f"tenants.{tid}", defaults)
        if tenants[canon].cluster not in clusters:
            r.fail(f"tenants.{tid}.cluster", f"no cluster named {tenants[canon].cluster!r} (see clusters)")
    return tenants


def _auth(r: Reader, raw: Mapping[str, Any], id_format: str, control: ControlConfig,
          server: ServerConfig) -> tuple[AuthConfig, AdminConfig]:
    a = r.section(raw, "auth", {"api_keys", "jwt"})
    auth = AuthConfig(api_keys=api_keys(r, a.get("api_keys"), id_format), jwt=jwt_config(r, a.get("jwt")))
    if not auth.api_keys and auth.jwt is None and control.dsn is None:
        r.fail("auth", "configure at least one of api_keys or jwt (or control.dsn, whose catalog holds keys)")
    admin = AdminConfig(tokens=admin_tokens(r, r.section(raw, "admin", {"tokens"}).get("tokens")))
    if not admin.tokens and not _loopback(server.admin_host):
        r.fail("admin.tokens", f"required when server.admin_host ({server.admin_host}) is not a loopback address: "
                               "every /admin route would be open to the network")
    return auth, admin


def _guard(r: Reader, raw: Mapping[str, Any]) -> GuardConfig:
    g = r.section(raw, "guard", {"deny_functions", "allow_functions", "allow_call", "cache_size"})
    return GuardConfig(
        deny_functions=frozenset(_names(r, g, "deny_functions", "guard")),
        allow_functions=frozenset(_names(r, g, "allow_functions", "guard")),
        allow_call=frozenset(_names(r, g, "allow_call", "guard")),
        cache_size=r.int_(g, "cache_size", "guard", 10000, lo=1),
    )


def _metrics(r: Reader, raw: Mapping[str, Any]) -> MetricsConfig:
    m = r.section(raw, "metrics", {"tenant_label_limit", "hotspot_window_s", "hotspot_share"})
    return MetricsConfig(
        tenant_label_limit=r.int_(m, "tenant_label_limit", "metrics", 50, lo=1, hi=10000),
        hotspot_window_s=r.int_(m, "hotspot_window_s", "metrics", 60, lo=1, hi=3600),
        hotspot_share=r.fraction(m, "hotspot_share", "metrics", 0.25),
    )


def _idempotency(r: Reader, raw: Mapping[str, Any]) -> IdempotencyConfig:
    i = r.section(raw, "idempotency", {"retention_s", "purge_interval_s"})
    return IdempotencyConfig(retention_s=r.int_(i, "retention_s", "idempotency", 86400, lo=1),
                             purge_interval_s=r.int_(i, "purge_interval_s", "idempotency", 300, lo=1))


def _logging(r: Reader, raw: Mapping[str, Any]) -> LoggingConfig:
    lg = r.section(raw, "logging", {"level", "access_log", "access_sample"})
    level = (r.str_(lg, "level", "logging", default="INFO") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.fail("logging.level", "must be DEBUG, INFO, WARNING or ERROR")
    return LoggingConfig(level=level, access_log=r.bool_(lg, "access_log", "logging", True),
                         access_sample=r.fraction(lg, "access_sample", "logging", 1.0))


def _fleet_limits(r: Reader, raw: Mapping[str, Any]) -> FleetLimitsConfig:
    section = r.section(raw, "limits", {"redis_url", "redis_timeout_ms"})
    url = r.str_(section, "redis_url", "limits", default=None)
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            r.fail("limits.redis_url", "must be redis://host[:port][/db], rediss://... or unix:///path "
                   f"(got {redact_dsn(url)!r})")
    return FleetLimitsConfig(redis_url=url,
                             redis_timeout_ms=r.int_(section, "redis_timeout_ms", "limits", 100, lo=1, hi=10000))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _control(r: Reader, raw: Mapping[str, Any], server: ServerConfig) -> ControlConfig:
    c = r.section(raw, "control", {"dsn", "lease_s", "heartbeat_s", "address"})
    if not c:
        return ControlConfig()
    dsn = _dsn(r, c, "control", required=True)
    lease = r.number(c, "lease_s", "control", 10.0, lo=1.0)
    heartbeat = r.number(c, "heartbeat_s", "control", min(2.0, lease / 5), lo=0.1)
    if heartbeat > lease / 2:
        r.fail("control.heartbeat_s", f"must be at most half of control.lease_s ({lease:g})")
    address = r.str_(c, "address", "control")
    return ControlConfig(dsn=dsn or None, lease_s=lease, heartbeat_s=heartbeat, address=address)


def load_config(path: str | Path, env: Mapping[str, str]) -> Settings:
    """Read and validate a YAML config file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {path}: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"(file): not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_config(raw, env)
