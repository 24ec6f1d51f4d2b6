"""Deploy artefacts are valid: promtool accepts the Prometheus config and rules, and the
dashboard and alerts only use metrics the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from proxy.config import MetricsConfig
from proxy.observe.metrics import Metrics
from proxy.observe.pools import PoolStats
from proxy.observe.trace import RequestTrace

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _promtool(*args: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with the prometheus package that `make test` set-up installs"
    proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_accepts_config_and_rules() -> None:
    _promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    _promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))


def _exported_names() -> set[str]:
    m = Metrics(MetricsConfig(), "test", frozenset(),
                lambda: [PoolStats(name="primary", size=2, idle=1, max=20, waiting=0, timeouts=0)], lambda: {})
    m.observe(RequestTrace(endpoint="/v1/query", tenant="t", wait_s=0.001, db_s=0.001), 200, 0.002, "r")
    m.observe(RequestTrace(endpoint="/v1/query", error_code="unauthenticated"), 401, 0.001, "r")
    names = set(re.findall(r"^([a-z_]+)[{ ]", m.exposition(None)[0].decode(), re.M))
    return names | {"up", "pgbouncer_up", "pgbouncer_pools_client_waiting_connections"}


def test_dashboard_and_alerts_use_exported_metrics() -> None:
    exported = _exported_names()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [str(variable.get("query", "")) for variable in dashboard["templating"]["list"]]
    exprs += re.findall(r"expr: (.+(?:\n {12}.+)*)", (DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = {n for e in exprs for n in re.findall(r"\b((?:tenant_proxy|pgbouncer)_[a-z_]+|up)\b", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("heatmap", "top tenants", "pool", "errors"):
        assert needed in titles
