"""What one instance holds of the catalog, how it is read, and how it becomes settings.

The view is read in one REPEATABLE READ snapshot: the catalog version and every tenant
and key row changed after the version the instance had (all of them on a full resync).
:func:`overlay` puts it over the config file's settings: the catalog's tenants (each
one's limits over the file's defaults) and its keys replace the file's, and only
registered tenants are served.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ..config import ApiKey, ConfigError, Limits, Settings, parse_limits
from .schema import SCHEMA

log = logging.getLogger("tenant_proxy.control")


@dataclass(frozen=True, slots=True)
class TenantEntry:
    id: str
    state: str
    cluster: str
    limits: dict[str, Any]
    version: int


@dataclass(frozen=True, slots=True)
class KeyEntry:
    name: str
    sha256: str
    tenants: frozenset[str] | None
    expires_at: float | None
    revoked: bool
    previous_sha256: str | None
    previous_expires_at: float | None
    version: int

    def api_keys(self) -> list[ApiKey]:
        if self.revoked:
            return []
        keys = [ApiKey(self.name, self.sha256, self.tenants, self.expires_at)]
        if self.previous_sha256 is not None:
            keys.append(ApiKey(self.name, self.previous_sha256, self.tenants, self.previous_expires_at))
        return keys


@dataclass(slots=True)
class View:
    version: int = 0
    tenants: dict[str, TenantEntry] = field(default_factory=dict)
    keys: dict[str, KeyEntry] = field(default_factory=dict)


_TENANTS = f"SELECT id, state, cluster, limits::text AS limits, version FROM {SCHEMA}.tenants WHERE version > $1"
_KEYS = (f"SELECT name, sha256, tenants, extract(epoch FROM expires_at)::float8 AS expires_at, "
         "revoked_at IS NOT NULL AS revoked, previous_sha256, "
         "extract(epoch FROM previous_expires_at)::float8 AS previous_expires_at, version "
         f"FROM {SCHEMA}.api_keys WHERE version > $1")


async def read(conn: Any, view: View | None) -> View:
    """The view brought up to the catalog's version: only what changed since ``view``, or
    everything when ``view`` is None.  ``view`` itself is not modified."""
    since = 0 if view is None else view.version
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        version = int(await conn.fetchval(f"SELECT version FROM {SCHEMA}.meta"))
        if view is not None and version == view.version:
            return view
        tenant_rows = await conn.fetch(_TENANTS, since)
        key_rows = await conn.fetch(_KEYS, since)
    tenants = {} if view is None else dict(view.tenants)
    keys = {} if view is None else dict(view.keys)
    for r in tenant_rows:
        tenants[r["id"]] = TenantEntry(r["id"], r["state"], r["cluster"], json.loads(r["limits"]), r["version"])
    for r in key_rows:
        keys[r["name"]] = KeyEntry(r["name"], r["sha256"], None if r["tenants"] is None else frozenset(r["tenants"]),
                                   r["expires_at"], r["revoked"], r["previous_sha256"], r["previous_expires_at"],
                                   r["version"])
    return View(version, tenants, keys)


class Overlay:
    """Builds settings from a file's settings and a view, re-checking only the tenants
    whose row (or the file's defaults) changed since the last build."""

    def __init__(self) -> None:
        self._limits: dict[str, tuple[int, Limits, Limits]] = {}  # id -> (row version, defaults, limits)

    def __call__(self, base: Settings, view: View) -> Settings:
        tenants: dict[str, Limits] = {}
        for tid, entry in view.tenants.items():
            cached = self._limits.get(tid)
            if cached is not None and cached[0] == entry.version and cached[1] is base.defaults:
                tenants[tid] = cached[2]
                continue
            limits = self._effective(base, entry)
            self._limits[tid] = (entry.version, base.defaults, limits)
            tenants[tid] = limits
        keys = tuple(k for entry in view.keys.values() for k in entry.api_keys())
        return dataclasses.replace(base, tenants=tenants, auth=dataclasses.replace(base.auth, api_keys=keys),
                                   tenant_registry=True)

    @staticmethod
    def _effective(base: Settings, entry: TenantEntry) -> Limits:
        try:
            limits = parse_limits(entry.limits, base.defaults, path=f"tenant {entry.id}")
        except ConfigError as exc:  # written by another version of the tool: serve the defaults
            log.error("catalog limits of tenant %s not understood (%s); using the defaults", entry.id,
                      "; ".join(exc.problems))
            limits = base.defaults
        if entry.cluster not in base.clusters:
            log.error("tenant %s is placed on cluster %r, which this instance's config lacks", entry.id, entry.cluster)
        return dataclasses.replace(limits, cluster=entry.cluster, suspended=entry.state == "suspended",
                                   moving=entry.state == "moving")
