-- Hardening: the walls that hold even if a statement slips past the gateway's SQL guard.
-- Idempotent.  `tenant-proxy audit` checks every one of these.

-- set_config() is how SQL text can change app.tenant_id mid-transaction (also reachable
-- through UPDATE pg_settings, whose rule calls it).  The gateway sets the tenant with
-- SET LOCAL, a command, so nobody that runs caller SQL needs the function.
REVOKE EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) FROM PUBLIC;

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
