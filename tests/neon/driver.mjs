// Neon's serverless driver against the gateway's POST /sql.  Driven by
// tests/integration/test_neon.py: GATEWAY_SQL_URL, GATEWAY_TOKEN_A/B, MARKER in the
// environment; prints one JSON object with what each step saw.
import { neon, neonConfig } from '@neondatabase/serverless';

neonConfig.fetchEndpoint = process.env.GATEWAY_SQL_URL;
// The driver insists on a postgres URL; the gateway ignores it (the bearer token decides).
const URL = 'postgresql://ignored:ignored@gateway.invalid/ignored';
const sqlA = neon(URL, { authToken: process.env.GATEWAY_TOKEN_A });
const sqlB = neon(URL, { authToken: process.env.GATEWAY_TOKEN_B });
const marker = process.env.MARKER;

function failure(err) {
  return { name: err.name, message: err.message, code: err.code, severity: err.severity, detail: err.detail,
           hint: err.hint };
}

const out = {};
out.select = await sqlA`SELECT 1 AS one, 'x'::text AS two, 1.5::float8 AS f, true AS b, ARRAY[1, 2] AS arr,
  '{"a": [1, null]}'::jsonb AS j, 12345678901234::int8 AS big, 1.50::numeric AS num, NULL::text AS nothing,
  '2024-01-02 03:04:05.5+00'::timestamptz AS at, '\\x0102'::bytea AS bytes`;
out.select[0].at = out.select[0].at.toISOString();
out.select[0].bytes = Array.from(out.select[0].bytes);
out.params = await sqlA.query('SELECT $1::int + 1 AS next, $2::text AS t, $3::int[] AS arr, $4::jsonb AS j',
                              [41, 'hello', [1, 2, 3], { k: 'v' }]);
out.fullResults = await sqlA.query('SELECT $1::text AS t', ['x'], { fullResults: true, arrayMode: true });
out.fullResults = { rows: out.fullResults.rows, fields: out.fullResults.fields.map((f) => [f.name, f.dataTypeID]),
                    command: out.fullResults.command, rowCount: out.fullResults.rowCount };
out.seeded = await sqlA`SELECT event_type FROM events WHERE event_type = ${'a-1'}`;
out.batch = await sqlA.transaction([
  sqlA`INSERT INTO events (event_type, data) VALUES (${marker}, ${{ n: 1 }}) RETURNING event_type, data`,
  sqlA`INSERT INTO events (event_type, data) VALUES (${marker}, ${{ n: 2 }}) RETURNING event_type, data`,
  sqlA`SELECT count(*)::int AS n, sum((data->>'n')::int)::int AS total FROM events WHERE event_type = ${marker}`,
], { isolationLevel: 'Serializable' });
try {
  await sqlA.transaction([
    sqlA`INSERT INTO events (event_type, data) VALUES (${marker + '-rolled-back'}, '{}')`,
    sqlA`SELECT 1 / 0`,
  ]);
  out.rollback = 'no error';
} catch (err) {
  out.rollback = failure(err);
}
out.afterRollback = await sqlA`SELECT count(*)::int AS n FROM events WHERE event_type = ${marker + '-rolled-back'}`;
try {
  await sqlA`SELECT * FROM no_such_table`;
  out.error = 'no error';
} catch (err) {
  out.error = failure(err);
}
// A unique violation's DETAIL names the conflicting key: it must never reach the caller.
const id = '00000000-0000-4000-8000-000000000001';
try {
  await sqlA.transaction([
    sqlA`INSERT INTO events (id, created_at, event_type, data) VALUES (${id}, '2024-01-01', ${marker}, '{}')`,
    sqlA`INSERT INTO events (id, created_at, event_type, data) VALUES (${id}, '2024-01-01', ${marker}, '{}')`,
  ]);
  out.conflict = 'no error';
} catch (err) {
  out.conflict = failure(err);
}
try {
  await sqlA`SET app.tenant_id = 'bbbbbbbb-0000-4000-8000-00000000000b'`;
  out.rejected = 'no error';
} catch (err) {
  out.rejected = failure(err);
}
out.tenantA = await sqlA`SELECT DISTINCT tenant_id::text AS tenant FROM events`;
out.tenantB = await sqlB`SELECT DISTINCT tenant_id::text AS tenant FROM events`;
out.markerSeenByB = await sqlB`SELECT count(*)::int AS n FROM events WHERE event_type = ${marker}`;
const bad = neon(URL, { authToken: 'not-a-key' });
try {
  await bad`SELECT 1`;
  out.unauthenticated = 'no error';
} catch (err) {
  out.unauthenticated = failure(err);
}
console.log(JSON.stringify(out));
