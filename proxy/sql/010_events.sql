-- The ADR's events table: the worked example every tenant table copies.
--   1. a NOT NULL tenant_id column (defaulting to the caller's tenant),
--   2. indexes led by tenant_id,
--   3. RLS enabled AND forced (so even the owner is confined), one policy with USING
--      and WITH CHECK on current_tenant_id(),
--   4. owned by app_owner, with DML only granted to the gateway role,
--   5. partitioned by month on created_at, partitions made ahead and retired by pg_partman
--      (005_partitions.sql); its event trigger gives every partition the parent's RLS
--      settings and policies.  The partition key must be part of every unique
--      constraint,
--   6. every primary and unique key starts with tenant_id: (tenant_id, id, created_at).
--      INSERT ... ON CONFLICT evaluates its DO UPDATE ... WHERE on the conflicting row before
--      RLS checks it, so a key another tenant's row can collide with reads that row.

-- A database from before partitioning has a plain events table: carry its rows over to
-- the partitioned one (dev and test databases; production migrates with pg_partman's
-- partition_data_proc, docs/lifecycle.md).
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = to_regclass('public.events') AND relkind = 'r') THEN
    CREATE TEMPORARY TABLE events_carried_over AS SELECT * FROM public.events;
    DROP TABLE public.events;
  END IF;
END
$$;

CREATE TABLE IF NOT EXISTS public.events (
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  tenant_id   uuid NOT NULL DEFAULT public.current_tenant_id(),
  event_type  varchar(255) NOT NULL,
  data        jsonb NOT NULL,
  metadata    jsonb,
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, id, created_at)
) PARTITION BY RANGE (created_at);
ALTER TABLE public.events OWNER TO app_owner;
-- A database from before the key included tenant_id.
DO $$
BEGIN
  IF (SELECT a.attname FROM pg_catalog.pg_index i
        JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
       WHERE i.indrelid = 'public.events'::regclass AND i.indisprimary) <> 'tenant_id' THEN
    ALTER TABLE public.events DROP CONSTRAINT events_pkey;
    ALTER TABLE public.events ADD PRIMARY KEY (tenant_id, id, created_at);
  END IF;
END
$$;

CREATE INDEX IF NOT EXISTS idx_events_tenant_type ON public.events (tenant_id, event_type);
CREATE INDEX IF NOT EXISTS idx_events_tenant_created ON public.events (tenant_id, created_at);
CREATE INDEX IF NOT EXISTS idx_events_data ON public.events USING gin (data jsonb_path_ops);
CREATE INDEX IF NOT EXISTS idx_events_created_brin ON public.events USING brin (created_at);

ALTER TABLE public.events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.events FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON public.events;
CREATE POLICY tenant_isolation ON public.events
  USING (tenant_id = public.current_tenant_id())
  WITH CHECK (tenant_id = public.current_tenant_id());

REVOKE ALL ON public.events FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.events TO app;

-- Monthly partitions, four made ahead (and four back from the first run), a default
-- partition for rows outside them, and partitions older than the retention dropped by
-- maintenance.  Set up once: afterwards ops own the settings in partman.part_config
-- (docs/lifecycle.md), and re-running this file leaves them alone.
-- pg_partman 4.x (Debian's postgresql-15-partman) calls PostgreSQL's declarative
-- partitioning 'native'; 5.x (the PostgreSQL project's packages) 'range'.
DO $$
DECLARE
  declarative text := CASE WHEN split_part((SELECT extversion FROM pg_catalog.pg_extension
                                            WHERE extname = 'pg_partman'), '.', 1)::int >= 5
                           THEN 'range' ELSE 'native' END;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM partman.part_config WHERE parent_table = 'public.events') THEN
    PERFORM partman.create_parent(p_parent_table := 'public.events', p_control := 'created_at',
                                  p_type := declarative, p_interval := '1 month', p_premake := 4,
                                  p_jobmon := false);
    UPDATE partman.part_config
       SET retention = '24 months', retention_keep_table = false, retention_keep_index = false,
           infinite_time_partitions = true
     WHERE parent_table = 'public.events';
  END IF;
END
$$;

DO $$
BEGIN
  IF to_regclass('pg_temp.events_carried_over') IS NOT NULL THEN
    INSERT INTO public.events SELECT * FROM pg_temp.events_carried_over;
    DROP TABLE pg_temp.events_carried_over;
  END IF;
END
$$;

-- The version before pg_partman 5 was handled, applied wherever pg_partman 4 is:
-- migrate: supersedes 08a88efad4b7edfa371abad5cce838a17540bad9c8eb3dc95553650ab7ecbcf9
