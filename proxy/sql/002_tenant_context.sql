-- The tenant context convention: the gateway runs, inside each transaction,
--   SET LOCAL app.tenant_id = '<canonical tenant uuid>'
-- and every policy compares tenant_id with current_tenant_id().  An unset or empty
-- setting yields NULL, which matches no row: the policies fail closed.
CREATE OR REPLACE FUNCTION public.current_tenant_id() RETURNS uuid
  LANGUAGE sql STABLE PARALLEL SAFE
  AS $$ SELECT nullif(pg_catalog.current_setting('app.tenant_id', true), '')::uuid $$;

ALTER FUNCTION public.current_tenant_id() OWNER TO app_owner;
REVOKE ALL ON FUNCTION public.current_tenant_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.current_tenant_id() TO app;
