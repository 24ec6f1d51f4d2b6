-- Roles for tenant isolation.  Idempotent: safe to run on every deploy.
--   app_owner  owns tenant tables and runs migrations; never used by the gateway.
--   app        the gateway's login role: not superuser, no BYPASSRLS, owns nothing.
-- Passwords are not set here: set them out of band (ALTER ROLE app PASSWORD ...).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_owner') THEN
    CREATE ROLE app_owner NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app') THEN
    CREATE ROLE app LOGIN;
  END IF;
END
$$;

ALTER ROLE app NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION NOINHERIT;
GRANT USAGE ON SCHEMA public TO app;
GRANT USAGE, CREATE ON SCHEMA public TO app_owner;
