"""The online move's pre-flight (issue 20): each requirement it checks, on real clusters,
named with its fix before anything is created."""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from pathlib import Path

import asyncpg
import yaml

from proxy.__main__ import main
from proxy.config import TenancyConfig
from proxy.tools import preflight
from proxy.tools.devstack import APP_PASSWORD, APP_USER, DATABASE, LocalStack

from ..fix_gateway import base_config, merge
from ..fix_stack import stack_of

TENANCY = TenancyConfig()


async def _check(source: LocalStack, target_dsn: str, tenant: str) -> list[str]:
    src, dst = await asyncpg.connect(source.admin_dsn), await asyncpg.connect(target_dsn)
    try:
        return [str(p) for p in await preflight.check(src, dst, TENANCY, tenant)]
    finally:
        await src.close()
        await dst.close()


async def test_a_source_without_logical_wal_is_named_with_its_fix(primary: LocalStack,
                                                                  second_cluster: LocalStack) -> None:
    problems = await _check(primary, second_cluster.admin_dsn, str(uuid.uuid4()))
    assert problems == ["source: wal_level is replica; fix: ALTER SYSTEM SET wal_level = logical, then restart "
                        "PostgreSQL"]


async def test_a_logical_source_passes_and_each_other_requirement_is_checked(logical: LocalStack,
                                                                             second_cluster: LocalStack) -> None:
    tenant = str(uuid.uuid4())
    assert await _check(logical, second_cluster.admin_dsn, tenant) == []
    src = await asyncpg.connect(logical.admin_dsn)
    try:
        # a tenant table whose replica identity lacks the tenant column
        await src.execute("CREATE TABLE public.notes (id serial PRIMARY KEY, tenant_id uuid NOT NULL, body text)")
        problems = await _check(logical, second_cluster.admin_dsn, tenant)
        assert problems == ["public.notes: has replica identity (id), without tenant_id: a row filter cannot follow "
                            "its UPDATEs and DELETEs; fix: a primary key that starts with tenant_id, or ALTER TABLE "
                            "public.notes REPLICA IDENTITY FULL"]
        await src.execute("ALTER TABLE public.notes REPLICA IDENTITY FULL")
        assert await _check(logical, second_cluster.admin_dsn, tenant) == []
    finally:
        await src.execute("DROP TABLE IF EXISTS public.notes")
        await src.close()
    # the target already holds the tenant's rows
    dst = await asyncpg.connect(second_cluster.admin_dsn)
    try:
        await dst.execute("INSERT INTO events (tenant_id, event_type, data) VALUES ($1, 'leftover', '{}')", tenant)
        problems = await _check(logical, second_cluster.admin_dsn, tenant)
        assert problems == [f"target: already holds rows of tenant {tenant} in public.events; fix: purge them there "
                            "first (`tenant-proxy purge --cluster ...`), if they are a leftover"]
    finally:
        await dst.execute("DELETE FROM events WHERE tenant_id = $1", tenant)
        await dst.close()
    # a target admin role that is not a superuser
    app_dsn = f"postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{second_cluster.pg_port}/{DATABASE}"
    problems = await _check(logical, app_dsn, tenant)
    assert problems == [f"target: the admin role {APP_USER} is not a superuser (PostgreSQL 15 lets only superusers "
                        "create subscriptions); fix: point clusters.<target>.admin_dsn at a superuser"]


async def _move_check(tmp_path: Path, source: LocalStack, target: LocalStack, admin: bool = True) -> tuple[int, str]:
    raw = merge(base_config(stack_of(source)), {
        "database": {"admin_dsn": source.admin_dsn} if admin else {},
        "clusters": {"eu": {"dsn": target.gateway_dsn, "admin_dsn": target.admin_dsn}}})
    config = tmp_path / "move.yaml"
    config.write_text(yaml.safe_dump(raw))
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(["move", "--config", str(config), "--tenant", str(uuid.uuid4()), "--to", "eu", "--check"])
    code = await asyncio.to_thread(run)
    return code, out.getvalue() + err.getvalue()


async def test_move_check_reports_and_exits_by_the_result(tmp_path: Path, primary: LocalStack, logical: LocalStack,
                                                          second_cluster: LocalStack) -> None:
    code, text = await _move_check(tmp_path, primary, second_cluster)
    assert code == 1 and "source: wal_level is replica" in text and "--offline" in text, text
    code, text = await _move_check(tmp_path, logical, second_cluster)
    assert code == 0 and "ready" in text, text
    code, text = await _move_check(tmp_path, logical, second_cluster, admin=False)
    assert code == 1 and "database.admin_dsn is not set" in text and "Traceback" not in text, text
