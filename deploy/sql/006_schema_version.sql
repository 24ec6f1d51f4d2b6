-- A schema version the gateway's statement-description cache checks in every request
-- that uses it.  Idempotent; run by a superuser (after 005_partitions.sql, which makes
-- the tenant_ddl schema).
--
-- Why: the gateway remembers, per SQL text, the parameter and result types PostgreSQL
-- described the first time, and then sends Parse, Bind and Execute in one round trip
-- instead of two.  Any DDL may change what a statement means (a column's type, a new
-- function overload), so every DDL transaction bumps the version below as part of
-- itself (committed or not with the DDL), and a transaction that used a description
-- commits only if the check below still passes: a stale description is never used
-- (docs/tuning.md, "Statement descriptions"; proxy/describe.py).
--
-- Sixty-four counters instead of one row: a DDL transaction takes the first counter
-- no other transaction holds (SKIP LOCKED), so concurrent migrations never wait on, or
-- deadlock over, the version; the version is the sum.
CREATE TABLE IF NOT EXISTS tenant_ddl.schema_version (
  slot int PRIMARY KEY CHECK (slot BETWEEN 0 AND 63),
  version bigint NOT NULL DEFAULT 0
);
INSERT INTO tenant_ddl.schema_version (slot) SELECT g FROM generate_series(0, 63) AS g ON CONFLICT DO NOTHING;
REVOKE ALL ON tenant_ddl.schema_version FROM PUBLIC;

CREATE OR REPLACE FUNCTION tenant_ddl.bump_schema_version() RETURNS event_trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
  AS $$
  DECLARE
    taken int;
  BEGIN
    SELECT slot INTO taken FROM tenant_ddl.schema_version ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF taken IS NULL THEN  -- sixty-four DDL transactions at once: wait for the first counter
      SELECT slot INTO taken FROM tenant_ddl.schema_version ORDER BY slot LIMIT 1 FOR UPDATE;
    END IF;
    UPDATE tenant_ddl.schema_version SET version = version + 1 WHERE slot = taken;
  END
  $$;
REVOKE ALL ON FUNCTION tenant_ddl.bump_schema_version() FROM PUBLIC;

DROP EVENT TRIGGER IF EXISTS bump_schema_version;
CREATE EVENT TRIGGER bump_schema_version ON ddl_command_end
  EXECUTE FUNCTION tenant_ddl.bump_schema_version();

-- The check: true when the version is `expected`, this session's search_path is
-- `expected_search_path` and the transaction is READ COMMITTED (search_path changes by
-- ALTER ROLE/DATABASE ... SET fire no event trigger and reach new backends only; other
-- isolation levels take their snapshot before the check could see a newer schema);
-- otherwise an error (SQLSTATE TPSV1) whose message ends with the current version, so
-- the gateway learns it without another query.  Pass NULLs to learn the version.
-- No SET search_path on the function: it reads the caller's.
DROP FUNCTION IF EXISTS tenant_ddl.check_schema_version(bigint);
CREATE OR REPLACE FUNCTION tenant_ddl.check_schema_version(expected bigint, expected_search_path text)
  RETURNS boolean LANGUAGE plpgsql STABLE
  AS $$
  DECLARE
    current bigint;
  BEGIN
    SELECT pg_catalog.sum(s.version) INTO current FROM tenant_ddl.schema_version AS s;
    IF expected IS DISTINCT FROM current
       OR expected_search_path IS DISTINCT FROM pg_catalog.current_setting('search_path')
       OR pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.<>) 'read committed' THEN
      RAISE EXCEPTION 'schema version %', current USING ERRCODE = 'TPSV1';
    END IF;
    RETURN true;
  END
  $$;
REVOKE ALL ON FUNCTION tenant_ddl.check_schema_version(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tenant_ddl.check_schema_version(bigint, text) TO app;
-- The check runs with the caller's rights (the audit warns of SECURITY DEFINER functions
-- the gateway's role may call), so that role reads the counters: schema metadata, no
-- tenant's data.
GRANT SELECT ON tenant_ddl.schema_version TO app;
