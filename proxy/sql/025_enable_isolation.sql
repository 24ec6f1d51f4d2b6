-- tenant_ddl.enable_isolation(table): make a table that has the tenant column a tenant
-- table, the way public.events is one, in one call from a migration:
--
--   SELECT tenant_ddl.enable_isolation('public.tickets');
--
-- It enables and forces row-level security, creates the standard policy (USING and WITH
-- CHECK on current_tenant_id()), grants the gateway's role DML (and its sequences), and
-- sets a replica identity that lets `tenant-proxy move` follow UPDATEs and DELETEs (the
-- primary key when it holds the tenant column, else FULL).  A partitioned table gets the
-- same on every partition (new ones get it from the event trigger of 005).  Idempotent.
-- It refuses, changing nothing, a table without the tenant column and one with a
-- primary/unique key that lacks it (such a key lets a tenant learn of another's rows;
-- docs/security.md).  Run it as the table's owner or a superuser; then run
-- `tenant-proxy audit`.
CREATE OR REPLACE FUNCTION tenant_ddl.enable_isolation(tbl regclass, tenant_column name DEFAULT 'tenant_id',
                                                       gateway_role name DEFAULT 'app') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  col_type text;
  bad_key text;
  pk_has_column boolean;
  rel regclass;
  seq regclass;
  done text[] := '{}';
BEGIN
  SELECT format_type(a.atttypid, NULL) INTO col_type FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = tbl AND a.attname = tenant_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF col_type IS NULL THEN
    RAISE EXCEPTION 'table % has no column %: a tenant table needs one', tbl, tenant_column
      USING ERRCODE = '42703';
  END IF;
  SELECT i.indexrelid::regclass::text INTO bad_key FROM pg_catalog.pg_index i
   WHERE i.indrelid = tbl AND i.indisunique
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attname = tenant_column
                       AND a.attnum = ANY (i.indkey))
   LIMIT 1;
  IF bad_key IS NOT NULL THEN
    RAISE EXCEPTION 'unique index % of % lacks %: a conflict on it would tell one tenant of another''s row',
      bad_key, tbl, tenant_column
      USING ERRCODE = '42P17', HINT = format('put %I first in the key, then call enable_isolation again',
                                              tenant_column);
  END IF;
  pk_has_column := EXISTS (
    SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_attribute a
        ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = tbl AND i.indisprimary AND a.attname = tenant_column);
  FOR rel IN SELECT tbl UNION ALL SELECT relid FROM pg_catalog.pg_partition_tree(tbl) WHERE relid <> tbl
  LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', rel);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', rel);
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid = rel AND polname = 'tenant_isolation') THEN
      EXECUTE format('CREATE POLICY tenant_isolation ON %s USING (%I = public.current_tenant_id()::%s) '
                     'WITH CHECK (%I = public.current_tenant_id()::%s)',
                     rel, tenant_column, col_type, tenant_column, col_type);
    END IF;
    IF NOT pk_has_column AND (SELECT relkind FROM pg_catalog.pg_class WHERE oid = rel) <> 'p' THEN
      EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', rel);
    END IF;
  END LOOP;
  EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO %I', tbl, gateway_role);
  FOR seq IN SELECT d.objid::regclass FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class c ON c.oid = d.objid
              WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refobjid = tbl AND d.deptype IN ('a', 'i')
                AND c.relkind = 'S'
  LOOP
    EXECUTE format('GRANT USAGE ON SEQUENCE %s TO %I', seq, gateway_role);
  END LOOP;
  RETURN format('%s is a tenant table: row-level security forced, policy tenant_isolation on %I, DML granted to '
                '%I, replica identity %s', tbl, tenant_column, gateway_role,
                CASE WHEN pk_has_column THEN 'its primary key' ELSE 'FULL' END);
END
$$;
REVOKE EXECUTE ON FUNCTION tenant_ddl.enable_isolation(regclass, name, name) FROM PUBLIC;
