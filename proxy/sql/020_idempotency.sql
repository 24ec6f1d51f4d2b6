-- Idempotency records: one row per (tenant, Idempotency-Key) written in the same
-- transaction as the request's own writes, so a write and its record commit together
-- or not at all.  Tenant-scoped with forced RLS like every other tenant table.
CREATE TABLE IF NOT EXISTS public.idempotency_keys (
  tenant_id     uuid NOT NULL DEFAULT public.current_tenant_id(),
  key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
  request_hash  text NOT NULL,
  status        integer,
  response      bytea,
  created_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (tenant_id, key)
);
ALTER TABLE public.idempotency_keys OWNER TO app_owner;
CREATE INDEX IF NOT EXISTS idx_idempotency_keys_created ON public.idempotency_keys (tenant_id, created_at);

ALTER TABLE public.idempotency_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.idempotency_keys FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON public.idempotency_keys;
CREATE POLICY tenant_isolation ON public.idempotency_keys
  USING (tenant_id = public.current_tenant_id())
  WITH CHECK (tenant_id = public.current_tenant_id());

REVOKE ALL ON public.idempotency_keys FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.idempotency_keys TO app;
