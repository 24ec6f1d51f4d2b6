#!/usr/bin/env bash
# Installs the system packages the dev/test stack needs when they are missing:
# PostgreSQL 15 server binaries with pg_partman, PgBouncer, Prometheus (for the
# metrics tests), openssl (a test certificate), Redis (the fleet's rate limits) and wrk (the benchmarks).  Uses apt when run as root; otherwise prints the command to run.
# Safe to run repeatedly: it does nothing when all is there.
set -euo pipefail

missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql-15 postgresql-contrib)
fi
# pg_partman: creates the monthly partitions of tenant tables ahead and retires old ones.
if ! ls /usr/share/postgresql/*/extension/pg_partman.control >/dev/null 2>&1; then
  missing+=(postgresql-15-partman)
fi
if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  missing+=(pgbouncer)
fi
if ! command -v psql >/dev/null 2>&1; then
  missing+=(postgresql-client)
fi
# A throwaway certificate for the test of TLS to PgBouncer.
if ! command -v openssl >/dev/null 2>&1; then
  missing+=(openssl)
fi
# Tests scrape the gateway with a real Prometheus and check rules with promtool.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  missing+=(prometheus)
fi
# The fleet's shared rate limits (limits.redis_url): the tests start their own server.
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  missing+=(redis-server)
fi
# The load generator of the benchmarks (make bench, benchmarks/ab_gateway.py).
if ! command -v wrk >/dev/null 2>&1; then
  missing+=(wrk)
fi
# Paced HTTP load for the latency runs of benchmarks/throughput.py.
if ! command -v hey >/dev/null 2>&1; then
  missing+=(hey)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${missing[*]}" >&2
  echo "install them with:  sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing system packages: ${missing[*]} (no apt-get here: install them with your package manager)" >&2
  exit 1
fi
echo "installing ${missing[*]} ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The Debian packages start their own services on install; policy-rc.d keeps them off.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
