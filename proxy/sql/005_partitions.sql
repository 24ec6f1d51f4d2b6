-- Partitioned tenant tables: pg_partman, and the event trigger that keeps every partition
-- of a tenant table as confined as its parent.  Idempotent; run by a superuser.
--
-- Why the trigger: row-level security is checked on the table a query names.  A query
-- through the parent uses the parent's policies, but a query that names a partition
-- (`SELECT * FROM events_p2026_11`) uses the partition's own, and PostgreSQL copies
-- neither RLS nor policies to partitions (nor does pg_partman).  With RLS on the parent
-- only, any role granted SELECT on a partition reads every tenant's rows in it.

-- pg_partman (Debian: postgresql-15-partman) creates monthly partitions ahead and
-- retires old ones; ops schedule its maintenance as a superuser (it calls set_config,
-- which 003_hardening.sql revokes from PUBLIC), see docs/lifecycle.md.  Its functions
-- are never for the gateway's role: some are SECURITY DEFINER, and PUBLIC may execute
-- an extension's functions by default.
CREATE SCHEMA IF NOT EXISTS partman;
CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman;
REVOKE ALL ON SCHEMA partman FROM PUBLIC;
REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA partman FROM PUBLIC;

CREATE SCHEMA IF NOT EXISTS tenant_ddl;
REVOKE ALL ON SCHEMA tenant_ddl FROM PUBLIC;
-- The event triggers call the read-only helpers below as whoever runs the DDL (a table's
-- owner, which need not be a superuser), so that role must reach them.  They only read
-- catalogs every role may read and return text; the trigger functions themselves are
-- not executable by PUBLIC.
GRANT USAGE ON SCHEMA tenant_ddl TO PUBLIC;

-- A policy's meaning, comparable across tables: command, permissive or restrictive,
-- roles, and the USING / WITH CHECK expressions as deparsed text (column names, not
-- numbers, so a partition whose columns sit in another order still compares equal).
CREATE OR REPLACE FUNCTION tenant_ddl.policy_signature(policy oid) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog
  AS $$
    SELECT format('%s|%s|%s|%L|%L', p.polcmd, p.polpermissive,
                  ARRAY(SELECT r FROM unnest(p.polroles) AS r ORDER BY r),
                  pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
    FROM pg_policy p WHERE p.oid = policy
  $$;

-- What makes a partition weaker than its direct parent, one line each (empty when
-- it is at least as confined).  A missing permissive policy only hides rows, so it is
-- not a weakness; a missing restrictive one, or a permissive one the parent lacks, is.
CREATE OR REPLACE FUNCTION tenant_ddl.partition_weaknesses(part oid) RETURNS text[]
  LANGUAGE sql STABLE SET search_path = pg_catalog
  AS $$
    WITH rel AS (
      SELECT c.oid, c.relrowsecurity AS rls, c.relforcerowsecurity AS forced,
             q.oid AS parent, q.relrowsecurity AS parent_rls, q.relforcerowsecurity AS parent_forced
      FROM pg_class c
      JOIN pg_inherits i ON i.inhrelid = c.oid
      JOIN pg_class q ON q.oid = i.inhparent
      WHERE c.oid = part AND c.relispartition
    )
    SELECT ARRAY(
      SELECT w FROM (
        SELECT 1 AS o, 'row-level security is not enabled' AS w FROM rel WHERE parent_rls AND NOT rls
        UNION ALL
        SELECT 2, 'row-level security is not forced' FROM rel WHERE parent_forced AND NOT forced
        UNION ALL
        SELECT 3, format('permissive policy %I is not one of its parent''s', p.polname)
        FROM rel JOIN pg_policy p ON p.polrelid = rel.oid
        WHERE p.polpermissive AND NOT EXISTS (
          SELECT 1 FROM pg_policy q WHERE q.polrelid = rel.parent AND q.polpermissive
            AND tenant_ddl.policy_signature(q.oid) = tenant_ddl.policy_signature(p.oid))
        UNION ALL
        SELECT 4, format('restrictive policy %I of its parent is missing', q.polname)
        FROM rel JOIN pg_policy q ON q.polrelid = rel.parent
        WHERE NOT q.polpermissive AND NOT EXISTS (
          SELECT 1 FROM pg_policy p WHERE p.polrelid = rel.oid
            AND tenant_ddl.policy_signature(p.oid) = tenant_ddl.policy_signature(q.oid))
      ) AS found ORDER BY o, w)
  $$;
-- The statement that creates the same policy (name, kind, command, roles, expressions)
-- on another table.
CREATE OR REPLACE FUNCTION tenant_ddl.policy_ddl(policy oid, target regclass) RETURNS text
  LANGUAGE sql STABLE SET search_path = pg_catalog
  AS $$
    SELECT format('CREATE POLICY %I ON %s AS %s FOR %s TO %s', q.polname, target,
                  CASE WHEN q.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                  CASE q.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                  (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                   FROM unnest(q.polroles) AS r))
           || coalesce(' USING (' || pg_get_expr(q.polqual, q.polrelid) || ')', '')
           || coalesce(' WITH CHECK (' || pg_get_expr(q.polwithcheck, q.polrelid) || ')', '')
    FROM pg_policy q WHERE q.oid = policy
  $$;

DO $$
DECLARE f text;
BEGIN
  FOREACH f IN ARRAY ARRAY['tenant_ddl.policy_signature(oid)', 'tenant_ddl.partition_weaknesses(oid)',
                           'tenant_ddl.policy_ddl(oid, regclass)'] LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', f);
  END LOOP;
END
$$;

-- The event triggers.  After CREATE TABLE / ALTER TABLE / CREATE POLICY / ALTER POLICY:
--   * a partition weaker than its parent, found at or under a table the command created,
--     or under one it changed (CREATE TABLE ... PARTITION OF, ATTACH PARTITION, pg_partman's
--     CREATE TABLE (LIKE ...) + ATTACH), gets the parent's policies, RLS settings and
--     owner copied onto it, parents before children;
--   * a policy created or altered on a partitioned table is copied to every partition
--     under it (and a dropped one dropped from them, by the sql_drop trigger below);
--   * a command that leaves an existing partition weaker than its parent (ALTER TABLE
--     ... DISABLE ROW LEVEL SECURITY on a partition, a wider policy on a partition) is
--     refused.
-- They run as the role running the DDL, which owns the partition (PostgreSQL requires
-- that to create or attach one), so it may change it.  Their own DDL would fire them
-- again: the transaction-local setting tenant_ddl.copying (SET LOCAL needs no privilege)
-- skips those inner runs.  This guards against mistakes, not against a hostile table
-- owner, who could as well weaken the parent; `tenant-proxy audit` reports both.
CREATE OR REPLACE FUNCTION tenant_ddl.confine_partitions() RETURNS event_trigger
  LANGUAGE plpgsql SET search_path = pg_catalog
  AS $fn$
DECLARE
  cmd record;
  pol record;
  rel record;
  part record;
  created oid[] := '{}';  -- checked themselves, and everything under them
  changed oid[] := '{}';  -- everything under them
  mirrored oid[] := '{}'; -- policies of partitioned tables, copied down
  weak text[];
  flags text[];
  owner name;
BEGIN
  IF current_setting('tenant_ddl.copying', true) = 'on' THEN
    RETURN;
  END IF;
  FOR cmd IN SELECT e.classid, e.objid, e.command_tag FROM pg_event_trigger_ddl_commands() AS e LOOP
    IF cmd.classid = 'pg_catalog.pg_policy'::regclass THEN
      SELECT p.oid, p.polname, p.polpermissive, c.oid AS rel, c.relkind, c.relispartition, i.inhparent
        INTO pol
        FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
        LEFT JOIN pg_inherits i ON i.inhrelid = c.oid AND c.relispartition
        WHERE p.oid = cmd.objid;
      CONTINUE WHEN NOT FOUND;
      IF pol.relispartition AND NOT EXISTS (
          SELECT 1 FROM pg_policy q WHERE q.polrelid = pol.inhparent
            AND tenant_ddl.policy_signature(q.oid) = tenant_ddl.policy_signature(pol.oid))
        AND (pol.polpermissive OR EXISTS (
          SELECT 1 FROM pg_policy q WHERE q.polrelid = pol.inhparent AND q.polname = pol.polname)) THEN
        RAISE EXCEPTION 'refused: policy % on partition % is not one of the policies of its parent %',
          quote_ident(pol.polname), pol.rel::regclass, pol.inhparent::regclass
          USING ERRCODE = 'insufficient_privilege',
                HINT = 'A partition of a tenant table keeps exactly its parent''s policies: change the parent''s.';
      END IF;
      IF pol.relkind = 'p' THEN
        mirrored := mirrored || pol.oid;
      END IF;
    ELSIF cmd.classid = 'pg_catalog.pg_class'::regclass THEN
      SELECT c.oid, c.relispartition INTO rel
        FROM pg_class c WHERE c.oid = cmd.objid AND c.relkind IN ('r', 'p');
      CONTINUE WHEN NOT FOUND;
      IF cmd.command_tag = 'CREATE TABLE' THEN
        created := created || rel.oid;
        CONTINUE;
      END IF;
      IF rel.relispartition THEN
        weak := tenant_ddl.partition_weaknesses(rel.oid);
        IF cardinality(weak) > 0 THEN
          RAISE EXCEPTION 'refused: partition % would be less confined than its parent: %',
            rel.oid::regclass, array_to_string(weak, '; ')
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'A partition of a tenant table keeps its parent''s row-level security settings '
                         'and policies; `tenant-proxy audit` prints the SQL that restores them.';
        END IF;
      END IF;
      changed := changed || rel.oid;
    END IF;
  END LOOP;

  EXECUTE 'SET LOCAL tenant_ddl.copying = on';
  -- A policy of a partitioned table, onto every partition under it (replacing one of the
  -- same name that means something else).
  FOR pol IN
    SELECT q.oid, q.polname, t.relid
    FROM pg_policy q CROSS JOIN LATERAL pg_partition_tree(q.polrelid) AS t
    WHERE q.oid = ANY (mirrored) AND t.level > 0
    ORDER BY t.level, t.relid
  LOOP
    CONTINUE WHEN EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = pol.relid
                          AND tenant_ddl.policy_signature(p.oid) = tenant_ddl.policy_signature(pol.oid));
    IF EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = pol.relid AND p.polname = pol.polname) THEN
      EXECUTE format('DROP POLICY %I ON %s', pol.polname, pol.relid::regclass);
    END IF;
    EXECUTE tenant_ddl.policy_ddl(pol.oid, pol.relid::regclass);
  END LOOP;

  -- Partitions weaker than their parent, at or under what was created or changed.
  -- Parents come before children, so a sub-partition is compared with a parent already
  -- brought up to date.
  FOR part IN
    SELECT DISTINCT t.relid, i.inhparent AS parent,
           (SELECT count(*) FROM pg_partition_ancestors(t.relid)) AS depth
    FROM (SELECT oid, true AS self FROM unnest(created) AS oid
          UNION ALL SELECT oid, false FROM unnest(changed) AS oid) AS r
    CROSS JOIN LATERAL pg_partition_tree(r.oid) AS t
    JOIN pg_inherits i ON i.inhrelid = t.relid
    JOIN pg_class c ON c.oid = t.relid
    WHERE c.relispartition AND (r.self OR t.level > 0)
    ORDER BY depth, t.relid
  LOOP
    CONTINUE WHEN cardinality(tenant_ddl.partition_weaknesses(part.relid)) = 0;
    -- Policies first: drop those the parent lacks under that meaning (a restrictive one
    -- of its own name stays), create the parent's that are missing.
    FOR pol IN
      SELECT p.polname FROM pg_policy p
      WHERE p.polrelid = part.relid AND NOT EXISTS (
          SELECT 1 FROM pg_policy q WHERE q.polrelid = part.parent
            AND tenant_ddl.policy_signature(q.oid) = tenant_ddl.policy_signature(p.oid))
        AND (p.polpermissive OR EXISTS (
          SELECT 1 FROM pg_policy q WHERE q.polrelid = part.parent AND q.polname = p.polname))
    LOOP
      EXECUTE format('DROP POLICY %I ON %s', pol.polname, part.relid::regclass);
    END LOOP;
    FOR pol IN
      SELECT q.oid FROM pg_policy q
      WHERE q.polrelid = part.parent AND NOT EXISTS (
          SELECT 1 FROM pg_policy p WHERE p.polrelid = part.relid
            AND tenant_ddl.policy_signature(p.oid) = tenant_ddl.policy_signature(q.oid))
    LOOP
      EXECUTE tenant_ddl.policy_ddl(pol.oid, part.relid::regclass);
    END LOOP;
    SELECT array_remove(ARRAY[
             CASE WHEN q.relrowsecurity AND NOT c.relrowsecurity THEN 'ENABLE ROW LEVEL SECURITY' END,
             CASE WHEN q.relforcerowsecurity AND NOT c.relforcerowsecurity THEN 'FORCE ROW LEVEL SECURITY' END],
             NULL),
           CASE WHEN c.relowner <> q.relowner THEN pg_get_userbyid(q.relowner) END
      INTO flags, owner
      FROM pg_class c, pg_class q WHERE c.oid = part.relid AND q.oid = part.parent;
    IF cardinality(flags) > 0 THEN
      EXECUTE format('ALTER TABLE %s %s', part.relid::regclass, array_to_string(flags, ', '));
    END IF;
    -- pg_partman creates partitions as whoever runs its maintenance: hand them to the
    -- parent's owner, like the tables the migrations make.
    IF owner IS NOT NULL THEN
      EXECUTE format('ALTER TABLE %s OWNER TO %I', part.relid::regclass, owner);
    END IF;
  END LOOP;
  EXECUTE 'SET LOCAL tenant_ddl.copying = off';
END
$fn$;

-- DROP POLICY on a partitioned table drops the policy of that name from every partition
-- under it (the policy itself is gone by now; its address names the table).
CREATE OR REPLACE FUNCTION tenant_ddl.drop_partition_policies() RETURNS event_trigger
  LANGUAGE plpgsql SET search_path = pg_catalog
  AS $fn$
DECLARE
  obj record;
  part record;
BEGIN
  IF current_setting('tenant_ddl.copying', true) = 'on' THEN
    RETURN;
  END IF;
  EXECUTE 'SET LOCAL tenant_ddl.copying = on';
  FOR obj IN
    SELECT d.address_names[3] AS polname, c.oid AS rel
    FROM pg_event_trigger_dropped_objects() AS d
    JOIN pg_namespace n ON n.nspname = d.address_names[1]
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = d.address_names[2] AND c.relkind = 'p'
    WHERE d.object_type = 'policy'
  LOOP
    FOR part IN SELECT t.relid FROM pg_partition_tree(obj.rel) AS t WHERE t.level > 0 ORDER BY t.level, t.relid LOOP
      EXECUTE format('DROP POLICY IF EXISTS %I ON %s', obj.polname, part.relid::regclass);
    END LOOP;
  END LOOP;
  EXECUTE 'SET LOCAL tenant_ddl.copying = off';
END
$fn$;

REVOKE ALL ON FUNCTION tenant_ddl.confine_partitions() FROM PUBLIC;
REVOKE ALL ON FUNCTION tenant_ddl.drop_partition_policies() FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS confine_partitions;
CREATE EVENT TRIGGER confine_partitions ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE POLICY', 'ALTER POLICY')
  EXECUTE FUNCTION tenant_ddl.confine_partitions();
DROP EVENT TRIGGER IF EXISTS drop_partition_policies;
CREATE EVENT TRIGGER drop_partition_policies ON sql_drop
  WHEN TAG IN ('DROP POLICY')
  EXECUTE FUNCTION tenant_ddl.drop_partition_policies();
