"""The settings as frozen, typed objects, and the constants their checks use (parse.py fills them in)."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
GUC_RE = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
HEADER_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ANY_TENANT = "*"
JWT_ALGORITHMS = frozenset({"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                            "PS256", "PS384", "PS512", "EdDSA"})


class ConfigError(Exception):
    """Every problem found in one config, each as ``key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def canonical_tenant_id(value: str, id_format: str) -> str | None:
    """Return the canonical form of a tenant id, or None when it is not valid.

    The canonical form is what the gateway quotes into ``SET LOCAL``; only ids that
    pass this check ever reach SQL text.  Cached: it runs on every request, and
    parsing a UUID costs more than the lookup.  No valid id is longer than 63
    characters, so longer values are refused before the cache, which then holds at
    most 16,384 short strings whatever callers send.
    """
    if len(value) > 63:
        return None
    return _canonical_tenant_id(value, id_format)


@functools.lru_cache(maxsize=16384)
def _canonical_tenant_id(value: str, id_format: str) -> str | None:
    if id_format == "uuid":
        if len(value) > 45:
            return None
        try:
            return str(uuid.UUID(value))
        except ValueError:
            return None
    return value if SLUG_RE.fullmatch(value) else None  # fullmatch: `$` alone lets a trailing newline through


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9090
    max_request_bytes: int = 1024 * 1024
    shutdown_timeout_s: float = 10.0
    drain_s: float = 0.0  # on SIGTERM, report not-ready this long before closing the listeners
    stream_threshold_rows: int = 1000  # larger results stream from a server-side cursor
    stream_batch_rows: int = 1000
    # A streaming client that takes longer than this to accept a batch is cut off: it
    # would hold a pooled connection in its transaction for as long as it stalls.
    stream_write_timeout_s: float = 30.0
    body_timeout_s: float = 10.0  # the whole request body must arrive within this
    # A connection's request head (request line and headers) must arrive within this of its
    # first byte (of the connection's opening, for the first request), else it is closed.
    header_timeout_s: float = 10.0
    # An idle keep-alive connection is closed after this (aiohttp's own default is an hour).
    keepalive_timeout_s: float = 75.0
    neon_sql_endpoint: bool = False  # POST /sql speaking Neon's serverless-driver HTTP protocol
    # A write that meets a move's pause waits this long for it to end, then runs where the
    # tenant now is (0: answer 503 tenant_moving at once).
    write_hold_s: float = 2.0
    # HTTPS on the data port (http/tls.py): a PEM certificate (chain) and its key; with a
    # client CA, every client must present a certificate it signed (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    dsn: str
    pool_min_size: int = 2
    pool_max_size: int = 20
    acquire_timeout_ms: int = 2000
    connect_timeout_ms: int = 2000
    # PgBouncer's admin console (database "pgbouncer"), read at scrape time when set.
    pgbouncer_admin_dsn: str | None = None
    # Streaming replicas (each behind its own PgBouncer) for read-only requests.
    replicas: tuple[str, ...] = ()
    # A direct connection (not through PgBouncer) as a role that may create publications and
    # subscriptions: `tenant-proxy move` uses it; nothing on the request path does.
    admin_dsn: str | None = None


DEFAULT_CLUSTER = "default"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One PostgreSQL cluster tenants can be placed on; pool settings come from `database`."""

    name: str
    dsn: str
    replicas: tuple[str, ...] = ()
    admin_dsn: str | None = None  # see DatabaseConfig.admin_dsn


@dataclass(frozen=True, slots=True)
class TenancyConfig:
    guc: str = "app.tenant_id"
    id_format: str = "uuid"
    header: str = "X-Tenant-Id"
    column: str = "tenant_id"
    schemas: tuple[str, ...] = ("public",)
    global_tables: tuple[str, ...] = ()


MAX_CONCURRENCY_AUTO = -1


@dataclass(frozen=True, slots=True)
class Limits:
    """Effective per-tenant limits (defaults merged with the tenant's overrides)."""

    statement_timeout_ms: int = 5000
    max_rows: int = 10000
    suspended: bool = False
    pin_metrics: bool = False  # always give this tenant its own metrics label
    # transactions in flight for the tenant; 0: no cap of its own; left out: half the
    # gateway's transaction slots (rounded up), so that one tenant cannot take them all
    max_concurrency: int = MAX_CONCURRENCY_AUTO
    rate_per_s: float = 0.0    # token bucket refill; 0: no rate limit
    burst: int = 1             # token bucket size (requests)
    queue_timeout_ms: int = 2000
    max_request_bytes: int = 1024 * 1024
    weight: float = 1.0        # share of pool slots when tenants compete (weighted round-robin)
    cluster: str = DEFAULT_CLUSTER  # where the tenant's data lives (`clusters`)
    max_response_bytes: int = 64 * 1024 * 1024  # a streamed result stops here ("truncated": true)
    moving: bool = False  # set by `tenant-proxy move` through the admin API: writes get 503 tenant_moving
    max_sql_bytes: int = 256 * 1024  # one statement's text; checked before it is parsed
    # How long one request may hold its database connection: every statement and the
    # streaming of its result.  0: the tenant's statement_timeout_ms.
    transaction_timeout_ms: int = 0

    @property
    def transaction_timeout_s(self) -> float:
        return (self.transaction_timeout_ms or self.statement_timeout_ms) / 1000


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str
    # None means "any tenant named in the header" (``tenants: ["*"]``).
    tenants: frozenset[str] | None
    expires_at: float | None = None  # Unix time after which the key no longer works (catalog keys)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    algorithms: tuple[str, ...]
    key: str
    issuer: str | None = None
    audience: str | None = None
    tenant_claim: str = "tenant_id"
    name_claim: str = "sub"
    leeway_s: int = 30
    # Keys from an identity provider: a JWKS URL, or "discover" ({issuer}/.well-known/openid-configuration).
    jwks_url: str | None = None
    jwks_refresh_s: int = 300      # refetch the key set this often
    jwks_min_refresh_s: int = 30   # an unknown kid refetches at most once per this many seconds


@dataclass(frozen=True, slots=True)
class AuthConfig:
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtConfig | None = None


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Operator additions to the SQL guard's built-in rules (function names, unqualified)."""

    deny_functions: frozenset[str] = frozenset()
    allow_functions: frozenset[str] = frozenset()
    allow_call: frozenset[str] = frozenset()
    cache_size: int = 10000


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    retention_s: int = 86400      # a key answers retries this long
    purge_interval_s: int = 300   # how often expired keys are deleted


@dataclass(frozen=True, slots=True)
class FleetLimitsConfig:
    """The ``limits`` section: where the fleet keeps its shared rate limits."""

    redis_url: str | None = None   # redis:// or rediss:// (or unix://); None: each instance its share
    redis_timeout_ms: int = 100    # a slower answer counts as Redis being down (the local share applies)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    tenant_label_limit: int = 50
    hotspot_window_s: int = 60
    hotspot_share: float = 0.25


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "INFO"
    access_log: bool = True
    access_sample: float = 1.0  # share of successful requests logged; errors are always logged


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The fleet's control catalog (proxy/control): None dsn means one instance, config file only."""

    dsn: str | None = None
    lease_s: float = 10.0      # a view older than this refuses writes (503 control_unavailable)
    heartbeat_s: float = 2.0   # how often an instance confirms its view and reports in
    address: str | None = None  # what GET /admin/fleet shows for this instance (default host:admin port)


@dataclass(frozen=True, slots=True)
class AdminToken:
    name: str
    sha256: str


@dataclass(frozen=True, slots=True)
class AdminConfig:
    # Bearer tokens for /admin/* (hashed like API keys); none: the admin port must be loopback.
    tokens: tuple[AdminToken, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    database: DatabaseConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    tenancy: TenancyConfig = field(default_factory=TenancyConfig)
    defaults: Limits = field(default_factory=Limits)
    tenants: Mapping[str, Limits] = field(default_factory=dict)
    auth: AuthConfig = field(default_factory=AuthConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    idempotency: IdempotencyConfig = field(default_factory=IdempotencyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fleet_limits: FleetLimitsConfig = field(default_factory=FleetLimitsConfig)
    # Every cluster, the `database` section's own as "default".
    clusters: Mapping[str, ClusterConfig] = field(default_factory=dict)
    control: ControlConfig = field(default_factory=ControlConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    # With a control catalog, `tenants` holds every registered tenant, and no other is served.
    tenant_registry: bool = False

    @property
    def pinned_tenants(self) -> frozenset[str]:
        return frozenset(t for t, limits in self.tenants.items() if limits.pin_metrics)

    def limits_for(self, tenant_id: str) -> Limits:
        return self.tenants.get(tenant_id, self.defaults)

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data with every secret replaced."""
        return {
            "server": _asdict(self.server),
            "database": {**_asdict(self.database), "dsn": redact_dsn(self.database.dsn),
                         "pgbouncer_admin_dsn": redact_dsn(self.database.pgbouncer_admin_dsn or "") or None,
                         "admin_dsn": redact_dsn(self.database.admin_dsn or "") or None,
                         "replicas": [redact_dsn(d) for d in self.database.replicas]},
            "clusters": {name: {"dsn": redact_dsn(c.dsn), "replicas": [redact_dsn(d) for d in c.replicas],
                                "admin_dsn": redact_dsn(c.admin_dsn or "") or None}
                         for name, c in self.clusters.items()},
            "tenancy": _asdict(self.tenancy),
            "defaults": _asdict(self.defaults),
            "tenants": {k: _asdict(v) for k, v in self.tenants.items()},
            "auth": {
                "api_keys": [
                    {"name": k.name, "sha256": "<redacted>",
                     "tenants": ["*"] if k.tenants is None else sorted(k.tenants)}
                    for k in self.auth.api_keys
                ],
                "jwt": None if self.auth.jwt is None else {**_asdict(self.auth.jwt), "key": "<redacted>"},
            },
            "guard": {k: sorted(v) if isinstance(v, frozenset) else v for k, v in _asdict(self.guard).items()},
            "metrics": _asdict(self.metrics),
            "idempotency": _asdict(self.idempotency),
            "logging": _asdict(self.logging),
            "limits": {**_asdict(self.fleet_limits),
                       "redis_url": redact_dsn(self.fleet_limits.redis_url or "") or None},
            "control": {**_asdict(self.control), "dsn": redact_dsn(self.control.dsn or "") or None},
            "admin": {"tokens": [{"name": t.name, "sha256": "<redacted>"} for t in self.admin.tokens]},
        }


def _asdict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in obj.__slots__:
        value = getattr(obj, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def redact_dsn(dsn: str) -> str:
    """Hide the password of a ``postgresql://user:password@host`` DSN."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1<redacted>@", dsn)


LIMIT_KEYS = frozenset({"statement_timeout_ms", "max_rows", "suspended", "pin_metrics", "max_concurrency",
                        "rate_per_s", "burst", "queue_timeout_ms", "max_request_bytes", "weight", "cluster",
                        "max_response_bytes", "moving", "max_sql_bytes", "transaction_timeout_ms"})


# Settings a reload reads but cannot apply: the listening sockets, aiohttp's body limit and
# shutdown timeout, and the keep-alive timeout are fixed when the gateway starts.
RESTART_KEYS = (("server", "host"), ("server", "port"), ("server", "admin_host"), ("server", "admin_port"),
                ("server", "max_request_bytes"), ("server", "shutdown_timeout_s"), ("server", "keepalive_timeout_s"))


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """The keys among ``RESTART_KEYS`` whose value a reload changed (they keep the old one)."""
    return [f"{section}.{key}" for section, key in RESTART_KEYS
            if getattr(getattr(old, section), key) != getattr(getattr(new, section), key)]
