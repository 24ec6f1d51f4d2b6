-- The ADR's events table: the worked example every tenant table copies.
--   1. a NOT NULL tenant_id column (defaulting to the caller's tenant),
--   2. indexes led by tenant_id,
--   3. RLS enabled AND forced (so even the owner is confined), one policy with USING
--      and WITH CHECK on current_tenant_id(),
--   4. owned by app_owner, with DML only granted to the gateway role.
CREATE TABLE IF NOT EXISTS public.events (
  id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  tenant_id   uuid NOT NULL DEFAULT public.current_tenant_id(),
  event_type  varchar(255) NOT NULL,
  data        jsonb NOT NULL,
  metadata    jsonb,
  created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.events OWNER TO app_owner;

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
