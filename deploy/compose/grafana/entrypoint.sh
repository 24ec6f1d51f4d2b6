#!/bin/sh
# Grafana in the compose stack.  deploy/grafana/dashboard.json is exported for import: its
# datasource is the ${DS_PROMETHEUS} input, which file provisioning does not resolve
# ("Datasource ${DS_PROMETHEUS} was not found").  Point it at the provisioned datasource
# (uid prometheus) in a copy, then start Grafana as the image would.
set -eu
mkdir -p /var/lib/grafana/dashboards
# ${DS_PROMETHEUS} is literal text in the JSON, not a shell expansion.
# shellcheck disable=SC2016
sed 's/\${DS_PROMETHEUS}/prometheus/g' /etc/tenant-proxy/dashboard.json > /var/lib/grafana/dashboards/tenant-proxy.json
exec /run.sh "$@"
