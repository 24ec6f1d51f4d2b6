"""Partitions of tenant tables: what leaves one less confined than its parent, and the SQL that fixes it.

Row-level security is checked on the table a query names, so a query that names a
partition directly is confined by the partition's own settings and policies, not its
parent's.  A partition is *weaker* than its parent when:

* the parent has RLS enabled (or forced) and the partition does not;
* the partition has a permissive policy the parent has no identical copy of (permissive
  policies are OR-ed: an extra one shows more rows);
* the parent has a restrictive policy the partition has no identical copy of.

A permissive parent policy missing from the partition only hides rows, so it is not a
weakness.  "Identical" compares command, kind, roles and the deparsed USING / WITH CHECK
expressions.  deploy/sql/005_partitions.sql's event trigger applies the same rules in
the database (``tenant_ddl.partition_weaknesses``); this module is the audit's own,
independent reading of the catalogs.  Pure: rows in, text out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_COMMANDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}

Row = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Weakness:
    problems: tuple[str, ...]
    fix: str


def ident(*parts: str) -> str:
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


def signature(policy: Row) -> tuple[Any, ...]:
    """What a policy means, comparable across tables."""
    return (policy["polcmd"], policy["polpermissive"], tuple(policy["roles"] or ()), policy["qual"],
            policy["withcheck"])


def create_policy_sql(policy: Row, table: str) -> str:
    """The statement that creates ``policy`` on ``table`` (an already quoted name)."""
    kind = "PERMISSIVE" if policy["polpermissive"] else "RESTRICTIVE"
    sql = (f"CREATE POLICY {ident(policy['polname'])} ON {table} AS {kind} FOR {_COMMANDS[policy['polcmd']]} "
           f"TO {policy['role_list'] or 'PUBLIC'}")
    if policy["qual"] is not None:
        sql += f" USING ({policy['qual']})"
    if policy["withcheck"] is not None:
        sql += f" WITH CHECK ({policy['withcheck']})"
    return sql + ";"


def weaknesses(part: Row, parent: Row, part_policies: Sequence[Row],
               parent_policies: Sequence[Row]) -> Weakness | None:
    """How ``part`` is less confined than ``parent``, with the SQL that copies the parent's
    settings onto it; None when it is at least as confined.

    The fix changes policies first and the RLS switches last, in one ALTER TABLE: the
    event trigger refuses an ALTER TABLE that leaves a partition weaker than its parent,
    so each statement must leave it no weaker than before."""
    problems: list[str] = []
    if parent["relrowsecurity"] and not part["relrowsecurity"]:
        problems.append("row-level security is not enabled")
    if parent["relforcerowsecurity"] and not part["relforcerowsecurity"]:
        problems.append("row-level security is not forced")
    parent_sigs = {signature(p) for p in parent_policies}
    part_sigs = {signature(p) for p in part_policies}
    for p in sorted(part_policies, key=lambda p: p["polname"]):
        if p["polpermissive"] and signature(p) not in parent_sigs:
            problems.append(f"permissive policy {p['polname']} is not one of its parent's")
    for p in sorted(parent_policies, key=lambda p: p["polname"]):
        if not p["polpermissive"] and signature(p) not in part_sigs:
            problems.append(f"restrictive policy {p['polname']} of its parent is missing")
    if not problems:
        return None

    table = ident(part["nspname"], part["relname"])
    parent_names = {p["polname"] for p in parent_policies}
    fix = [f"DROP POLICY {ident(p['polname'])} ON {table};" for p in sorted(part_policies, key=lambda p: p["polname"])
           if signature(p) not in parent_sigs and (p["polpermissive"] or p["polname"] in parent_names)]
    fix += [create_policy_sql(p, table) for p in sorted(parent_policies, key=lambda p: p["polname"])
            if signature(p) not in part_sigs]
    switches = []
    if parent["relrowsecurity"] and not part["relrowsecurity"]:
        switches.append("ENABLE ROW LEVEL SECURITY")
    if parent["relforcerowsecurity"] and not part["relforcerowsecurity"]:
        switches.append("FORCE ROW LEVEL SECURITY")
    if switches:
        fix.append(f"ALTER TABLE {table} {', '.join(switches)};")
    return Weakness(tuple(problems), " ".join(fix))
