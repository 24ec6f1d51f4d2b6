#!/usr/bin/env bash
# Compose only: the postgres image runs (or sources) every file in
# /docker-entrypoint-initdb.d once, in name order, on an empty data volume, as
# $POSTGRES_USER (a superuser: deploy/sql creates roles and a SECURITY DEFINER function).
# deploy/sql is mounted whole at /tenant-proxy/sql and applied here in file-name order,
# the order the dev stack and the tests use, so a new migration needs no compose change.
# Then the demo data, so the quick start has rows to show.  Written to be sourced too
# (no exit, no set -u, the locale change kept in a subshell).  The `migrate` service runs
# `tenant-proxy migrate` on every start after this: it adopts what ran here, and applies
# what a later version adds (or what is left if this script stopped half-way).
set -Eeo pipefail

(
  export LC_ALL=C
  # The container's paths; tests/integration/test_compose_init.py runs this script outside
  # a container, with these pointed at the checkout.
  for file in "${TENANT_PROXY_SQL_DIR:-/tenant-proxy/sql}"/*.sql "${TENANT_PROXY_DEMO_SQL:-/tenant-proxy/demo.sql}"; do
    echo "tenant-proxy initdb: applying ${file}"
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" --file "${file}"
  done
)
