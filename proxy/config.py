"""YAML configuration -> frozen, validated settings.

Everything is checked here, once, at load time: a problem is reported with the key
path it sits at (``database.pool_max_size: must be >= pool_min_size``) and every
problem in the file is reported together.  Nothing reads YAML or the environment at
request time; a reload builds a new :class:`Settings` and swaps it whole.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    pass this check ever reach SQL text.
    """
    if id_format == "uuid":
        if len(value) > 45:
            return None
        try:
            return str(uuid.UUID(value))
        except ValueError:
            return None
    return value if SLUG_RE.match(value) else None


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
    body_timeout_s: float = 10.0  # the whole request body must arrive within this
    neon_sql_endpoint: bool = False  # POST /sql speaking Neon's serverless-driver HTTP protocol


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


DEFAULT_CLUSTER = "default"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """One PostgreSQL cluster tenants can be placed on; pool settings come from `database`."""

    name: str
    dsn: str
    replicas: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TenancyConfig:
    guc: str = "app.tenant_id"
    id_format: str = "uuid"
    header: str = "X-Tenant-Id"
    column: str = "tenant_id"
    schemas: tuple[str, ...] = ("public",)
    global_tables: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    """Effective per-tenant limits (defaults merged with the tenant's overrides)."""

    statement_timeout_ms: int = 5000
    max_rows: int = 10000
    suspended: bool = False
    pin_metrics: bool = False  # always give this tenant its own metrics label
    max_concurrency: int = 0   # transactions in flight for the tenant; 0: no cap of its own
    rate_per_s: float = 0.0    # token bucket refill; 0: no rate limit
    burst: int = 1             # token bucket size (requests)
    queue_timeout_ms: int = 2000
    max_request_bytes: int = 1024 * 1024
    weight: float = 1.0        # share of pool slots when tenants compete (weighted round-robin)
    cluster: str = DEFAULT_CLUSTER  # where the tenant's data lives (`clusters`)
    max_response_bytes: int = 64 * 1024 * 1024  # a streamed result stops here ("truncated": true)
    moving: bool = False  # set by `tenant-proxy move` through the admin API: writes get 503 tenant_moving


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str
    # None means "any tenant named in the header" (``tenants: ["*"]``).
    tenants: frozenset[str] | None


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
    # Every cluster, the `database` section's own as "default".
    clusters: Mapping[str, ClusterConfig] = field(default_factory=dict)

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
                         "replicas": [redact_dsn(d) for d in self.database.replicas]},
            "clusters": {name: {"dsn": redact_dsn(c.dsn), "replicas": [redact_dsn(d) for d in c.replicas]}
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


class _Reader:
    """Walks the raw YAML, collecting problems by key path instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def section(self, raw: Mapping[str, Any], key: str, allowed: AbstractSet[str]) -> dict[str, Any]:
        value = raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping")
            return {}
        self.unknown(value, allowed, key)
        return value

    def unknown(self, raw: Mapping[str, Any], allowed: AbstractSet[str], path: str) -> None:
        for k in raw:
            if k not in allowed:
                self.fail(f"{path}.{k}" if path else str(k), f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def expand(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            return value

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in self.env:
                self.fail(path, f"environment variable {name} is not set")
                return ""
            return self.env[name]

        return ENV_RE.sub(sub, value)

    def str_(self, raw: Mapping[str, Any], key: str, path: str, default: str | None = None,
             required: bool = False) -> str | None:
        value = self.expand(raw.get(key), f"{path}.{key}")
        if value is None:
            if required:
                self.fail(f"{path}.{key}", "is required")
            return default
        if not isinstance(value, str) or not value:
            self.fail(f"{path}.{key}", "must be a non-empty string")
            return default
        return value

    def int_(self, raw: Mapping[str, Any], key: str, path: str, default: int, lo: int = 0,
             hi: int | None = None) -> int:
        value = self.expand(raw.get(key, default), f"{path}.{key}")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{path}.{key}", f"must be an integer, got {type(value).__name__}")
            return default
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            self.fail(f"{path}.{key}", f"must be {bound}, got {value}")
            return default
        return value

    def number(self, raw: Mapping[str, Any], key: str, path: str, default: float, lo: float) -> float:
        value = self.expand(raw.get(key, default), f"{path}.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo:
            self.fail(f"{path}.{key}", f"must be a number >= {lo:g}")
            return default
        return float(value)

    def fraction(self, raw: Mapping[str, Any], key: str, path: str, default: float) -> float:
        value = self.expand(raw.get(key, default), f"{path}.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            self.fail(f"{path}.{key}", "must be a number between 0 and 1")
            return default
        return float(value)

    def bool_(self, raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = self.expand(raw.get(key, default), f"{path}.{key}")
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            self.fail(f"{path}.{key}", "must be true or false")
            return default
        return value


LIMIT_KEYS = frozenset({"statement_timeout_ms", "max_rows", "suspended", "pin_metrics", "max_concurrency",
                        "rate_per_s", "burst", "queue_timeout_ms", "max_request_bytes", "weight", "cluster",
                        "max_response_bytes", "moving"})


def _limits(r: _Reader, raw: Any, path: str, base: Limits) -> Limits:
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
    )


def parse_limits(raw: Any, base: Limits, path: str = "limits") -> Limits:
    """Validate one tenant's limit overrides (for the admin API); raise ConfigError."""
    r = _Reader({})
    limits = _limits(r, raw, path, base)
    if r.problems:
        raise ConfigError(r.problems)
    return limits


def _api_keys(r: _Reader, raw: Any, id_format: str) -> tuple[ApiKey, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.fail("auth.api_keys", "must be a list")
        return ()
    keys: list[ApiKey] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for i, item in enumerate(raw):
        path = f"auth.api_keys[{i}]"
        if not isinstance(item, dict):
            r.fail(path, "must be a mapping")
            continue
        r.unknown(item, {"name", "sha256", "tenant", "tenants"}, path)
        name = r.str_(item, "name", path, required=True) or f"key{i}"
        digest = (r.str_(item, "sha256", path, required=True) or "").lower()
        if digest and not SHA256_RE.match(digest):
            r.fail(f"{path}.sha256", "must be 64 hex characters (see `tenant-proxy hash-key`)")
        if name in seen_names:
            r.fail(f"{path}.name", f"duplicate key name {name!r}")
        if digest in seen_hashes:
            r.fail(f"{path}.sha256", "the same key is listed twice")
        seen_names.add(name)
        seen_hashes.add(digest)
        tenants = _key_tenants(r, item, path, id_format)
        keys.append(ApiKey(name=name, sha256=digest, tenants=tenants))
    return tuple(keys)


def _key_tenants(r: _Reader, item: Mapping[str, Any], path: str, id_format: str) -> frozenset[str] | None:
    if ("tenant" in item) == ("tenants" in item):
        r.fail(path, "needs exactly one of `tenant` (one id) or `tenants` (a list, or [\"*\"])")
        return frozenset()
    if "tenant" in item:
        values = [r.expand(item["tenant"], f"{path}.tenant")]
        where = f"{path}.tenant"
    else:
        values = item["tenants"]
        where = f"{path}.tenants"
        if not isinstance(values, list) or not values:
            r.fail(where, "must be a non-empty list")
            return frozenset()
        if ANY_TENANT in values:
            if len(values) > 1:
                r.fail(where, '"*" must stand alone')
            return None
    out: set[str] = set()
    for v in values:
        canon = canonical_tenant_id(v, id_format) if isinstance(v, str) else None
        if canon is None:
            r.fail(where, f"{v!r} is not a valid {id_format} tenant id")
        else:
            out.add(canon)
    return frozenset(out)


def _jwt(r: _Reader, raw: Any) -> JwtConfig | None:
    if raw is None:
        return None
    path = "auth.jwt"
    if not isinstance(raw, dict):
        r.fail(path, "must be a mapping")
        return None
    r.unknown(raw, {"algorithms", "secret_env", "secret", "public_key_file", "jwks_file", "jwks_url", "issuer",
                    "audience", "tenant_claim", "name_claim", "leeway_s", "jwks_refresh_s", "jwks_min_refresh_s"},
              path)
    algs = raw.get("algorithms", ["HS256"])
    if not isinstance(algs, list) or not algs or not all(isinstance(a, str) for a in algs):
        r.fail(f"{path}.algorithms", "must be a non-empty list of algorithm names")
        algs = ["HS256"]
    for a in algs:
        if a not in JWT_ALGORITHMS:
            r.fail(f"{path}.algorithms", f"unsupported algorithm {a!r} (allowed: {', '.join(sorted(JWT_ALGORITHMS))})")
    sources = [k for k in ("secret_env", "secret", "public_key_file", "jwks_file", "jwks_url") if k in raw]
    key = ""
    jwks_url = None
    if len(sources) != 1:
        r.fail(path, "needs exactly one of secret_env, secret, public_key_file, jwks_file, jwks_url")
    elif sources[0] == "jwks_url":
        jwks_url = _jwks_url(r, raw, path)
    elif sources[0] == "secret_env":
        var = raw["secret_env"]
        if not isinstance(var, str) or var not in r.env or not r.env[var]:
            r.fail(f"{path}.secret_env", f"environment variable {var} is not set")
        else:
            key = r.env[var]
    elif sources[0] == "secret":
        key = r.str_(raw, "secret", path, required=True) or ""
    else:
        fname = r.str_(raw, sources[0], path, required=True)
        if fname:
            try:
                key = Path(fname).read_text()
            except OSError as exc:
                r.fail(f"{path}.{sources[0]}", f"cannot read {fname}: {exc.strerror}")
    symmetric = any(a.startswith("HS") for a in algs)
    if symmetric and sources and sources[0] in ("public_key_file", "jwks_file", "jwks_url"):
        r.fail(f"{path}.algorithms", "HS* algorithms need a shared secret, not a public key")
    if not symmetric and sources and sources[0] in ("secret_env", "secret"):
        r.fail(f"{path}.algorithms", "asymmetric algorithms need public_key_file, jwks_file or jwks_url")
    for k in ("jwks_refresh_s", "jwks_min_refresh_s"):
        if k in raw and jwks_url is None:
            r.fail(f"{path}.{k}", "applies only with jwks_url")
    if symmetric and key and len(key) < 32:
        r.fail(f"{path}.{sources[0]}", "an HMAC secret must be at least 32 characters")
    return JwtConfig(
        algorithms=tuple(algs),
        key=key,
        issuer=r.str_(raw, "issuer", path),
        audience=r.str_(raw, "audience", path),
        tenant_claim=r.str_(raw, "tenant_claim", path, default="tenant_id") or "tenant_id",
        name_claim=r.str_(raw, "name_claim", path, default="sub") or "sub",
        leeway_s=r.int_(raw, "leeway_s", path, 30, lo=0, hi=600),
        jwks_url=jwks_url,
        jwks_refresh_s=r.int_(raw, "jwks_refresh_s", path, 300, lo=1, hi=86400),
        jwks_min_refresh_s=r.int_(raw, "jwks_min_refresh_s", path, 30, lo=0, hi=3600),
    )


def _jwks_url(r: _Reader, raw: Mapping[str, Any], path: str) -> str | None:
    """An http(s) URL serving a JWKS, or "discover": the issuer's OpenID configuration names it."""
    url = r.str_(raw, "jwks_url", path, required=True)
    if url is None:
        return None
    if url == "discover":
        issuer = r.expand(raw.get("issuer"), f"{path}.issuer")
        if not isinstance(issuer, str) or not issuer.startswith(("https://", "http://")):
            r.fail(f"{path}.jwks_url", "\"discover\" needs auth.jwt.issuer set to the provider's http(s) URL")
        return url
    if not url.startswith(("https://", "http://")):
        r.fail(f"{path}.jwks_url", "must be an http(s) URL or \"discover\"")
    return url


def _names(r: _Reader, raw: Mapping[str, Any], key: str, section: str,
           default: tuple[str, ...] = ()) -> list[str]:
    value = raw.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        r.fail(f"{section}.{key}", "must be a list of names")
        return list(default)
    return value


def _dsn(r: _Reader, raw: Mapping[str, Any], path: str, required: bool) -> str:
    dsn = r.str_(raw, "dsn", path, required=required) or ""
    if dsn and not dsn.startswith(("postgresql://", "postgres://")):
        r.fail(f"{path}.dsn", "must be a postgresql:// URL")
    return dsn


def _replicas(r: _Reader, raw: Mapping[str, Any], path: str) -> tuple[str, ...]:
    value = raw.get("replicas", [])
    if not isinstance(value, list):
        r.fail(f"{path}.replicas", "must be a list of postgresql:// URLs")
        return ()
    out = []
    for i, item in enumerate(value):
        dsn = r.expand(item, f"{path}.replicas[{i}]")
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            r.fail(f"{path}.replicas[{i}]", "must be a postgresql:// URL")
        else:
            out.append(dsn)
    return tuple(out)


def parse_config(raw: Any, env: Mapping[str, str]) -> Settings:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    r = _Reader(env)
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): must be a mapping"])
    r.unknown(raw, {"server", "database", "clusters", "tenancy", "defaults", "tenants", "auth", "guard", "metrics",
                    "idempotency", "logging"}, "")

    s = r.section(raw, "server", {"host", "port", "admin_host", "admin_port", "max_request_bytes",
                                  "shutdown_timeout_s", "body_timeout_s", "drain_s", "stream_threshold_rows",
                                  "stream_batch_rows", "neon_sql_endpoint"})
    server = ServerConfig(
        host=r.str_(s, "host", "server", default="127.0.0.1") or "127.0.0.1",
        port=r.int_(s, "port", "server", 8080, lo=0, hi=65535),
        admin_host=r.str_(s, "admin_host", "server", default="127.0.0.1") or "127.0.0.1",
        admin_port=r.int_(s, "admin_port", "server", 9090, lo=0, hi=65535),
        max_request_bytes=r.int_(s, "max_request_bytes", "server", 1024 * 1024, lo=1024),
        shutdown_timeout_s=float(r.int_(s, "shutdown_timeout_s", "server", 10, lo=0, hi=3600)),
        body_timeout_s=r.number(s, "body_timeout_s", "server", 10.0, lo=0.1),
        drain_s=r.number(s, "drain_s", "server", 0.0, lo=0.0),
        stream_threshold_rows=r.int_(s, "stream_threshold_rows", "server", 1000, lo=1),
        stream_batch_rows=r.int_(s, "stream_batch_rows", "server", 1000, lo=1),
        neon_sql_endpoint=r.bool_(s, "neon_sql_endpoint", "server", False),
    )
    if server.port and server.port == server.admin_port and server.host == server.admin_host:
        r.fail("server.admin_port", "must differ from server.port")

    if "database" not in raw:
        r.fail("database", "is required")
    d = r.section(raw, "database", {"dsn", "pool_min_size", "pool_max_size", "acquire_timeout_ms",
                                    "connect_timeout_ms", "pgbouncer_admin_dsn", "replicas"})
    dsn = _dsn(r, d, "database", required="database" in raw)
    database = DatabaseConfig(
        dsn=dsn,
        pool_min_size=r.int_(d, "pool_min_size", "database", 2, lo=0),
        pool_max_size=r.int_(d, "pool_max_size", "database", 20, lo=1),
        acquire_timeout_ms=r.int_(d, "acquire_timeout_ms", "database", 2000, lo=1),
        connect_timeout_ms=r.int_(d, "connect_timeout_ms", "database", 2000, lo=1),
        pgbouncer_admin_dsn=r.str_(d, "pgbouncer_admin_dsn", "database"),
        replicas=_replicas(r, d, "database"),
    )
    clusters = {DEFAULT_CLUSTER: ClusterConfig(DEFAULT_CLUSTER, database.dsn, database.replicas)}
    raw_clusters = raw.get("clusters") or {}
    if not isinstance(raw_clusters, dict):
        r.fail("clusters", "must be a mapping of cluster name to {dsn, replicas}")
        raw_clusters = {}
    for name, c in raw_clusters.items():
        path = f"clusters.{name}"
        if not isinstance(c, dict):
            r.fail(path, "must be a mapping with dsn and optional replicas")
            continue
        if name == DEFAULT_CLUSTER or not SLUG_RE.match(str(name)):
            r.fail(path, f"must be a lower-case name other than {DEFAULT_CLUSTER!r} (that is the database section)")
            continue
        r.unknown(c, {"dsn", "replicas"}, path)
        clusters[name] = ClusterConfig(name, _dsn(r, c, path, required=True), _replicas(r, c, path))
    if database.pool_min_size > database.pool_max_size:
        r.fail("database.pool_min_size", f"must be <= pool_max_size ({database.pool_max_size})")

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

    defaults = _limits(r, raw.get("defaults"), "defaults", Limits())
    id_format = tenancy.id_format if tenancy.id_format in ("uuid", "slug") else "uuid"
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

    a = r.section(raw, "auth", {"api_keys", "jwt"})
    auth = AuthConfig(api_keys=_api_keys(r, a.get("api_keys"), id_format), jwt=_jwt(r, a.get("jwt")))
    if not auth.api_keys and auth.jwt is None:
        r.fail("auth", "configure at least one of api_keys or jwt")

    g = r.section(raw, "guard", {"deny_functions", "allow_functions", "allow_call", "cache_size"})
    guard = GuardConfig(
        deny_functions=frozenset(_names(r, g, "deny_functions", "guard")),
        allow_functions=frozenset(_names(r, g, "allow_functions", "guard")),
        allow_call=frozenset(_names(r, g, "allow_call", "guard")),
        cache_size=r.int_(g, "cache_size", "guard", 10000, lo=1),
    )

    m = r.section(raw, "metrics", {"tenant_label_limit", "hotspot_window_s", "hotspot_share"})
    metrics = MetricsConfig(
        tenant_label_limit=r.int_(m, "tenant_label_limit", "metrics", 50, lo=1, hi=10000),
        hotspot_window_s=r.int_(m, "hotspot_window_s", "metrics", 60, lo=1, hi=3600),
        hotspot_share=r.fraction(m, "hotspot_share", "metrics", 0.25),
    )

    i = r.section(raw, "idempotency", {"retention_s", "purge_interval_s"})
    idem = IdempotencyConfig(retention_s=r.int_(i, "retention_s", "idempotency", 86400, lo=1),
                             purge_interval_s=r.int_(i, "purge_interval_s", "idempotency", 300, lo=1))

    lg = r.section(raw, "logging", {"level", "access_log", "access_sample"})
    level = (r.str_(lg, "level", "logging", default="INFO") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.fail("logging.level", "must be DEBUG, INFO, WARNING or ERROR")
    logging = LoggingConfig(level=level, access_log=r.bool_(lg, "access_log", "logging", True),
                            access_sample=r.fraction(lg, "access_sample", "logging", 1.0))

    if r.problems:
        raise ConfigError(r.problems)
    return Settings(database=database, server=server, tenancy=tenancy, defaults=defaults, tenants=tenants,
                    auth=auth, guard=guard, metrics=metrics, idempotency=idem, logging=logging, clusters=clusters)


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
