"""Verdicts on caller SQL, from PostgreSQL's own parser (pglast).  Pure; cached by text.

An allow-list: one statement, whose top level is SELECT, INSERT, UPDATE or DELETE.
Anywhere in the tree, every other statement kind is refused (SET/RESET, transaction
control, DO, COPY, LISTEN/NOTIFY, PREPARE, cursors, LOCK, DDL, EXPLAIN, MERGE, CALL
unless allow-listed), and so are SELECT INTO, calls to functions that change
settings, run SQL text, take advisory locks, touch server files or show other
tenants' activity, the activity views and pg_class, any name in ``pg_temp``, writes to
catalog relations, and ``ON CONFLICT ... DO UPDATE ... WHERE``.  Names are
compared after the parser has resolved quoting, unicode escapes and schema
qualification, so ``"set_config"``, ``pg_catalog.set_config`` and
``U&"set\\0063onfig"`` are all the same call.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pglast import ast, enums, parse_sql
from pglast.parser import ParseError, fingerprint

from ..config import GuardConfig
from ..errors import STATEMENT_REJECTED, ApiError

_TOP_LEVEL = {
    ast.SelectStmt: "SELECT",
    ast.InsertStmt: "INSERT",
    ast.UpdateStmt: "UPDATE",
    ast.DeleteStmt: "DELETE",
}
# Statement node types that may appear nested (CTEs, subqueries).
_NESTED_OK = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)

# Every tenant runs as one role: "your own backends" are every tenant's (SQL text, locks,
# row counts, sizes), and cluster-wide counters show others' activity; the size functions
# also lock every relation they are given.  deploy/sql/003_hardening.sql revokes the same
# list (and every pg_stat_get_*) from PUBLIC; the audit reports any the role can run.
ACTIVITY_FUNCTIONS = frozenset({
    "pg_lock_status", "pg_blocking_pids", "pg_safe_snapshot_blocking_pids", "pg_isolation_test_session_is_blocked",
    "txid_current", "txid_current_if_assigned", "txid_current_snapshot", "txid_status",
    "pg_current_xact_id", "pg_current_xact_id_if_assigned", "pg_current_snapshot", "pg_xact_status",
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn", "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn", "pg_last_xact_replay_timestamp",
    "pg_relation_size", "pg_table_size", "pg_total_relation_size", "pg_indexes_size", "pg_database_size",
    "pg_tablespace_size", "pg_prepared_xact", "pg_get_backend_memory_contexts",
    "pg_stat_statements", "pg_stat_statements_info",
    # the transaction counter and commit times of any transaction id, and the control file's counters
    "mxid_age", "pg_xact_commit_timestamp", "pg_xact_commit_timestamp_origin", "pg_last_committed_xact",
    "pg_get_multixact_members",
    "pg_control_checkpoint", "pg_control_system", "pg_control_init", "pg_control_recovery",
})
ACTIVITY_PREFIX = "pg_stat_get_"

# Functions refused by name, whatever their schema: they change settings, run SQL
# given as text, take locks that outlive the transaction, signal other backends or
# reach the server's files.
DENIED_FUNCTIONS = frozenset({
    "set_config",
    "query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema",
    "cursor_to_xml", "cursor_to_xmlschema",
    "table_to_xml", "table_to_xml_and_xmlschema", "table_to_xmlschema",
    "schema_to_xml", "schema_to_xml_and_xmlschema", "schema_to_xmlschema",
    "database_to_xml", "database_to_xml_and_xmlschema", "database_to_xmlschema",
    "ts_stat", "ts_rewrite",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all",
    # each takes a slot of the cluster's shared lock table until the transaction ends:
    # ~23,000 in one statement leave every other tenant "out of shared memory"
    "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_file_write", "pg_file_rename",
    "pg_file_unlink", "pg_logdir_ls",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_notify", "pg_logical_emit_message",
    "pg_import_system_collations", "pg_stat_reset", "pg_stat_reset_shared",
    # large objects are shared by every tenant (all are owned by the gateway's role)
    "lo_open", "lo_close", "loread", "lowrite", "lo_lseek", "lo_lseek64", "lo_creat", "lo_create", "lo_tell",
    "lo_tell64", "lo_truncate", "lo_truncate64", "lo_unlink", "lo_import", "lo_export", "lo_from_bytea", "lo_get",
    "lo_put",
    "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir", "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir", "pg_ls_replslotdir",
    # session-level values the next tenant on the same backend would read
    "setseed", "lastval", "currval",
}) | ACTIVITY_FUNCTIONS
DENIED_PREFIXES = ("dblink", "lo_", "pg_ls_", "pg_replication_", "pg_create_", "pg_drop_replication",
                   "pg_advisory", "pg_try_advisory", ACTIVITY_PREFIX)
# Views of every tenant's activity (the functions behind them are denied too).
DENIED_RELATIONS = frozenset({"pg_locks", "pg_prepared_xacts", "pg_backend_memory_contexts", "pg_stat_statements",
                              "pg_stat_statements_info",
                              # reltuples, relpages, relallvisible: every tenant's rows, per table and partition
                              "pg_class"})
DENIED_RELATION_PREFIXES = ("pg_stat_", "pg_statio_")
_PG_TEMP = re.compile(r"^pg_temp(_\d+)?$")
_CATALOG_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome for one SQL text: the command it runs, or why it was refused."""

    command: str
    fingerprint: str
    rejection: str | None = None
    # The most rows the statement can return, when its top level says so: LIMIT n
    # (``row_limit``) or LIMIT $k (``limit_param`` = k, the bound comes with the parameters).
    row_limit: int | None = None
    limit_param: int | None = None

    def row_bound(self, params: Sequence[Any]) -> int | None:
        """The most rows the statement returns with ``params``, when the statement says."""
        if self.limit_param is None:
            return self.row_limit
        value = params[self.limit_param - 1] if self.limit_param <= len(params) else None
        return value if type(value) is int and value >= 0 else None


def _limit(top: Any) -> tuple[int | None, int | None]:
    """A top-level SELECT's LIMIT / FETCH FIRST ... ONLY: a constant, or the number of the
    parameter it is (cast or not).  Anything else (an expression, WITH TIES) bounds nothing."""
    if not isinstance(top, ast.SelectStmt) or top.limitOption != enums.LimitOption.LIMIT_OPTION_COUNT:
        return None, None
    count = top.limitCount
    if isinstance(count, ast.TypeCast):
        if _func_name(count.typeName.names) not in _INTEGER_TYPES:
            return None, None  # e.g. numeric(1,-1) rounds 5 up to 10
        count = count.arg
    if isinstance(count, ast.ParamRef):
        return None, count.number
    if isinstance(count, ast.A_Const) and not count.isnull and isinstance(count.val, ast.Integer):
        return max(int(count.val.ival), 0), None
    return None, None


_INTEGER_TYPES = frozenset({"int2", "int4", "int8"})


class Guard:
    """Checks caller SQL; built once per config, shared by all requests."""

    def __init__(self, cfg: GuardConfig) -> None:
        self._deny = (DENIED_FUNCTIONS | cfg.deny_functions) - cfg.allow_functions
        self._allow = cfg.allow_functions
        self._allow_call = cfg.allow_call
        self._cache: OrderedDict[str | bytes, Verdict] = OrderedDict()
        self._cache_size = cfg.cache_size

    def verdict(self, sql: str) -> Verdict:
        """The (cached) verdict for ``sql``, refused or not, judged here and now: only for
        texts of up to INLINE_CHARS, which the parser gets through quickly and safely
        (guard_pool.py judges longer ones in a worker process)."""
        key = _cache_key(sql)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = self.judge(sql)
            self._remember(key, verdict)
        else:
            self._cache.move_to_end(key)
        return verdict

    def cached(self, sql: str) -> Verdict | None:
        key = _cache_key(sql)
        verdict = self._cache.get(key)
        if verdict is not None:
            self._cache.move_to_end(key)
        return verdict

    def remember(self, sql: str, verdict: Verdict) -> None:
        self._remember(_cache_key(sql), verdict)

    def _remember(self, key: str | bytes, verdict: Verdict) -> None:
        self._cache[key] = verdict
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)  # the least recently used

    def check(self, sql: str) -> Verdict:
        """Return the verdict for ``sql``, raising ``statement_rejected`` when it is refused."""
        verdict = self.verdict(sql)
        if verdict.rejection is not None:
            raise ApiError(STATEMENT_REJECTED, verdict.rejection)
        return verdict

    def judge(self, sql: str) -> Verdict:
        """The verdict for ``sql``, uncached."""
        if "\x00" in sql:
            return Verdict("", "", "the statement contains a NUL character")
        try:
            stmts = parse_sql(sql)
            fp = fingerprint(sql)
        except ParseError as exc:
            return Verdict("", "", f"syntax error: {exc}")
        if len(stmts) != 1:
            return Verdict("", fp, f"exactly one statement is allowed, got {len(stmts)}")
        top: Any = stmts[0].stmt
        try:
            command = self._top_level(top)
            for node in _walk(top):
                self._node(node, node is top)
        except _Rejected as rej:
            return Verdict("", fp, str(rej))
        return Verdict(command, fp, None, *_limit(top))

    def _top_level(self, top: Any) -> str:
        if isinstance(top, ast.ExplainStmt):
            # Its row estimates (and, with COSTS OFF, the plan chosen from them) follow the
            # planner statistics, which are gathered over every tenant's rows.
            raise _Rejected("EXPLAIN is not allowed: its estimates come from statistics over every tenant's "
                            "rows; ask an operator to run it")
        if isinstance(top, ast.CallStmt):
            name = _func_name(top.funccall.funcname)
            if name not in self._allow_call:
                raise _Rejected(f"CALL {name} is not allowed")
            return "CALL"
        if isinstance(top, ast.MergeStmt):
            # PostgreSQL checks a matched target row against the UPDATE/DELETE policies by
            # raising an error, not by leaving the row out: the error tells whether another
            # tenant's row matched the join condition, an oracle on any of its values.
            raise _Rejected("MERGE is not allowed: PostgreSQL reports another tenant's matching row as an "
                            "error; use INSERT ... ON CONFLICT, UPDATE or DELETE")
        command = _TOP_LEVEL.get(type(top))
        if command is None:
            raise _Rejected(f"{_kind(top)} is not allowed")
        return command

    def _node(self, node: Any, is_top: bool) -> None:
        if isinstance(node, ast.SelectStmt) and node.intoClause is not None:
            raise _Rejected("SELECT INTO is not allowed")
        if isinstance(node, ast.FuncCall):
            self._function(node.funcname)
        elif isinstance(node, ast.RangeVar):
            if node.schemaname and _PG_TEMP.match(node.schemaname):
                raise _Rejected("references to pg_temp are not allowed")
            if node.relpersistence == "t":
                raise _Rejected("temporary objects are not allowed")
            if node.schemaname in (None, "pg_catalog") and (
                    node.relname in DENIED_RELATIONS or node.relname.startswith(DENIED_RELATION_PREFIXES)):
                if node.relname == "pg_class":
                    raise _Rejected("pg_class is not allowed: its row and page counts cover every tenant's rows; "
                                    "use information_schema or pg_tables")
                raise _Rejected(f"{node.relname} is not allowed: it shows every tenant's activity")
        elif isinstance(node, ast.OnConflictClause):
            if node.action == enums.OnConflictAction.ONCONFLICT_UPDATE and node.whereClause is not None:
                # PostgreSQL evaluates it on the conflicting row before RLS checks that row.
                raise _Rejected("ON CONFLICT ... DO UPDATE ... WHERE is not allowed: filter in the DO UPDATE's "
                                "SET (CASE) or in a separate UPDATE")
        elif isinstance(node, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)):
            rel = node.relation
            if rel.schemaname in _CATALOG_SCHEMAS or (rel.schemaname is None and rel.relname.startswith("pg_")):
                raise _Rejected(f"writes to catalog relation {rel.relname} are not allowed")
        elif isinstance(node, ast.TypeName):
            self._names(node.names)
        elif isinstance(node, ast.ColumnRef):
            self._names(node.fields)
            # `rel.f` and `(expr).f` are PostgreSQL's functional notation for `f(rel)`.
            for part in node.fields[1:]:
                self._field(part)
        elif isinstance(node, ast.A_Indirection):
            for part in node.indirection:
                self._field(part)
        elif not is_top and type(node).__name__.endswith("Stmt") and not isinstance(node, _NESTED_OK):
            raise _Rejected(f"{_kind(node)} is not allowed")

    def _function(self, funcname: Any) -> None:
        self._names(funcname)
        name = _func_name(funcname)
        if self._denied(name):
            raise _Rejected(f"function {name} is not allowed")

    def _field(self, part: Any) -> None:
        if isinstance(part, ast.String) and self._denied(part.sval):
            raise _Rejected(f"function {part.sval} is not allowed (called as a field)")

    def _denied(self, name: str) -> bool:
        return name not in self._allow and (name in self._deny or name.startswith(DENIED_PREFIXES))

    @staticmethod
    def _names(names: Any) -> None:
        for part in names or ():
            if isinstance(part, ast.String) and _PG_TEMP.match(part.sval):
                raise _Rejected("references to pg_temp are not allowed")


class _Rejected(Exception):
    pass


# Texts up to this long are parsed on the event loop.  Each level of nesting costs at
# least two characters ("1+", "f("), so such a text nests at most 512 deep: the C parser
# needs about 400 bytes of stack a level and crashed the process past ~20,000 levels on
# an 8 MB stack, and the slowest shapes parse at ~25 us a character (25 ms here).
INLINE_CHARS = 1024


def _cache_key(sql: str) -> str | bytes:
    """Long texts are cached under a digest: the cache holds ``cache_size`` entries
    whatever the callers send."""
    if len(sql) <= INLINE_CHARS:
        return sql
    return hashlib.blake2b(sql.encode("utf-8", "surrogatepass"), digest_size=20).digest()


def _walk(root: Any) -> Iterator[Any]:
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Node):
            yield item
            for field in item.__slots__:
                value = getattr(item, field, None)
                if isinstance(value, (ast.Node, tuple)):
                    stack.append(value)
        elif isinstance(item, tuple):
            stack.extend(item)


def _func_name(funcname: Any) -> str:
    return str(funcname[-1].sval)


_KIND_NAMES = {
    "VariableSetStmt": "SET/RESET", "VariableShowStmt": "SHOW", "TransactionStmt": "transaction control",
    "DoStmt": "DO", "CopyStmt": "COPY", "ListenStmt": "LISTEN", "NotifyStmt": "NOTIFY",
    "UnlistenStmt": "UNLISTEN", "PrepareStmt": "PREPARE", "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE", "DeclareCursorStmt": "DECLARE CURSOR", "FetchStmt": "FETCH/MOVE",
    "ClosePortalStmt": "CLOSE", "LockStmt": "LOCK", "CallStmt": "CALL", "DiscardStmt": "DISCARD",
    "CreateTableAsStmt": "CREATE TABLE AS", "VacuumStmt": "VACUUM/ANALYZE", "CheckPointStmt": "CHECKPOINT",
    "LoadStmt": "LOAD",
}


def _kind(node: object) -> str:
    name = type(node).__name__
    if name in _KIND_NAMES:
        return _KIND_NAMES[name]
    if name.endswith("Stmt"):
        return f"DDL/utility statement {name}"
    return name
