#!/usr/bin/env bash
# Compose only: set the passwords deploy/sql leaves unset, from the environment
# (docker-compose.yml passes development defaults; override them in a .env file).
#   app             the gateway's login role (PROXY_DB_PASSWORD on the gateway)
#   pgbouncer_auth  PgBouncer's auth_user (PGBOUNCER_AUTH_PASSWORD on PgBouncer)
# They are stored as SCRAM secrets (password_encryption defaults to scram-sha-256), which
# PgBouncer's auth_query hands to clients' SCRAM logins.  Runs after 010_migrate.sh.
set -Eeo pipefail
: "${APP_DB_PASSWORD:?must be set}"
: "${PGBOUNCER_AUTH_PASSWORD:?must be set}"

# psql variables (:'name') quote the values, so any character is safe in a password.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
  --set=app_password="${APP_DB_PASSWORD}" --set=auth_password="${PGBOUNCER_AUTH_PASSWORD}" <<'SQL'
ALTER ROLE app PASSWORD :'app_password';
ALTER ROLE pgbouncer_auth PASSWORD :'auth_password';
SQL
