"""The audit's checks of what RLS alone does not cover: unique keys without the tenant
column, policies that read the tenant through a function, the role's resource limits,
and the activity functions.

Kept apart from audit.py (the three walls) so that each stays readable; the findings are
pg/role.py's ``Finding``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..policy.guard import ACTIVITY_FUNCTIONS

# Role settings that bound what one request can take of the cluster, with the values
# deploy/sql/003_hardening.sql sets.
ROLE_LIMITS = {
    "temp_file_limit": "1GB",
    "max_parallel_workers_per_gather": "0",
    "idle_in_transaction_session_timeout": "5min",
}

_UNIQUE = """
SELECT n.nspname, t.relname AS table_name, i.relname AS index_name, x.indisprimary,
       con.conname, con.contype::text AS contype, pg_catalog.pg_get_constraintdef(con.oid) AS condef,
       pg_catalog.pg_get_indexdef(x.indexrelid) AS indexdef
FROM pg_catalog.pg_index x
JOIN pg_catalog.pg_class t ON t.oid = x.indrelid
JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
LEFT JOIN pg_catalog.pg_constraint con ON con.conindid = x.indexrelid AND con.contype IN ('p', 'u')
WHERE x.indisunique AND x.indrelid = ANY($1::oid[])
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h WHERE h.inhrelid = x.indexrelid)
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                  WHERE a.attrelid = x.indrelid AND a.attname = $2
                    AND a.attnum = ANY((x.indkey::int2[])[0:x.indnkeyatts - 1]))
ORDER BY 1, 2, 3
"""
_FUNCTIONS = """
SELECT p.proname, l.lanname, p.prosrc
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND l.lanname IN ('sql', 'plpgsql')
"""
_ROLE_SETTINGS = """
SELECT pg_catalog.unnest(s.setconfig) AS setting
FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
WHERE r.rolname = $1 AND s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database
                                               WHERE datname = pg_catalog.current_database()))
"""
_ACTIVITY = """
SELECT p.oid::regprocedure::text AS signature
FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace
  AND (p.proname = ANY($1::text[]) OR p.proname LIKE 'pg\\_stat\\_get\\_%')
  AND pg_catalog.has_function_privilege($2, p.oid, 'EXECUTE')
ORDER BY 1
"""
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_$]*)\"?\s*\(")


def _ident(*parts: str) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


async def unique_key_findings(conn: Any, table_oids: Sequence[int], column: str) -> list[tuple[str, str, str]]:
    """(object, message, fix) for each unique key of a tenant table that lacks ``column``."""
    out = []
    for u in await conn.fetch(_UNIQUE, list(table_oids), column):
        table = _ident(u["nspname"], u["table_name"])
        why = (f"unique key without {column}: INSERT ... ON CONFLICT ... DO UPDATE ... WHERE evaluates its WHERE "
               "on a conflicting row of another tenant before RLS checks it (the row leaks through errors)")
        if u["conname"] is not None:
            kind = "PRIMARY KEY" if u["contype"] == "p" else "UNIQUE"
            definition = u["condef"].replace(f"{kind} (", f"{kind} ({_ident(column)}, ", 1)
            fix = (f"ALTER TABLE {table} DROP CONSTRAINT {_ident(u['conname'])}, "
                   f"ADD CONSTRAINT {_ident(u['conname'])} {definition};")
            obj = f"{u['nspname']}.{u['table_name']} constraint {u['conname']}"
        else:
            definition = re.sub(r"( USING \w+ \()", rf"\1{_ident(column)}, ", u["indexdef"], count=1)
            fix = f"DROP INDEX {_ident(u['nspname'], u['index_name'])}; {definition};"
            obj = f"{u['nspname']}.{u['table_name']} index {u['index_name']}"
        out.append((obj, why, fix))
    return out


async def setting_readers(conn: Any, guc: str, depth: int = 4) -> set[str]:
    """Names of the SQL and PL/pgSQL functions whose bodies read ``guc``, directly or through
    another such function (followed ``depth`` calls deep).  By name, whatever the schema."""
    bodies: dict[str, list[str]] = {}
    for f in await conn.fetch(_FUNCTIONS):
        bodies.setdefault(f["proname"], []).append(f["prosrc"] or "")
    readers = {name for name, srcs in bodies.items() if any(guc in src for src in srcs)}
    for _ in range(depth):
        more = {name for name, srcs in bodies.items() if name not in readers
                and any(called in readers for src in srcs for called in calls(src))}
        if not more:
            break
        readers |= more
    return readers


def calls(expression: str) -> Iterable[str]:
    """The names of the functions an expression calls (unqualified)."""
    return (m.group(1) for m in _CALL.finditer(expression))


async def missing_role_limits(conn: Any, role: str) -> list[tuple[str, str]]:
    """(setting, fix) for each of ROLE_LIMITS the role has no value of its own for."""
    have = {row["setting"].split("=", 1)[0] for row in await conn.fetch(_ROLE_SETTINGS, role)}
    return [(name, f"ALTER ROLE {_ident(role)} SET {name} = '{value}';")
            for name, value in ROLE_LIMITS.items() if name not in have]


async def activity_functions(conn: Any, role: str) -> list[str]:
    """Signatures of the activity functions ``role`` can execute."""
    return [r["signature"] for r in await conn.fetch(_ACTIVITY, sorted(ACTIVITY_FUNCTIONS), role)]
