"""The alert rules (deploy/prometheus/alerts.yml) fire when they should and only then:
promtool's own rule tests (deploy/prometheus/alerts_test.yml) feed each alert series and
check what fires.  promtool comes with the prometheus package `make test` installs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs the prometheus package (deploy/dev/install-system.sh)"
    return promtool


def test_the_rules_are_valid() -> None:
    done = subprocess.run([_promtool(), "check", "rules", "alerts.yml"], cwd=PROMETHEUS, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alert_fires_when_it_should_and_not_otherwise() -> None:
    """ErrorRatio ignores a tenant's own 5xx (concurrency cap, statement timeouts, a move's
    pause) and fires on the database's; HotTenant stays quiet with few tenants and an
    idle pool; a rejected config reload fires at once."""
    done = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert {"TenantProxyErrorRatio", "TenantProxyHotTenant", "TenantProxyConfigReloadFailed"} <= tested
