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
