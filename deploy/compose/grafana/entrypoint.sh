#!/bin/sh
# Grafana in the compose stack: the dashboard (deploy/grafana/dashboard.json) picks its
# Prometheus through its own `datasource` variable (the default Prometheus datasource,
# provisioned here), so it is copied where the dashboard provider reads it, as it is;
# then Grafana starts as the image would.
set -eu
mkdir -p /var/lib/grafana/dashboards
cp /etc/tenant-proxy/dashboard.json /var/lib/grafana/dashboards/tenant-proxy.json
exec /run.sh "$@"
