"""Partitions of a tenant table are confined like their parent: named directly through the
gateway they return only the caller's rows, however and whenever they were created."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from ..fix_gateway import KEY_A, SEED, TENANT_A, TENANT_B, Api

# Far-future ranges no other test writes to, each made a different way.
PARTITIONS = {
    "events_y2099_01": "CREATE TABLE public.events_y2099_01 PARTITION OF public.events "
                       "FOR VALUES FROM ('2099-01-01') TO ('2099-02-01')",
    "events_y2099_02": "SET ROLE app_owner; CREATE TABLE public.events_y2099_02 (LIKE public.events); "
                       "ALTER TABLE public.events ATTACH PARTITION public.events_y2099_02 "
                       "FOR VALUES FROM ('2099-02-01') TO ('2099-03-01'); RESET ROLE",
    "events_y2099_03_h0": "CREATE TABLE public.events_y2099_03 PARTITION OF public.events "
                          "FOR VALUES FROM ('2099-03-01') TO ('2099-04-01') PARTITION BY HASH (id); "
                          "CREATE TABLE public.events_y2099_03_h0 PARTITION OF public.events_y2099_03 "
                          "FOR VALUES WITH (MODULUS 2, REMAINDER 0); "
                          "CREATE TABLE public.events_y2099_03_h1 (LIKE public.events); "
                          "CREATE POLICY wide ON public.events_y2099_03_h1 USING (true); "
                          "ALTER TABLE public.events_y2099_03 ATTACH PARTITION public.events_y2099_03_h1 "
                          "FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
    "events_p2099_04": "SELECT partman.create_partition_time('public.events', ARRAY['2099-04-15'::timestamptz])",
}
PARENTS = ("events_y2099_01", "events_y2099_02", "events_y2099_03", "events_p2099_04")
STATE = """
SELECT c.relrowsecurity, c.relforcerowsecurity, pg_catalog.pg_get_userbyid(c.relowner) AS owner,
       ARRAY(SELECT format('%s %s %s %s', p.polname, p.polcmd, pg_catalog.pg_get_expr(p.polqual, p.polrelid),
                           pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid))
             FROM pg_catalog.pg_policy p WHERE p.polrelid = c.oid ORDER BY 1) AS policies
FROM pg_catalog.pg_class c WHERE c.oid = $1::regclass
"""


async def _partition_of_seed(admin_db: asyncpg.Connection) -> str:
    names = await admin_db.fetch("SELECT DISTINCT tableoid::regclass::text AS name FROM public.events "
                                 "WHERE event_type = ANY($1::text[])", [t for types in SEED.values() for t in types])
    assert len(names) == 1, names  # the seed rows were all written now: one monthly partition
    return str(names[0]["name"])


async def test_a_partition_named_directly_returns_only_the_callers_rows(api: Api,
                                                                      admin_db: asyncpg.Connection) -> None:
    partition = await _partition_of_seed(admin_db)
    assert partition.startswith("events_p")  # made ahead by pg_partman
    # Not granted to the gateway's role: refused outright.
    r = await api.query(f"SELECT tenant_id FROM {partition}", key=KEY_A)
    assert r.status == 403 and r.body["error"]["sqlstate"] == "42501", r.body
    # Granted (as GRANT ... ON ALL TABLES IN SCHEMA public would): the partition's own
    # policies still confine it to the caller's rows.
    await admin_db.execute(f"GRANT SELECT ON public.{partition} TO app")
    try:
        held = await admin_db.fetch(f"SELECT id::text, tenant_id::text FROM public.{partition} ORDER BY id")
        assert {h["tenant_id"] for h in held} >= {TENANT_A, TENANT_B}  # the hole, were it open
        r = await api.query(f"SELECT id, tenant_id, event_type FROM {partition} ORDER BY id", key=KEY_A)
        assert r.status == 200, r.body
        assert [row["id"] for row in r.body["rows"]] == [h["id"] for h in held if h["tenant_id"] == TENANT_A]
        assert {row["tenant_id"] for row in r.body["rows"]} == {TENANT_A}
        assert set(SEED[TENANT_A]) <= {row["event_type"] for row in r.body["rows"]}
        r = await api.query(f"SELECT count(*) AS n FROM {partition} WHERE tenant_id = $1", TENANT_B, key=KEY_A)
        assert r.body["rows"] == [{"n": 0}]
    finally:
        await admin_db.execute(f"REVOKE SELECT ON public.{partition} FROM app")


@pytest_asyncio.fixture
async def later_partitions(admin_db: asyncpg.Connection) -> AsyncIterator[list[str]]:
    """Partitions made after the migrations, by plain DDL (superuser and owner), ATTACH,
    sub-partitioning and pg_partman, each holding a row of tenant A and one of tenant B."""
    try:
        for sql in PARTITIONS.values():
            await admin_db.execute(sql)
        for month, name in enumerate(PARTITIONS, 1):
            for tenant in (TENANT_A, TENANT_B):
                await admin_db.execute(
                    "INSERT INTO public.events (tenant_id, event_type, data, created_at) "
                    "VALUES ($1, $2, '{}', $3::text::timestamptz)",
                    tenant, f"later-{name}", f"2099-{month:02d}-15T00:00:00Z")
        leaves = [*PARTITIONS, "events_y2099_03_h1"]
        # every row sits in a leaf made above (the hash leaves share month 3)
        located = await admin_db.fetch("SELECT DISTINCT tableoid::regclass::text AS t FROM public.events "
                                       "WHERE created_at >= '2099-01-01'")
        assert {r["t"] for r in located} <= set(leaves)
        for name in [*leaves, "events_y2099_03"]:
            await admin_db.execute(f"GRANT SELECT ON public.{name} TO app")
        yield leaves
    finally:
        for name in PARENTS:
            await admin_db.execute(f"DROP TABLE IF EXISTS public.{name}")
        await admin_db.execute("DROP TABLE IF EXISTS public.events_y2099_03_h1")


async def test_partitions_created_later_are_confined(api: Api, admin_db: asyncpg.Connection,
                                                     later_partitions: list[str]) -> None:
    parent = await admin_db.fetchrow(STATE, "public.events")
    assert parent["relrowsecurity"] and parent["relforcerowsecurity"]
    for name in [*later_partitions, "events_y2099_03"]:
        state = await admin_db.fetchrow(STATE, f"public.{name}")
        # the attached leaf's own USING (true) policy was replaced by the parent's
        assert dict(state) == dict(parent), name
        held = await admin_db.fetch(f"SELECT id::text, tenant_id::text FROM public.{name} ORDER BY id")
        r = await api.query(f"SELECT id, tenant_id FROM {name} ORDER BY id", key=KEY_A)
        assert r.status == 200, (name, r.body)
        assert [(row["id"], row["tenant_id"]) for row in r.body["rows"]] == \
            [(h["id"], h["tenant_id"]) for h in held if h["tenant_id"] == TENANT_A], name
        if name != "events_y2099_03_h0" and name != "events_y2099_03_h1":  # hashing may leave a leaf empty
            assert {h["tenant_id"] for h in held} == {TENANT_A, TENANT_B}, name


async def test_ddl_that_weakens_a_partition_is_refused(admin_db: asyncpg.Connection,
                                                       later_partitions: list[str]) -> None:
    for sql in ("ALTER TABLE public.events_y2099_01 DISABLE ROW LEVEL SECURITY",
                "ALTER TABLE public.events_y2099_01 NO FORCE ROW LEVEL SECURITY",
                "CREATE POLICY open ON public.events_y2099_01 USING (true)",
                "ALTER POLICY tenant_isolation ON public.events_y2099_01 USING (true)"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="refused"):
            await admin_db.execute(sql)
    # narrowing a partition is allowed
    await admin_db.execute("CREATE POLICY narrow ON public.events_y2099_01 AS RESTRICTIVE USING (event_type <> 'x')")


async def test_policies_of_the_parent_follow_onto_its_partitions(admin_db: asyncpg.Connection) -> None:
    async def policies(table: str) -> list[str]:
        return [str(p) for p in (await admin_db.fetchrow(STATE, table))["policies"]]

    partition = "public." + await _partition_of_seed(admin_db)
    tx = admin_db.transaction()
    await tx.start()
    try:  # rolled back: the shared stack's events keeps its one policy
        await admin_db.execute("CREATE POLICY no_secrets ON public.events AS RESTRICTIVE "
                               "USING (event_type <> 'secret')")
        assert await policies(partition) == await policies("public.events")
        assert len(await policies(partition)) == 2
        await admin_db.execute("ALTER POLICY no_secrets ON public.events USING (event_type <> 'classified')")
        assert await policies(partition) == await policies("public.events")
        await admin_db.execute("DROP POLICY no_secrets ON public.events")
        assert await policies(partition) == await policies("public.events")
        assert len(await policies(partition)) == 1
    finally:
        await tx.rollback()
