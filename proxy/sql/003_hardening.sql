-- Hardening: the walls that hold even if a statement slips past the gateway's SQL guard.
-- Idempotent.  `tenant-proxy audit` checks every one of these.

-- set_config() is how SQL text can change app.tenant_id mid-transaction (also reachable
-- through UPDATE pg_settings, whose rule calls it).  The gateway sets the tenant with
-- SET LOCAL, a command, so nobody that runs caller SQL needs the function.
REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC;

-- Built-in functions that run SQL given as text (past the gateway's guard), take locks
-- that outlive the transaction, signal other backends (every gateway backend runs as
-- the same role, so it may signal them all), reach large objects (shared by every
-- tenant) or leave session values for the next tenant.  Keep this list in step with
-- proxy/audit.py DANGEROUS_FUNCTIONS: the audit reports any the role can still run.
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
    WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY (ARRAY[
      'query_to_xml', 'query_to_xmlschema', 'query_to_xml_and_xmlschema', 'ts_stat', 'ts_rewrite',
      'cursor_to_xml', 'cursor_to_xmlschema',
      'pg_advisory_lock', 'pg_advisory_lock_shared', 'pg_try_advisory_lock', 'pg_try_advisory_lock_shared',
      'pg_advisory_unlock', 'pg_advisory_unlock_shared', 'pg_advisory_unlock_all',
      -- transaction-level advisory locks too: each call takes a slot of the cluster's shared
      -- lock table, and ~23,000 in one statement fill it for every tenant ("out of shared memory")
      'pg_advisory_xact_lock', 'pg_advisory_xact_lock_shared', 'pg_try_advisory_xact_lock',
      'pg_try_advisory_xact_lock_shared',
      'pg_terminate_backend', 'pg_cancel_backend', 'pg_notify',
      'lo_open', 'lo_close', 'loread', 'lowrite', 'lo_lseek', 'lo_lseek64', 'lo_creat', 'lo_create',
      'lo_tell', 'lo_tell64', 'lo_truncate', 'lo_truncate64', 'lo_unlink', 'lo_import', 'lo_export',
      'lo_from_bytea', 'lo_get', 'lo_put',
      'setseed'])
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END
$$;

-- No object creation by callers: temp tables/functions would shadow real ones for the
-- next client on the same pooled backend, and anything created in a schema outlives
-- the request.
DO $$
BEGIN
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM app', current_database());
END
$$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM app;

-- Procedural languages are for migrations (run by the owner), not for callers.
REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC;
GRANT USAGE ON LANGUAGE plpgsql TO app_owner;

-- JIT compiles long analytical plans; the gateway's short OLTP transactions only pay
-- its start-up cost.  Also spares drivers from toggling it per session (asyncpg does
-- that with set_config during type introspection).
ALTER ROLE app SET jit = off;

-- A backstop for a transaction left open between two of the gateway's steps (a stalled
-- streaming client is cut off by server.stream_write_timeout_s, 30 s by default; a
-- gateway frozen mid-request has no such timer): the backend ends it and its session,
-- and PgBouncer gets a fresh one.  Above every timeout the gateway sets itself.
ALTER ROLE app SET idle_in_transaction_session_timeout = '5min';

-- Activity across tenants.  Every tenant's transactions run as this one role, so a view
-- that shows "your own role's" backends shows every tenant's SQL text with its literals
-- (pg_stat_activity, and the pool wall's query with the last tenant's id), locks
-- (pg_locks), per-table activity and row counts (pg_stat_*/pg_statio_*), sizes, and
-- cluster-wide counters (transaction ids, WAL positions).  The views call these functions
-- with the caller's privileges, so revoking the functions closes the views too.  Monitoring
-- keeps them through pg_monitor (postgres_exporter's usual role).  Keep this list in step
-- with proxy/guard.py ACTIVITY_FUNCTIONS (the guard refuses them, the audit reports them).
-- tests/unit/test_deploy_files.py checks that they agree.
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN
    SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
    WHERE p.pronamespace = 'pg_catalog'::regnamespace AND (
      p.proname LIKE 'pg\_stat\_get\_%' OR p.proname = ANY (ARRAY[
        'pg_lock_status', 'pg_blocking_pids', 'pg_safe_snapshot_blocking_pids', 'pg_isolation_test_session_is_blocked',
        'txid_current', 'txid_current_if_assigned', 'txid_current_snapshot', 'txid_status',
        'pg_current_xact_id', 'pg_current_xact_id_if_assigned', 'pg_current_snapshot', 'pg_xact_status',
        'pg_current_wal_lsn', 'pg_current_wal_insert_lsn', 'pg_current_wal_flush_lsn', 'pg_last_wal_receive_lsn',
        'pg_last_wal_replay_lsn', 'pg_last_xact_replay_timestamp',
        'pg_relation_size', 'pg_table_size', 'pg_total_relation_size', 'pg_indexes_size', 'pg_database_size',
        'pg_tablespace_size', 'pg_prepared_xact', 'pg_get_backend_memory_contexts',
        'pg_stat_statements', 'pg_stat_statements_info',
        'mxid_age', 'pg_xact_commit_timestamp', 'pg_xact_commit_timestamp_origin', 'pg_last_committed_xact',
        'pg_get_multixact_members',
        'pg_control_checkpoint', 'pg_control_system', 'pg_control_init', 'pg_control_recovery'])
      -- age(xid) counts from the current transaction id; age(timestamp) stays
      OR p.oid = 'pg_catalog.age(xid)'::regprocedure)
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pg_monitor', f);
  END LOOP;
END
$$;
-- Resources every tenant shares, bounded for the one role that runs them all (the gateway
-- also bounds time: statement_timeout per statement, a deadline per transaction):
--   temp_file_limit   one sort or hash spilling to disk stops at 1 GB (it wrote 808 MB in 5 s)
--   work_mem          memory per sort/hash node before it spills (the default, made explicit)
--   max_parallel_workers_per_gather  parallel workers come from one cluster-wide pool
--                     (max_parallel_workers): one tenant's scans could take them all
--   lock_timeout      a statement waiting on a lock gives up rather than holding its slot
-- No setting bounds one backend's memory as a whole (a string_agg of a large table grows to
-- the 1 GB value limit): docs/security.md lists it as a residual risk.
ALTER ROLE app SET temp_file_limit = '1GB';
ALTER ROLE app SET work_mem = '4MB';
ALTER ROLE app SET max_parallel_workers_per_gather = 0;
ALTER ROLE app SET lock_timeout = '10s';
