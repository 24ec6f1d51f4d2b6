"""Which pool a transaction goes to: tenant placement across clusters, and read replicas.

Each cluster (`database` is the cluster "default", more under `clusters`) has a primary
pool and one pool per streaming replica, all with the `database` pool settings.  A
tenant's traffic goes to its cluster (`tenants.<id>.cluster`).  Read-only requests go
to the cluster's replicas in turn (unless they ask for `"consistency": "primary"`);
writes and read-write transactions always go to the primary.  A replica that fails
its health check, or a request, is taken out for `REPLICA_RETRY_S` and the read falls
back to the primary; the health loop puts it back when it answers again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..config import DEFAULT_CLUSTER, ClusterConfig, Settings
from ..errors import DATABASE_UNAVAILABLE, ApiError
from ..observe.pools import PoolStats
from .pool import Pool

log = logging.getLogger("tenant_proxy.routing")

REPLICA_RETRY_S = 5.0


def pool_name(cluster: str, replica: int | None) -> str:
    base = "primary" if cluster == DEFAULT_CLUSTER else cluster
    return base if replica is None else f"{base}/replica-{replica}"


@dataclass
class _Cluster:
    primary: Pool
    replicas: list[Pool]
    down_until: dict[str, float] = field(default_factory=dict)
    turn: int = 0


class Router:
    """Every pool of every cluster, and the choice among them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._clusters = {name: self._build(settings, c) for name, c in settings.clusters.items()}
        self._health: asyncio.Task[None] | None = None

    @staticmethod
    def _build(settings: Settings, cluster: ClusterConfig) -> _Cluster:
        guc = settings.tenancy.guc
        primary = Pool(dataclasses.replace(settings.database, dsn=cluster.dsn), guc,
                           pool_name(cluster.name, None))
        replicas = [Pool(dataclasses.replace(settings.database, dsn=dsn, pgbouncer_admin_dsn=None), guc,
                             pool_name(cluster.name, i)) for i, dsn in enumerate(cluster.replicas)]
        return _Cluster(primary=primary, replicas=replicas)

    def databases(self) -> Iterator[Pool]:
        for c in self._clusters.values():
            yield c.primary
            yield from c.replicas

    def pool_sizes(self) -> list[tuple[str, int]]:
        """Each pool's name and size: the budget of its fair queue (policy/admission.py)."""
        return [(db.name, db.cfg.pool_max_size) for db in self.databases()]

    def suits(self, db: Pool, cluster: str, read_only: bool, consistency: str | None) -> bool:
        """Whether ``db`` may run such a request of a tenant on ``cluster``."""
        c = self._clusters.get(cluster)
        if c is None:
            return False
        if not read_only or consistency == "primary":
            return db is c.primary
        return db is c.primary or db in c.replicas

    def choose(self, cluster: str, read_only: bool, consistency: str | None) -> Pool:
        """The pool a request goes to: a replica of its cluster for reads that allow one."""
        if not read_only or consistency == "primary":
            return self.primary(cluster)
        return self.for_read(cluster)

    async def start(self) -> None:
        for c in self._clusters.values():
            await c.primary.start()  # a role that bypasses RLS stops everything here
            for replica in c.replicas:
                await replica.start()
                if not await replica.ping():
                    self.mark_down(replica)
        if any(c.replicas for c in self._clusters.values()):
            self._health = asyncio.create_task(self._check_replicas())

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        await asyncio.gather(*(db.close() for db in self.databases()))

    def _cluster(self, name: str) -> _Cluster:
        c = self._clusters.get(name)
        if c is None:  # placed by the control catalog on a cluster this instance's config lacks
            raise ApiError(DATABASE_UNAVAILABLE, f"this tenant is placed on cluster {name!r}, "
                           "which this gateway instance is not configured for")
        return c

    def primary(self, cluster: str = DEFAULT_CLUSTER) -> Pool:
        return self._cluster(cluster).primary

    def for_read(self, cluster: str) -> Pool:
        """The next healthy replica of the cluster, or its primary when none is."""
        c = self._cluster(cluster)
        now = time.monotonic()
        for _ in range(len(c.replicas)):
            replica = c.replicas[c.turn % len(c.replicas)]
            c.turn += 1
            if c.down_until.get(replica.name, 0.0) <= now:
                return replica
        return c.primary

    def mark_down(self, db: Pool) -> None:
        for c in self._clusters.values():
            if db in c.replicas:
                if c.down_until.get(db.name, 0.0) <= time.monotonic():
                    log.warning("replica %s taken out of rotation", db.name)
                c.down_until[db.name] = time.monotonic() + REPLICA_RETRY_S

    def is_replica(self, db: Pool) -> bool:
        return any(db in c.replicas for c in self._clusters.values())

    async def _check_replicas(self) -> None:
        while True:
            await asyncio.sleep(REPLICA_RETRY_S / 2)
            for c in self._clusters.values():
                for replica in c.replicas:
                    if await replica.ping():
                        if c.down_until.pop(replica.name, None) is not None:
                            log.info("replica %s back in rotation", replica.name)
                    else:
                        self.mark_down(replica)

    def stats(self) -> list[PoolStats]:
        return [db.stats() for db in self.databases()]
