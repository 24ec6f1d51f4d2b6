"""Every write to the control catalog, and the reads the admin API and the CLI show.

Each change is one transaction that bumps the catalog version, writes the rows with that
version, appends who changed what (before and after) to the change log, and NOTIFYs the
fleet; PostgreSQL delivers the notification at COMMIT, so an instance never hears of a
change it cannot read yet.  Values are checked here, before anything is written: a bad
tenant id, cluster, limit or key name is a CatalogError saying what is wrong.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from typing import Any

from ..config import LIMIT_KEYS, ConfigError, Limits, Settings, canonical_tenant_id, parse_limits
from .schema import CHANNEL, SCHEMA, CatalogError, CatalogNotFound

STATES = ("active", "suspended", "moving")
# Limits the catalog keeps as columns of their own, not in the limits object.
PLACEMENT_KEYS = frozenset({"suspended", "moving", "cluster"})
STORED_LIMITS = LIMIT_KEYS - PLACEMENT_KEYS


def _iso(value: datetime.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def tenant_row(r: Mapping[str, Any]) -> dict[str, Any]:
    limits = r["limits"]
    return {"id": r["id"], "state": r["state"], "cluster": r["cluster"],
            "limits": json.loads(limits) if isinstance(limits, str) else dict(limits)}


def key_row(r: Mapping[str, Any]) -> dict[str, Any]:
    """A key as the catalog shows it: never its hash."""
    return {"name": r["name"], "tenants": ["*"] if r["tenants"] is None else list(r["tenants"]),
            "created_at": _iso(r["created_at"]), "expires_at": _iso(r["expires_at"]),
            "revoked_at": _iso(r["revoked_at"]),
            "previous_valid_until": _iso(r["previous_expires_at"]) if r["previous_sha256"] else None}


def overrides_of(limits: Limits, defaults: Limits) -> dict[str, Any]:
    """The stored limits that differ from the defaults (what a config file's entry said)."""
    return {k: getattr(limits, k) for k in sorted(STORED_LIMITS) if getattr(limits, k) != getattr(defaults, k)}


class Catalog:
    """The catalog as seen by one writer: ``conn`` a direct asyncpg connection, the
    config's clusters, tenant id format and default limits to check values against."""

    def __init__(self, conn: Any, settings: Settings) -> None:
        self.conn = conn
        self.settings = settings

    # ------------------------------------------------------------------ checks
    def tenant_id(self, value: str) -> str:
        fmt = self.settings.tenancy.id_format
        tid = canonical_tenant_id(value.strip(), fmt) if isinstance(value, str) else None
        if tid is None:
            raise CatalogError(f"{value!r} is not a valid {fmt} tenant id (tenancy.id_format)")
        return tid

    def _cluster(self, name: str) -> str:
        if name not in self.settings.clusters:
            known = ", ".join(sorted(self.settings.clusters))
            raise CatalogError(f"no cluster named {name!r} in the config (known: {known})")
        return name

    def _limits(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """Check stored limits against the defaults; returns them as given."""
        extra = sorted(set(stored) - STORED_LIMITS)
        if extra:
            raise CatalogError(f"not a limit the catalog stores: {', '.join(extra)}")
        try:
            parse_limits(dict(stored), self.settings.defaults, path="limits")
        except ConfigError as exc:
            raise CatalogError("invalid limits: " + "; ".join(exc.problems)) from None
        return dict(stored)

    # ------------------------------------------------------------------ the change transaction
    async def _begin_change(self) -> int:
        return int(await self.conn.fetchval(f"UPDATE {SCHEMA}.meta SET version = version + 1 RETURNING version"))

    async def _record(self, version: int, actor: str, kind: str, subject: str,
                      before: Any, after: Any) -> None:
        await self.conn.execute(
            f"INSERT INTO {SCHEMA}.changes (actor, kind, subject, before, after, version) "
            "VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6)",
            actor, kind, subject, None if before is None else json.dumps(before),
            None if after is None else json.dumps(after), version)
        await self.conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(version))

    async def version(self) -> int:
        return int(await self.conn.fetchval(f"SELECT version FROM {SCHEMA}.meta"))

    # ------------------------------------------------------------------ tenants
    async def tenant(self, tid: str) -> dict[str, Any] | None:
        r = await self.conn.fetchrow(f"SELECT * FROM {SCHEMA}.tenants WHERE id = $1", tid)
        return None if r is None else tenant_row(r)

    async def tenants(self) -> list[dict[str, Any]]:
        return [tenant_row(r) for r in await self.conn.fetch(f"SELECT * FROM {SCHEMA}.tenants ORDER BY id")]

    async def _require_tenant(self, tid: str, lock: bool = False) -> dict[str, Any]:
        r = await self.conn.fetchrow(f"SELECT * FROM {SCHEMA}.tenants WHERE id = $1{' FOR UPDATE' if lock else ''}",
                                     tid)
        if r is None:
            raise CatalogNotFound(f"tenant {tid} is not registered (`tenant-proxy tenants add --tenant {tid}`)")
        return tenant_row(r)

    async def add_tenant(self, actor: str, tid: str, cluster: str | None = None,
                         limits: Mapping[str, Any] | None = None) -> dict[str, Any]:
        tid = self.tenant_id(tid)
        row = {"id": tid, "state": "active", "cluster": self._cluster(cluster or self.settings.defaults.cluster),
               "limits": self._limits(limits or {})}
        async with self.conn.transaction():
            if await self.conn.fetchval(f"SELECT 1 FROM {SCHEMA}.tenants WHERE id = $1", tid):
                raise CatalogError(f"tenant {tid} is already registered")
            version = await self._begin_change()
            await self._insert_tenant(row, version)
            await self._record(version, actor, "tenant.add", tid, None, row)
        return row

    async def _insert_tenant(self, row: Mapping[str, Any], version: int) -> None:
        await self.conn.execute(
            f"INSERT INTO {SCHEMA}.tenants (id, state, cluster, limits, version) VALUES ($1, $2, $3, $4::jsonb, $5)",
            row["id"], row["state"], row["cluster"], json.dumps(row["limits"]), version)

    async def update_tenant(self, actor: str, tid: str, *, state: str | None = None, cluster: str | None = None,
                            limits: Mapping[str, Any] | None = None,
                            expect_state: tuple[str, ...] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Change a registered tenant's state, placement or limits (merged over its own);
        (before, after).  ``expect_state``: refuse unless the tenant is in one of those states now."""
        tid = self.tenant_id(tid)
        if state is not None and state not in STATES:
            raise CatalogError(f"state must be one of {', '.join(STATES)}")
        if cluster is not None:
            self._cluster(cluster)
        async with self.conn.transaction():
            before = await self._require_tenant(tid, lock=True)
            if expect_state is not None and before["state"] not in expect_state:
                raise CatalogError(f"tenant {tid} is {before['state']}, not {' or '.join(expect_state)}")
            after = {**before, "state": state or before["state"], "cluster": cluster or before["cluster"],
                     "limits": self._limits({**before["limits"], **(limits or {})})}
            if after == before:
                return before, after
            version = await self._begin_change()
            await self.conn.execute(
                f"UPDATE {SCHEMA}.tenants SET state = $2, cluster = $3, limits = $4::jsonb, version = $5 "
                "WHERE id = $1", tid, after["state"], after["cluster"], json.dumps(after["limits"]), version)
            await self._record(version, actor, "tenant.update", tid, before, after)
        return before, after

    # ------------------------------------------------------------------ API keys
    async def keys(self) -> list[dict[str, Any]]:
        return [key_row(r) for r in await self.conn.fetch(f"SELECT * FROM {SCHEMA}.api_keys ORDER BY name")]

    async def _key_tenants(self, tenants: Iterable[str]) -> list[str] | None:
        values = list(tenants)
        if values == ["*"]:
            return None
        if not values or "*" in values:
            raise CatalogError('a key needs --tenant ID (repeatable), or "*" alone for any registered tenant')
        out = sorted({self.tenant_id(v) for v in values})
        known = {r["id"] for r in await self.conn.fetch(f"SELECT id FROM {SCHEMA}.tenants WHERE id = ANY($1)", out)}
        missing = [t for t in out if t not in known]
        if missing:
            raise CatalogError(f"tenant {missing[0]} is not registered (`tenant-proxy tenants add --tenant "
                               f"{missing[0]}`)")
        return out

    async def add_key(self, actor: str, name: str, sha256: str, tenants: Iterable[str],
                      expires_at: datetime.datetime | None = None) -> dict[str, Any]:
        if not name or len(name) > 128 or not name.isprintable():
            raise CatalogError("a key name must be 1 to 128 printable characters")
        async with self.conn.transaction():
            allowed = await self._key_tenants(tenants)
            if await self.conn.fetchval(f"SELECT 1 FROM {SCHEMA}.api_keys WHERE name = $1", name):
                raise CatalogError(f"a key named {name!r} exists already (`keys rotate --name {name}` replaces it)")
            if await self.conn.fetchval(f"SELECT 1 FROM {SCHEMA}.api_keys WHERE sha256 = $1 OR previous_sha256 = $1",
                                        sha256):
                raise CatalogError("that key is already in the catalog under another name")
            version = await self._begin_change()
            r = await self.conn.fetchrow(
                f"INSERT INTO {SCHEMA}.api_keys (name, sha256, tenants, expires_at, version) "
                "VALUES ($1, $2, $3, $4, $5) RETURNING *", name, sha256, allowed, expires_at, version)
            after = key_row(r)
            await self._record(version, actor, "key.add", name, None, after)
        return after

    async def _require_key(self, name: str) -> Any:
        r = await self.conn.fetchrow(f"SELECT * FROM {SCHEMA}.api_keys WHERE name = $1 FOR UPDATE", name)
        if r is None:
            raise CatalogNotFound(f"no key named {name!r} (`tenant-proxy keys list`)")
        return r

    async def revoke_key(self, actor: str, name: str) -> dict[str, Any]:
        async with self.conn.transaction():
            before = await self._require_key(name)
            if before["revoked_at"] is not None:
                raise CatalogError(f"key {name!r} was revoked already, at {before['revoked_at'].isoformat()}")
            version = await self._begin_change()
            r = await self.conn.fetchrow(
                f"UPDATE {SCHEMA}.api_keys SET revoked_at = now(), previous_sha256 = NULL, "
                "previous_expires_at = NULL, version = $2 WHERE name = $1 RETURNING *", name, version)
            after = key_row(r)
            await self._record(version, actor, "key.revoke", name, key_row(before), after)
        return after

    async def rotate_key(self, actor: str, name: str, sha256: str, grace_s: float) -> dict[str, Any]:
        """A new key under the same name; the old one works ``grace_s`` more seconds."""
        async with self.conn.transaction():
            before = await self._require_key(name)
            if before["revoked_at"] is not None:
                raise CatalogError(f"key {name!r} is revoked: add a new key instead")
            version = await self._begin_change()
            r = await self.conn.fetchrow(
                f"UPDATE {SCHEMA}.api_keys SET previous_sha256 = sha256, sha256 = $2, "
                "previous_expires_at = now() + make_interval(secs => $3), version = $4 "
                "WHERE name = $1 RETURNING *", name, sha256, float(grace_s), version)
            after = key_row(r)
            await self._record(version, actor, "key.rotate", name, key_row(before), after)
        return after

    # ------------------------------------------------------------------ the log and the fleet
    async def changes(self, limit: int = 100, before_id: int | None = None) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            f"SELECT * FROM {SCHEMA}.changes WHERE $2::bigint IS NULL OR id < $2 ORDER BY id DESC LIMIT $1",
            limit, before_id)
        return [{"id": r["id"], "at": _iso(r["at"]), "actor": r["actor"], "kind": r["kind"], "subject": r["subject"],
                 "before": None if r["before"] is None else json.loads(r["before"]),
                 "after": None if r["after"] is None else json.loads(r["after"]), "version": r["version"]}
                for r in rows]

    async def fleet(self, lease_s: float) -> list[dict[str, Any]]:
        """The live instances: those that reported within the lease."""
        rows = await self.conn.fetch(
            f"SELECT *, extract(epoch FROM now() - heartbeat_at) AS age FROM {SCHEMA}.instances "
            "WHERE heartbeat_at > now() - make_interval(secs => $1) ORDER BY started_at, id", float(lease_s))
        return [{"id": r["id"], "address": r["address"], "started_at": _iso(r["started_at"]),
                 "heartbeat_at": _iso(r["heartbeat_at"]), "applied_version": r["applied_version"],
                 "heartbeat_age_s": round(float(r["age"]), 3)} for r in rows]

    # ------------------------------------------------------------------ control init
    async def import_settings(self, actor: str) -> tuple[int, int]:
        """Register the config file's tenants (`tenants:` and every tenant a key names) and
        its API keys; what the catalog has already stays as it is.  (tenants, keys) added."""
        s = self.settings
        wanted: dict[str, dict[str, Any]] = {}
        for tid, limits in s.tenants.items():
            state = "suspended" if limits.suspended else "active"
            wanted[tid] = {"id": tid, "state": state, "cluster": limits.cluster,
                           "limits": overrides_of(limits, s.defaults)}
        for key in s.auth.api_keys:
            for tid in sorted(key.tenants or ()):
                wanted.setdefault(tid, {"id": tid, "state": "active", "cluster": s.defaults.cluster, "limits": {}})
        async with self.conn.transaction():
            have = {r["id"] for r in await self.conn.fetch(f"SELECT id FROM {SCHEMA}.tenants")}
            rows = await self.conn.fetch(f"SELECT name, sha256 FROM {SCHEMA}.api_keys")
            names = {r["name"]: r["sha256"] for r in rows}
            new_tenants = [row for tid, row in sorted(wanted.items()) if tid not in have]
            new_keys = [k for k in s.auth.api_keys if k.name not in names and k.sha256 not in names.values()]
            if not new_tenants and not new_keys:
                return 0, 0
            version = await self._begin_change()
            for row in new_tenants:
                await self._insert_tenant(row, version)
                await self._record(version, actor, "tenant.add", row["id"], None, row)
            for k in new_keys:
                allowed = None if k.tenants is None else sorted(k.tenants)
                r = await self.conn.fetchrow(
                    f"INSERT INTO {SCHEMA}.api_keys (name, sha256, tenants, version) VALUES ($1, $2, $3, $4) "
                    "RETURNING *", k.name, k.sha256, allowed, version)
                await self._record(version, actor, "key.add", k.name, None, key_row(r))
        return len(new_tenants), len(new_keys)
