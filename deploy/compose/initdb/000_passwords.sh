#!/usr/bin/env bash
# Compose only, first of the init scripts (an empty volume): the two login roles with
# their passwords from the environment (docker-compose.yml passes development defaults;
# override them in a .env file), before anything else, so that a later step that fails
# never leaves a database whose roles have no password.
#   app             the gateway's login role (PROXY_DB_PASSWORD on the gateway)
#   pgbouncer_auth  PgBouncer's auth_user (PGBOUNCER_AUTH_PASSWORD on PgBouncer)
# deploy/sql's 001 and 004 find them and set every other attribute.  They are stored as
# SCRAM secrets (password_encryption defaults to scram-sha-256), which PgBouncer's
# auth_query hands to clients' SCRAM logins.
set -Eeo pipefail
: "${APP_DB_PASSWORD:?must be set}"
: "${PGBOUNCER_AUTH_PASSWORD:?must be set}"

# psql variables (:'name') quote the values, so any character is safe in a password.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
  --set=app_password="${APP_DB_PASSWORD}" --set=auth_password="${PGBOUNCER_AUTH_PASSWORD}" <<'SQL'
SELECT 'CREATE ROLE app LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app') \gexec
SELECT 'CREATE ROLE pgbouncer_auth NOLOGIN'
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgbouncer_auth') \gexec
ALTER ROLE app PASSWORD :'app_password';
ALTER ROLE pgbouncer_auth PASSWORD :'auth_password';
SQL
