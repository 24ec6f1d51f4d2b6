-- PgBouncer's auth_query: PgBouncer looks client passwords up in PostgreSQL instead of
-- keeping a copy of every role's secret in its auth_file.  Idempotent.
--   pgbouncer_auth       the role PgBouncer logs in as (auth_user) to run the lookup; it
--                        can do nothing else.  Its password is set out of band, like app's:
--                        ALTER ROLE pgbouncer_auth PASSWORD '...';  and goes in auth_file.
--   pgbouncer.get_auth() reads pg_shadow (superuser-only) with its owner's rights, so the
--                        migrations must run as a superuser, which then owns it.
-- Only pgbouncer_auth may call the function: the gateway's role `app` runs caller SQL, and
-- a caller able to read SCRAM secrets could attack them offline (`tenant-proxy audit`
-- warns about any SECURITY DEFINER function the gateway's role can execute).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbouncer_auth') THEN
    CREATE ROLE pgbouncer_auth NOLOGIN;
  END IF;
END
$$;
-- Created NOLOGIN above so a half-applied script never leaves a login role without these
-- attributes; LOGIN is granted here, with everything else taken away, on every run.
ALTER ROLE pgbouncer_auth LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION NOINHERIT;

CREATE SCHEMA IF NOT EXISTS pgbouncer;
REVOKE ALL ON SCHEMA pgbouncer FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbouncer TO pgbouncer_auth;

-- Returns a role's SCRAM secret only for roles that may log in through PgBouncer:
--   not a superuser, not a replication role, no BYPASSRLS (the pooler is the tenant data
--   path: nothing that ignores the policies belongs on it), not pgbouncer_auth itself
--   (it is in auth_file), password not expired, and a SCRAM secret (PgBouncer runs
--   auth_type = scram-sha-256 and logs in to PostgreSQL by SCRAM pass-through, which
--   needs the very secret PostgreSQL holds; an md5 hash or no password is no use).
-- Any other name returns no row, which PgBouncer reports as a failed login.
-- search_path is pinned so no object a caller creates can stand in for a catalog one.
CREATE OR REPLACE FUNCTION pgbouncer.get_auth(p_usename text)
  RETURNS TABLE (usename name, passwd text)
  LANGUAGE sql STABLE SECURITY DEFINER
  SET search_path = pg_catalog
  AS $$
    SELECT s.usename, s.passwd
    FROM pg_catalog.pg_shadow s
    WHERE s.usename = p_usename
      AND NOT s.usesuper
      AND NOT s.userepl
      AND NOT s.usebypassrls
      AND s.usename <> 'pgbouncer_auth'
      AND pg_catalog.starts_with(s.passwd, 'SCRAM-SHA-256$')
      AND (s.valuntil IS NULL OR s.valuntil > pg_catalog.now())
  $$;

REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM app;
GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer_auth;
