-- Demo data for `make run`: two tenants with a few events each.
--   acme   11111111-1111-4111-8111-111111111111
--   globex 22222222-2222-4222-8222-222222222222
-- Runs as the superuser (which is not subject to RLS), so it can write both tenants.
INSERT INTO public.events (id, tenant_id, event_type, data, created_at) VALUES
  ('a0000000-0000-4000-8000-000000000001', '11111111-1111-4111-8111-111111111111', 'deal.created',
   '{"deal": "Anvils for Road Runner", "amount": 1200}', '2026-11-01T09:00:00Z'),
  ('a0000000-0000-4000-8000-000000000002', '11111111-1111-4111-8111-111111111111', 'deal.won',
   '{"deal": "Anvils for Road Runner", "amount": 1200}', '2026-11-03T15:30:00Z'),
  ('a0000000-0000-4000-8000-000000000003', '11111111-1111-4111-8111-111111111111', 'contact.added',
   '{"name": "Wile E. Coyote"}', '2026-11-04T08:15:00Z'),
  ('b0000000-0000-4000-8000-000000000001', '22222222-2222-4222-8222-222222222222', 'deal.created',
   '{"deal": "Doomsday device", "amount": 99000}', '2026-11-02T10:00:00Z'),
  ('b0000000-0000-4000-8000-000000000002', '22222222-2222-4222-8222-222222222222', 'contact.added',
   '{"name": "Hank Scorpio"}', '2026-11-05T11:45:00Z')
ON CONFLICT (tenant_id, id, created_at) DO NOTHING;
