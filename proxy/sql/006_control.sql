-- The control catalog's role (docs/scaling.md, docs/runbook.md).  Idempotent.
--   tenant_proxy_control  what control.dsn logs in as: `tenant-proxy control init` creates
--                         schema tenant_proxy with it (so it owns the catalog), and every
--                         gateway instance LISTENs and writes heartbeats with it.  It is not
--                         the gateway's `app` role and gets nothing on tenant tables; `app`
--                         gets nothing on the catalog (the schema is not granted to PUBLIC).
-- Set its password out of band: ALTER ROLE tenant_proxy_control PASSWORD '...'.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenant_proxy_control') THEN
    CREATE ROLE tenant_proxy_control LOGIN;
  END IF;
  EXECUTE format('GRANT CREATE ON DATABASE %I TO tenant_proxy_control', current_database());
END
$$;
ALTER ROLE tenant_proxy_control NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION;
