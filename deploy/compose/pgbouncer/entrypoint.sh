#!/bin/sh
# PgBouncer in the compose stack: write auth_file from the environment, render the
# reference pgbouncer.ini with the compose overrides, and run PgBouncer in the foreground.
# auth_file holds only PgBouncer's own users (docs/deploy.md): auth_user, which runs
# auth_query, and the stats user that the gateway's metrics collector logs in as.
set -eu
: "${PGBOUNCER_AUTH_PASSWORD:?must be set}"
: "${PGBOUNCER_STATS_PASSWORD:?must be set}"
here=$(dirname "$0")
# The container's paths; tests/integration/test_compose_init.py runs this script outside a
# container with these pointed elsewhere.
run=${PGBOUNCER_RUN_DIR:-/tmp/pgbouncer}
reference=${PGBOUNCER_REFERENCE_INI:-/etc/pgbouncer/reference.ini}

# A double quote inside a field is written twice (PgBouncer's auth_file format).
quote() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }

umask 077
mkdir -p "$run"
{
  printf '%s %s\n' "$(quote pgbouncer_auth)" "$(quote "$PGBOUNCER_AUTH_PASSWORD")"
  printf '%s %s\n' "$(quote stats)" "$(quote "$PGBOUNCER_STATS_PASSWORD")"
} > "$run/userlist.txt"
sh "$here/render.sh" "$reference" "$here/overrides.ini" > "$run/pgbouncer.ini"

exec pgbouncer "$run/pgbouncer.ini"
