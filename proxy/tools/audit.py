"""``tenant-proxy audit``: read the catalogs and report every weakness in the isolation walls.

Each finding carries a severity, the object, what is wrong and the exact SQL that fixes
it.  ``fatal`` findings (the gateway's role can bypass RLS outright) also stop ``serve``
from starting.  Works on any connection object with asyncpg's ``fetch``/``fetchrow``
interface; it never writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..pg.role import Finding, audit_role
from ..pg.role import ident as _ident
from . import audit_checks
from .partitions import weaknesses

SEVERITIES = ("fatal", "error", "warning")
_INVOKER_ON = {"security_invoker=true", "security_invoker=on", "security_invoker=1", "security_invoker=yes"}
SET_CONFIG = "pg_catalog.set_config(text,text,boolean)"
# Built-ins the gateway's role must not run (deploy/sql/003_hardening.sql revokes them):
# they run SQL text past the guard, take advisory locks (a slot of the cluster's shared
# lock table each), signal backends, reach the shared large objects, or leave session
# values for the next tenant.
DANGEROUS_FUNCTIONS = (
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "ts_stat", "ts_rewrite",
    "cursor_to_xml", "cursor_to_xmlschema",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all",
    "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_terminate_backend", "pg_cancel_backend", "pg_notify",
    "lo_open", "lo_close", "loread", "lowrite", "lo_lseek", "lo_lseek64", "lo_creat", "lo_create", "lo_tell",
    "lo_tell64", "lo_truncate", "lo_truncate64", "lo_unlink", "lo_import", "lo_export", "lo_from_bytea", "lo_get",
    "lo_put", "setseed",
)


_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind, c.relrowsecurity, c.relforcerowsecurity,
       c.relispartition,
       (SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid AND c.relispartition) AS parent,
       pg_catalog.pg_get_userbyid(c.relowner) AS owner,
       EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
               WHERE a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped) AS has_column
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p')
ORDER BY n.nspname, c.relname
"""
_POLICIES = """
SELECT p.polrelid, p.polname, p.polcmd::text AS polcmd, p.polpermissive,
       ARRAY(SELECT r FROM pg_catalog.unnest(p.polroles) AS r ORDER BY r) AS roles,
       (SELECT pg_catalog.string_agg(CASE WHEN r = 0 THEN 'PUBLIC'
                                          ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(r)) END,
                                     ', ' ORDER BY r)
        FROM pg_catalog.unnest(p.polroles) AS r) AS role_list,
       pg_catalog.pg_get_expr(p.polqual, p.polrelid) AS qual,
       pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) AS withcheck
FROM pg_catalog.pg_policy p WHERE p.polrelid = ANY($1::oid[])
"""
_VIEWS = """
SELECT DISTINCT v.oid, n.nspname, v.relname, v.relkind::text AS relkind, v.reloptions::text[] AS options,
       pg_catalog.has_table_privilege($2, v.oid, 'SELECT') AS readable
FROM pg_catalog.pg_class v
JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace
JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.oid
JOIN pg_catalog.pg_depend d ON d.objid = r.oid AND d.classid = 'pg_catalog.pg_rewrite'::regclass
                            AND d.refclassid = 'pg_catalog.pg_class'::regclass
WHERE v.relkind IN ('v', 'm') AND d.refobjid = ANY($1::oid[]) AND d.refobjid <> v.oid
ORDER BY n.nspname, v.relname
"""
_PUBLIC_GRANTS = """
SELECT
  EXISTS (SELECT 1 FROM pg_catalog.pg_proc p,
          pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
          WHERE p.oid = $1::regprocedure AND a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS set_config,
  EXISTS (SELECT 1 FROM pg_catalog.pg_database d,
          pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
          WHERE d.datname = pg_catalog.current_database() AND a.grantee = 0
            AND a.privilege_type = 'TEMPORARY') AS temp,
  pg_catalog.has_function_privilege($2, $1, 'EXECUTE') AS role_set_config,
  pg_catalog.has_database_privilege($2, pg_catalog.current_database(), 'TEMPORARY') AS role_temp,
  pg_catalog.current_database() AS db
"""
_SCHEMAS = """
SELECT n.nspname,
       pg_catalog.has_schema_privilege($1, n.oid, 'CREATE') AS role_create,
       EXISTS (SELECT 1 FROM pg_catalog.aclexplode(coalesce(n.nspacl, pg_catalog.acldefault('n', n.nspowner))) a
               WHERE a.grantee = 0 AND a.privilege_type = 'CREATE') AS public_create
FROM pg_catalog.pg_namespace n
WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
ORDER BY 1
"""
_DANGEROUS = """
SELECT p.oid::regprocedure::text AS signature
FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY($1::text[])
  AND pg_catalog.has_function_privilege($2, p.oid, 'EXECUTE')
ORDER BY 1
"""
_DEFINERS = """
SELECT n.nspname, p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid) AS args
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  AND pg_catalog.has_function_privilege($1, p.oid, 'EXECUTE')
ORDER BY 1, 2
"""


async def run_audit(conn: Any, *, role: str, schemas: Sequence[str], column: str, guc: str,
                    global_tables: Sequence[str] = ()) -> list[Finding]:
    """Every check; findings sorted by severity."""
    findings = await audit_role(conn, role)
    tables = await conn.fetch(_TABLES, list(schemas), column)
    globals_ = set(global_tables)
    tenant_tables = []
    for t in tables:
        name = f"{t['nspname']}.{t['relname']}"
        if not t["has_column"]:
            if name not in globals_ and t["relname"] not in globals_:
                findings.append(Finding("error", "no_tenant_column", name, f"table has no {column} column",
                                        f"-- add {column} and RLS, or list {name} in tenancy.global_tables"))
            continue
        tenant_tables.append(t)
    policies: dict[int, list[Any]] = {}
    for p in await conn.fetch(_POLICIES, [t["oid"] for t in tenant_tables]):
        policies.setdefault(p["polrelid"], []).append(p)
    # A partition is held to its parent's settings; the parent to the general rules.
    by_oid = {t["oid"]: t for t in tenant_tables}
    partitions = [(t, by_oid[t["parent"]]) for t in tenant_tables if t["parent"] in by_oid]
    readers = await audit_checks.setting_readers(conn, guc)

    def reads_tenant(expression: str) -> bool:
        return guc in expression or any(name in readers for name in audit_checks.calls(expression))

    findings += _table_findings(tenant_tables, policies, {t["oid"] for t, _ in partitions}, role, column, guc,
                                reads_tenant)
    findings += _partition_findings(partitions, policies)
    findings += [Finding("error", "unique_key_without_tenant", obj, message, fix) for obj, message, fix
                 in await audit_checks.unique_key_findings(conn, [t["oid"] for t in tenant_tables], column)]
    findings += [Finding("warning", "role_limit_missing", f"{role} {name}",
                         f"the role has no {name} of its own: one request may take that much of the cluster", fix)
                 for name, fix in await audit_checks.missing_role_limits(conn, role)]
    findings += await _view_findings(conn, [t["oid"] for t in tenant_tables], role)
    findings += await _privilege_findings(conn, role)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: (order[f.severity], f.check, f.object))


def _table_findings(tables: Sequence[Any], policies: dict[int, list[Any]], partitions: set[int], role: str,
                   column: str, guc: str, reads_tenant: Callable[[str], bool]) -> list[Finding]:
    """``reads_tenant``: whether an expression reads the setting, itself or through the
    SQL and PL/pgSQL functions it calls."""
    findings: list[Finding] = []
    for t in tables:
        name = f"{t['nspname']}.{t['relname']}"
        ident = _ident(t["nspname"], t["relname"])
        if t["owner"] == role:
            severity = "error" if t["relforcerowsecurity"] else "fatal"
            findings.append(Finding(severity, "role_owns_table", name, f"the gateway's role {role} owns the table",
                                    f"ALTER TABLE {ident} OWNER TO app_owner;"))
        if t["oid"] in partitions:
            continue
        if not t["relrowsecurity"]:
            findings.append(Finding("error", "rls_disabled", name, "row-level security is not enabled",
                                    f"ALTER TABLE {ident} ENABLE ROW LEVEL SECURITY;"))
        if not t["relforcerowsecurity"]:
            findings.append(Finding("error", "rls_not_forced", name,
                                    "row-level security is not forced (the owner bypasses it)",
                                    f"ALTER TABLE {ident} FORCE ROW LEVEL SECURITY;"))
        pols = policies.get(t["oid"], [])
        example = (f"CREATE POLICY tenant_isolation ON {ident} USING ({column} = public.current_tenant_id()) "
                   f"WITH CHECK ({column} = public.current_tenant_id());")
        if not pols:
            findings.append(Finding("error", "no_policy", name, "no RLS policy: with RLS on, no row is visible; "
                                    "with it off, every row is", example))
        opens_all = {p["polname"] for p in pols
                     if p["polpermissive"] and (p["qual"] or "").strip() in ("true", "(true)")}
        off_tenant = {p["polname"] for p in pols if not any(
            reads_tenant(e) for e in (p["qual"], p["withcheck"]) if e)}
        has_good = any(p["polname"] not in opens_all | off_tenant for p in pols)
        for p in pols:
            pname = f"{name} policy {p['polname']}"
            drop = f"DROP POLICY {_ident(p['polname'])} ON {ident};" + ("" if has_good else f" {example}")
            if p["polname"] in opens_all:
                findings.append(Finding("error", "policy_permissive_true", pname,
                                        "permissive policy USING (true) opens every row", drop))
            elif p["polname"] in off_tenant:
                findings.append(Finding("error", "policy_not_tenant", pname,
                                        f"policy does not reference the tenant setting ({guc})", drop))
            if p["polcmd"] == "a" and not p["withcheck"]:
                findings.append(Finding("error", "policy_no_with_check", pname, "INSERT policy without WITH CHECK",
                                        drop))
            elif p["polcmd"] in ("*", "w") and not p["withcheck"]:
                findings.append(Finding("warning", "policy_no_with_check", pname,
                                        "no explicit WITH CHECK: writes are checked by USING only", drop))
    return findings


def _partition_findings(partitions: Sequence[tuple[Any, Any]], policies: dict[int, list[Any]]) -> list[Finding]:
    findings = []
    for part, parent in partitions:
        weak = weaknesses(part, parent, policies.get(part["oid"], []), policies.get(parent["oid"], []))
        if weak is not None:
            findings.append(Finding("error", "partition_weaker_than_parent", f"{part['nspname']}.{part['relname']}",
                                    f"partition less confined than its parent {parent['nspname']}.{parent['relname']}"
                                    f" (queries naming it bypass the parent's policies): {'; '.join(weak.problems)}",
                                    weak.fix))
    return findings


async def _view_findings(conn: Any, table_oids: Sequence[int], role: str) -> list[Finding]:
    findings = []
    for v in await conn.fetch(_VIEWS, list(table_oids), role):
        if not v["readable"]:
            continue
        name = f"{v['nspname']}.{v['relname']}"
        ident = _ident(v["nspname"], v["relname"])
        if v["relkind"] == "m":
            findings.append(Finding("error", "materialized_view", name,
                                    "materialized view over a tenant table: it stores every tenant's rows and "
                                    "RLS does not apply to it", f"REVOKE SELECT ON {ident} FROM {_ident(role)};"))
        elif not set(v["options"] or ()) & _INVOKER_ON:
            findings.append(Finding("error", "view_not_security_invoker", name,
                                    "view over a tenant table runs with its owner's rights, not the caller's",
                                    f"ALTER VIEW {ident} SET (security_invoker = true);"))
    return findings


async def _privilege_findings(conn: Any, role: str) -> list[Finding]:
    findings = []
    g = await conn.fetchrow(_PUBLIC_GRANTS, SET_CONFIG, role)
    if g["set_config"]:
        findings.append(Finding("error", "public_set_config", "set_config", "PUBLIC can execute set_config",
                                f"REVOKE EXECUTE ON FUNCTION {SET_CONFIG} FROM PUBLIC;"))
    if g["role_set_config"]:
        findings.append(Finding("error", "role_set_config", "set_config", f"{role} can execute set_config",
                                f"REVOKE EXECUTE ON FUNCTION {SET_CONFIG} FROM PUBLIC, {_ident(role)};"))
    db = _ident(g["db"])
    if g["temp"]:
        findings.append(Finding("error", "public_temp", g["db"], "PUBLIC can create temporary objects",
                                f"REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC;"))
    if g["role_temp"]:
        findings.append(Finding("error", "role_temp", g["db"], f"{role} can create temporary objects",
                                f"REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC, {_ident(role)};"))
    for s in await conn.fetch(_SCHEMAS, role):
        if s["public_create"]:
            findings.append(Finding("error", "public_create", s["nspname"], "PUBLIC can create objects in the schema",
                                    f"REVOKE CREATE ON SCHEMA {_ident(s['nspname'])} FROM PUBLIC;"))
        if s["role_create"]:
            findings.append(Finding("error", "role_create", s["nspname"], f"{role} can create objects in the schema",
                                    f"REVOKE CREATE ON SCHEMA {_ident(s['nspname'])} FROM PUBLIC, {_ident(role)};"))
    for f in await conn.fetch(_DANGEROUS, list(DANGEROUS_FUNCTIONS), role):
        findings.append(Finding("error", "role_dangerous_function", f["signature"],
                                f"{role} can execute {f['signature']}",
                                f"REVOKE EXECUTE ON FUNCTION {f['signature']} FROM PUBLIC, {_ident(role)};"))
    for signature in await audit_checks.activity_functions(conn, role):
        findings.append(Finding("error", "role_activity_function", signature,
                                f"{role} can execute {signature}: every tenant runs as {role}, so it shows "
                                "every tenant's activity", f"REVOKE EXECUTE ON FUNCTION {signature} FROM PUBLIC, "
                                f"{_ident(role)}; GRANT EXECUTE ON FUNCTION {signature} TO pg_monitor;"))
    for f in await conn.fetch(_DEFINERS, role):
        fn = f"{f['nspname']}.{f['proname']}({f['args']})"
        findings.append(Finding("warning", "security_definer", fn,
                                f"SECURITY DEFINER function executable by {role}: it runs with its owner's rights",
                                f"REVOKE EXECUTE ON FUNCTION {_ident(f['nspname'], f['proname'])}({f['args']}) "
                                f"FROM PUBLIC, {_ident(role)};"))
    return findings


def exit_code(findings: Sequence[Finding]) -> int:
    """0 clean, 1 any fatal or error, 2 warnings only."""
    if any(f.severity in ("fatal", "error") for f in findings):
        return 1
    return 2 if findings else 0


def format_text(findings: Sequence[Finding]) -> str:
    if not findings:
        return "audit: no findings"
    lines = []
    for f in findings:
        lines.append(f"{f.severity.upper():8} {f.check:28} {f.object}\n         {f.message}\n         fix: {f.fix}")
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    lines.append("audit: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)
