// Drizzle ORM's neon-http driver against the gateway's POST /sql: one insert, one select.
// Driven by tests/integration/test_neon.py (GATEWAY_SQL_URL, GATEWAY_TOKEN_A, MARKER).
import { neon, neonConfig } from '@neondatabase/serverless';
import { and, eq } from 'drizzle-orm';
import { drizzle } from 'drizzle-orm/neon-http';
import { jsonb, pgTable, timestamp, uuid, varchar } from 'drizzle-orm/pg-core';

neonConfig.fetchEndpoint = process.env.GATEWAY_SQL_URL;
const sql = neon('postgresql://ignored:ignored@gateway.invalid/ignored', { authToken: process.env.GATEWAY_TOKEN_A });
const db = drizzle({ client: sql });

const events = pgTable('events', {
  id: uuid('id').defaultRandom(),
  tenantId: uuid('tenant_id'),
  eventType: varchar('event_type', { length: 255 }).notNull(),
  data: jsonb('data').notNull(),
  metadata: jsonb('metadata'),
  createdAt: timestamp('created_at', { withTimezone: true }).defaultNow(),
});

const marker = process.env.MARKER;
const inserted = await db.insert(events).values({ eventType: marker, data: { n: 7, tags: ['x', 'y'] } })
  .returning({ id: events.id, eventType: events.eventType, data: events.data, tenantId: events.tenantId });
const selected = await db.select().from(events)
  .where(and(eq(events.eventType, marker), eq(events.id, inserted[0].id)));
console.log(JSON.stringify({
  inserted,
  selected: selected.map((r) => ({ ...r, createdAtIsDate: r.createdAt instanceof Date })),
}));
