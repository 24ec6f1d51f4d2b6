"""The online move's copy: one tenant's rows kept in sync on the target by PostgreSQL's
logical replication, and what the cut-over needs from it.

- ``Replication.start``: a publication on the source with a row filter on the tenant
  column for every tenant table (``publish_via_partition_root``, so a partitioned table
  publishes as its root, and without TRUNCATE, which a row filter does not narrow), and a
  subscription on the target that copies the rows first and then applies the changes
  as they are committed.
- ``wait_copied``: until every table's initial copy is done (``pg_subscription_rel``).
- ``wait_applied``: until the subscription has confirmed the source's WAL up to a
  position (the replication slot's ``confirmed_flush_lsn``): every transaction
  committed before it is on the target.
- ``advance_sequences``: logical replication does not carry sequences; the target's are
  set to at least the source's.
- ``drop``: subscription (and with it its slot), publication, and any slot left behind.

The objects are named after the tenant (``tenant_move_<digest>``): one move per tenant at
a time, and the next move of a tenant removes what one that died left behind.
Connections are the clusters' ``admin_dsn``; the subscription connects to the source
with the source's ``admin_dsn`` as it is written (it must work from the target's host).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .tenant_data import LifecycleError, TenantTable, quote_ident, quote_literal

POLL_S = 0.01


def object_name(tenant: str) -> str:
    return "tenant_move_" + hashlib.sha256(tenant.encode()).hexdigest()[:20]


_SEQUENCES = """
SELECT DISTINCT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name
  FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_class c ON c.oid = d.objid AND c.relkind = 'S'
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass
   AND d.refobjid = ANY ($1::oid[]) AND d.deptype IN ('a', 'i')
 ORDER BY 1
"""


@dataclass(slots=True)
class Replication:
    source: Any   # admin connections
    target: Any
    tenant: str
    name: str
    sub_oid: int | None = None  # the subscription's, once created: its table-copy slots are named after it

    async def start(self, tables: list[TenantTable], source_conninfo: str) -> None:
        """Publication, then subscription (which creates the slot and starts the copy)."""
        members = ", ".join(
            f"{t.ident} WHERE ({quote_ident(t.tenant_column.name)} = "
            f"{quote_literal(self.tenant)}::{t.tenant_column.base_type})" for t in tables)
        await self.source.execute(
            f"CREATE PUBLICATION {self.name} FOR TABLE {members} "
            "WITH (publish = 'insert, update, delete', publish_via_partition_root = true)")
        # Not in a transaction block (it creates the slot on the source); asyncpg sends a
        # statement without parameters as a simple query.  synchronous_commit: the
        # subscriber confirms a change as soon as it applied it, which the cut-over waits on.
        await self.target.execute(
            f"CREATE SUBSCRIPTION {self.name} CONNECTION {quote_literal(source_conninfo)} "
            f"PUBLICATION {self.name} WITH (copy_data = true, slot_name = {self.name}, create_slot = true, "
            "synchronous_commit = 'on')")
        self.sub_oid = await self.target.fetchval("SELECT oid FROM pg_subscription WHERE subname = $1", self.name)

    async def leftovers(self) -> list[str]:
        """What a move of this tenant that died without cleaning up left behind."""
        found = []
        if await self.source.fetchval("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", self.name):
            found.append(f"publication {self.name} on the source")
        if await self.source.fetchval("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                                      self.name):
            found.append(f"replication slot {self.name} on the source")
        self.sub_oid = await self.target.fetchval("SELECT oid FROM pg_subscription WHERE subname = $1", self.name)
        if self.sub_oid is not None:
            found.append(f"subscription {self.name} on the target")
        return found

    async def _errors(self) -> int:
        return int(await self.target.fetchval(
            "SELECT coalesce(sum(apply_error_count + sync_error_count), 0) FROM pg_stat_subscription_stats "
            "WHERE subname = $1", self.name))

    async def wait_copied(self, say: Callable[[str], None], report_every_s: float = 5.0) -> None:
        """Until every table's initial copy has finished; an error of the copy or apply
        worker (which PostgreSQL retries for ever) fails the move."""
        next_report = time.monotonic() + report_every_s
        while True:
            states = await self.target.fetch(
                "SELECT r.srsubstate::text AS state, count(*) AS n FROM pg_subscription_rel r "
                "JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = $1 GROUP BY 1", self.name)
            pending = sum(r["n"] for r in states if r["state"] not in ("r", "s"))
            if states and not pending:
                return
            if await self._errors():
                raise LifecycleError("the initial copy failed on the target (see its server log: "
                                     "pg_stat_subscription_stats counts the errors)")
            if time.monotonic() >= next_report:
                say(f"move: initial copy: {pending} of {sum(r['n'] for r in states)} tables still copying")
                next_report += report_every_s
            await asyncio.sleep(0.1)

    async def lag_bytes(self) -> int:
        """How far the subscription's confirmed position is behind the source's WAL."""
        lag = await self.source.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) FROM pg_replication_slots "
            "WHERE slot_name = $1", self.name)
        if lag is None:
            raise LifecycleError(f"the replication slot {self.name} is gone from the source")
        return int(lag)

    async def flushed_position(self) -> str:
        """A WAL position of the source past every transaction committed so far, flushed (a
        WAL sender sends only flushed WAL).  A commit made with synchronous_commit off may
        not even be written yet: a commit of our own, with it on, flushes all WAL before it."""
        async with self.source.transaction():
            await self.source.execute("SET LOCAL synchronous_commit = on")
            # A record of its own (a transactional logical message, which the subscription
            # does not ask for): a transaction that wrote no WAL skips the flush at commit.
            await self.source.execute("SELECT pg_catalog.pg_logical_emit_message(true, 'tenant-proxy-move', '')")
        return str(await self.source.fetchval("SELECT pg_current_wal_flush_lsn()::text"))

    async def wait_applied(self, lsn: str, timeout_s: float) -> None:
        """Until the subscriber has confirmed the source's WAL up to ``lsn``."""
        deadline = time.monotonic() + timeout_s
        while not await self.source.fetchval(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                lsn, self.name):
            if time.monotonic() > deadline:
                raise LifecycleError(f"the target did not catch up with the source within {timeout_s:g} s")
            if await self._errors():
                raise LifecycleError("applying the tenant's changes failed on the target (see its server log)")
            await asyncio.sleep(POLL_S)

    async def advance_sequences(self, tables: list[TenantTable]) -> list[str]:
        """The sequences the tenant tables own (serial and identity columns), on the target at
        least where they are on the source; the names advanced."""
        names = [r["name"] for r in await self.source.fetch(_SEQUENCES, [t.oid for t in tables])]
        for name in names:
            last = await self.source.fetchval(f"SELECT CASE WHEN is_called THEN last_value END FROM {name}")
            if last is not None:
                await self.target.execute(
                    f"SELECT setval({quote_literal(name)}::regclass, greatest($1::bigint, "
                    f"(SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {name})))", last)
        return names

    async def drop(self) -> None:
        """The subscription (its workers stopped, detached from its slot first, so that this
        works whether or not the source answers), then on the source the publication and
        the slots: the subscription's and its table copies'.  A slot left behind would keep
        the source's WAL for ever.  Each side is tried whatever the other did."""
        problems = []
        try:
            for sql in (f"ALTER SUBSCRIPTION {self.name} DISABLE",
                        f"ALTER SUBSCRIPTION {self.name} SET (slot_name = NONE)",
                        f"DROP SUBSCRIPTION {self.name}"):
                await self.target.execute(sql)
        except Exception as exc:  # reported below; the source is still cleaned up
            if "does not exist" not in str(exc):
                problems.append(f"the subscription {self.name} stays on the target ({type(exc).__name__}: {exc}); "
                                f"once it answers: ALTER SUBSCRIPTION {self.name} DISABLE; ALTER SUBSCRIPTION "
                                f"{self.name} SET (slot_name = NONE); DROP SUBSCRIPTION {self.name}")
        try:
            await self.source.execute(f"DROP PUBLICATION IF EXISTS {self.name}")
            await self._drop_slots()
        except Exception as exc:
            problems.append(f"on the source ({type(exc).__name__}: {exc}): DROP PUBLICATION IF EXISTS {self.name}; "
                            f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name "
                            f"= '{self.name}' OR slot_name LIKE 'pg\\_{self.sub_oid}\\_sync\\_%'")
        if problems:
            raise LifecycleError("could not remove the move's replication objects: " + "; ".join(problems))

    async def _drop_slots(self, timeout_s: float = 10.0) -> None:
        """The slots, once their WAL senders are gone (a sender whose subscriber died may
        linger until its connection is found dead: it is terminated)."""
        pattern = f"pg\\_{self.sub_oid}\\_sync\\_%" if self.sub_oid is not None else ""
        deadline = time.monotonic() + timeout_s
        while True:
            slots = await self.source.fetch(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE slot_name = $1 OR slot_name LIKE $2",
                self.name, pattern or "-")
            if not slots:
                return
            for slot in slots:
                if slot["active_pid"] is not None:
                    await self.source.execute("SELECT pg_terminate_backend($1)", slot["active_pid"])
                    continue
                await self.source.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = $1 AND NOT active", slot["slot_name"])
            if time.monotonic() > deadline:
                raise LifecycleError(f"slots {[s['slot_name'] for s in slots]} stayed in use")
            await asyncio.sleep(0.05)
