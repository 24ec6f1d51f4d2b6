"""Deploy files keep their contracts, checked statically (no Docker, no network): the
image runs non-root with a health check and the documented entrypoint; Kubernetes probes
hit the admin port; the compose stack has its services and every file it mounts; the
PgBouncer configs are the reference with only hosts, paths and pool budgets changed; and
the gateway configs shipped with them load."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import parse_config
from proxy.tools.devstack import PGBOUNCER_INI, render_pgbouncer_ini

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
K8S = REPO / "deploy" / "kubernetes"
CONFIG_PATH = "/etc/tenant-proxy/config.yaml"
ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# -- helpers -------------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def ini(text: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(delimiters=("=",), comment_prefixes=(";", "#"), interpolation=None,
                                       strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys' case
    parser.read_string(text)
    return {section: dict(parser[section]) for section in parser.sections()}


def k8s(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((K8S / name).read_text())
    assert isinstance(doc, dict)
    return doc


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def config_vars(node: Any) -> set[str]:
    """Every environment variable a parsed gateway config reads: ${VAR}s and auth.jwt.secret_env."""
    if isinstance(node, str):
        return {name for name, _ in ENV_VAR.findall(node)}
    if isinstance(node, list):
        return {v for item in node for v in config_vars(item)}
    if isinstance(node, dict):
        found = {v for value in node.values() for v in config_vars(value)}
        return found | ({node["secret_env"]} if "secret_env" in node else set())
    return set()


def load_gateway_config(text: str) -> tuple[Any, set[str]]:
    """The settings (every variable set to a JWT-long dummy, a hash's to 64 hex digits) and the
    variables it reads."""
    raw = yaml.safe_load(text)
    names = config_vars(raw)
    return parse_config(raw, {name: "ab" * 32 if name.endswith("_SHA256") else "x" * 40 for name in names}), names


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"one container named {name}"
    return found[0]


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == port))


def prestop_sleep(c: dict[str, Any]) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


# -- the image -----------------------------------------------------------------------------
def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    froms = [rest for word, rest in dockerfile() if word == "FROM"]
    assert len(froms) >= 2, "a builder stage and a runtime stage"
    image = froms[-1].split()[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    assert "AS" not in froms[-1].upper().split(), "the last stage is the image"
    assert all(re.search(r"\bpip (install|wheel)\b.*--no-cache-dir", rest)
               for word, rest in dockerfile() if word == "RUN" and re.search(r"\bpip (install|wheel)\b", rest))
    final_runs = " ".join(rest for word, rest in final_stage() if word == "RUN")
    assert not re.search(r"\b(gcc|build-essential|apt-get install)\b", final_runs), "no compilers in the image"


def test_dockerfile_runs_non_root_with_health_check_and_entrypoint() -> None:
    stage = final_stage()
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the final stage sets USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    healthcheck = " ".join(rest for word, rest in stage if word == "HEALTHCHECK")
    assert "http://127.0.0.1:9090/healthz" in healthcheck and "urllib" in healthcheck
    assert [rest for word, rest in stage if word == "ENTRYPOINT"] == ['["tenant-proxy"]']
    assert [rest for word, rest in stage if word == "CMD"] == [f'["serve", "--config", "{CONFIG_PATH}"]']
    exposed = {p for word, rest in stage if word == "EXPOSE" for p in rest.split()}
    assert exposed == {"8080", "9090"}
    assert any(word == "LABEL" for word, _ in stage)


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".dev", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"} <= ignored
    copied = {src for word, rest in dockerfile() if word == "COPY" and not rest.startswith("--from")
              for src in rest.split()[:-1]}
    assert not {c.rstrip("/") for c in copied} & ignored, "the Dockerfile copies nothing .dockerignore drops"


# -- PgBouncer -----------------------------------------------------------------------------
def test_reference_pgbouncer_ini_pools_transactions_and_uses_auth_query() -> None:
    ref = ini(PGBOUNCER_INI.read_text())
    bouncer = ref["pgbouncer"]
    assert bouncer["pool_mode"] == "transaction"
    assert bouncer["auth_type"] == "scram-sha-256"
    assert bouncer["auth_user"] == "pgbouncer_auth"
    assert "pgbouncer.get_auth($1)" in bouncer["auth_query"]
    assert "extra_float_digits" in bouncer["ignore_startup_parameters"]
    assert bouncer["stats_users"]
    assert "max_user_connections" in ref["users"]["pgbouncer_auth"], "auth_query's pool is bounded"
    assert not any(k.startswith("client_tls") or k.startswith("server_tls") for k in bouncer), "TLS stays commented"
    sql = (REPO / "deploy" / "sql" / "004_pgbouncer_auth.sql").read_text()
    for needed in ("CREATE OR REPLACE FUNCTION pgbouncer.get_auth(p_usename text)", "SECURITY DEFINER",
                   "SET search_path = pg_catalog", "NOT s.usesuper", "pg_catalog.pg_shadow",
                   "REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC",
                   "GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer_auth"):
        assert needed in sql, needed


# What the container and sidecar renderings may change; everything else must equal the reference.
PLACEMENT = {"listen_addr", "listen_port", "unix_socket_dir", "auth_file", "logfile", "pidfile"}
POOL_BUDGET = {"default_pool_size", "reserve_pool_size", "max_db_connections"}


def assert_same_settings(rendered: dict[str, dict[str, str]], allowed: set[str]) -> None:
    ref = ini(PGBOUNCER_INI.read_text())
    assert rendered.keys() == ref.keys()
    assert rendered["databases"].keys() == ref["databases"].keys()
    assert rendered["users"] == ref["users"]
    assert rendered["pgbouncer"].keys() == ref["pgbouncer"].keys()
    drift = {k for k in ref["pgbouncer"] if rendered["pgbouncer"][k] != ref["pgbouncer"][k]} - allowed
    assert not drift, f"settings differ from the top-level pgbouncer.ini: {sorted(drift)}"


def test_compose_render_script_matches_the_dev_stack_renderer() -> None:
    overrides = ini((COMPOSE_DIR / "pgbouncer" / "overrides.ini").read_text())
    assert set(overrides["pgbouncer"]) <= PLACEMENT
    proc = subprocess.run(["sh", str(COMPOSE_DIR / "pgbouncer" / "render.sh"), str(PGBOUNCER_INI),
                           str(COMPOSE_DIR / "pgbouncer" / "overrides.ini")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    expected = render_pgbouncer_ini(PGBOUNCER_INI.read_text(), overrides["pgbouncer"], overrides["databases"])
    assert proc.stdout == expected
    rendered = ini(proc.stdout)
    assert_same_settings(rendered, PLACEMENT)
    assert rendered["databases"]["appdb"].startswith("host=postgres ")
    assert rendered["pgbouncer"]["auth_file"].startswith("/tmp/"), "written at start, not baked in"


def test_compose_render_script_refuses_unknown_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text("[pgbouncer]\nno_such_setting = 1\n")
    proc = subprocess.run(["sh", str(COMPOSE_DIR / "pgbouncer" / "render.sh"), str(PGBOUNCER_INI), str(bad)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0 and "no_such_setting" in proc.stderr


def test_kubernetes_pgbouncer_ini_is_the_reference_with_sidecar_values() -> None:
    data = k8s("configmap.yaml")["data"]
    rendered = ini(data["pgbouncer.ini"])
    assert_same_settings(rendered, PLACEMENT | POOL_BUDGET)
    # The kubelet's tcpSocket probes go to the pod's IP: PgBouncer must listen there too.
    assert rendered["pgbouncer"]["listen_addr"] in ("*", "0.0.0.0"), "the probes reach what they probe"
    assert rendered["pgbouncer"]["logfile"] == "" and rendered["pgbouncer"]["pidfile"] == ""
    # The per-pod budget times the most pods is what PostgreSQL must allow.
    hpa = k8s("hpa.yaml")
    assert int(rendered["pgbouncer"]["max_db_connections"]) * hpa["spec"]["maxReplicas"] <= 150


# -- Kubernetes ----------------------------------------------------------------------------
def test_kubernetes_probes_hit_the_admin_port() -> None:
    dep = k8s("deployment.yaml")
    gateway = container(dep, "gateway")
    settings, _ = load_gateway_config(k8s("configmap.yaml")["data"]["config.yaml"])
    admin = settings.server.admin_port
    ready, live = gateway["readinessProbe"]["httpGet"], gateway["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and port_number(gateway, ready["port"]) == admin == 9090
    assert live["path"] == "/healthz" and port_number(gateway, live["port"]) == admin
    assert gateway["args"] == ["serve", "--config", CONFIG_PATH]
    mounts = {m["mountPath"] for m in gateway["volumeMounts"]}
    assert str(Path(CONFIG_PATH).parent) in mounts
    assert {"cpu", "memory"} <= gateway["resources"]["requests"].keys()
    assert {"memory"} <= gateway["resources"]["limits"].keys()


def test_kubernetes_pod_is_non_root_read_only_and_drains_before_stopping() -> None:
    dep = k8s("deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc.get("runAsUser", 0) != 0, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
    server = load_gateway_config(k8s("configmap.yaml")["data"]["config.yaml"])[0].server
    gateway_done = prestop_sleep(container(dep, "gateway")) + server.drain_s + server.shutdown_timeout_s
    assert prestop_sleep(container(dep, "gateway")) > 0
    assert prestop_sleep(container(dep, "pgbouncer")) > gateway_done, "PgBouncer outlives the gateway's drain"
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep(container(dep, "pgbouncer"))


def test_kubernetes_secrets_come_from_the_secret_and_cover_the_config() -> None:
    dep = k8s("deployment.yaml")
    secret = k8s("secret.example.yaml")
    gateway = container(dep, "gateway")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in gateway["env"]}
    _, needed = load_gateway_config(k8s("configmap.yaml")["data"]["config.yaml"])
    assert needed and needed <= env.keys(), needed - env.keys()
    for ref in env.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert all("REPLACE_ME" in v for v in secret["stringData"].values()), "the template holds placeholders only"
    auth_volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "pgbouncer-auth")
    assert auth_volume["secret"]["secretName"] == secret["metadata"]["name"]
    users = [line.split('"')[1] for line in secret["stringData"]["userlist.txt"].splitlines()]
    pgb = ini(k8s("configmap.yaml")["data"]["pgbouncer.ini"])["pgbouncer"]
    assert users == [pgb["auth_user"], pgb["stats_users"]], "auth_file: PgBouncer's own users only"


def test_kubernetes_service_monitor_hpa_pdb_and_kustomization_fit_together() -> None:
    dep = k8s("deployment.yaml")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = k8s("service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert port_number(container(dep, "gateway"), ports["metrics"]["targetPort"]) == 9090
    assert port_number(container(dep, "gateway"), ports["http"]["targetPort"]) == 8080
    monitor = k8s("servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("metrics", "/metrics")]
    hpa = k8s("hpa.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    pdb = k8s("pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"].get("maxUnavailable", 0) < hpa["spec"]["minReplicas"]
    listed = set(k8s("kustomization.yaml")["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml", "migrate-job.yaml"}
    assert listed == manifests
    assert "secret.example.yaml" not in listed, "placeholders must never overwrite the real Secret"


# -- compose -------------------------------------------------------------------------------
def bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


def test_compose_has_the_services_with_health_checks_and_ordering() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "pgbouncer", "gateway", "prometheus", "grafana"}
    for name, service in services.items():
        if service.get("restart") == "no":  # a one-shot (migrate): done is what counts
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has a healthcheck"
    assert services["pgbouncer"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["pgbouncer"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["gateway"]["build"]["context"] == "../.."
    assert f"./gateway.yaml:{CONFIG_PATH}:ro" in services["gateway"]["volumes"]
    assert services["postgres"]["build"]["context"] == "postgres"
    dockerfile = (COMPOSE_DIR / "postgres" / "Dockerfile").read_text()
    assert "FROM postgres:15" in dockerfile and "postgresql-15-partman" in dockerfile


def test_every_file_compose_mounts_exists() -> None:
    sources = [s for service in compose()["services"].values() for s in bind_sources(service)]
    assert len(sources) >= 10
    missing = [s for s in sources if not (COMPOSE_DIR / s).resolve().exists()]
    assert not missing, missing
    for service in compose()["services"].values():
        entrypoint = service.get("entrypoint")
        if entrypoint:
            script = entrypoint[-1]
            assert any(script.startswith(target) for target in
                       (v.split(":")[1] for v in service["volumes"] if isinstance(v, str))), script


def test_compose_sets_passwords_first_and_migrates_on_every_start() -> None:
    """The first start (an empty volume) creates the login roles with their passwords
    before anything can fail, then applies every migration and the demo data; every start
    runs `tenant-proxy migrate` (adopting what the first start applied) before the gateway."""
    services = compose()["services"]
    postgres = services["postgres"]
    assert "../sql:/tenant-proxy/sql:ro" in postgres["volumes"], "deploy/sql is mounted whole"
    assert "./initdb:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    scripts = sorted(p.name for p in (COMPOSE_DIR / "initdb").iterdir())
    assert scripts == ["000_passwords.sh", "010_migrate.sh"], "passwords first, then the migrations"
    passwords = (COMPOSE_DIR / "initdb" / "000_passwords.sh").read_text()
    for role in ("app", "pgbouncer_auth"):
        assert f"CREATE ROLE {role}" in passwords and f"ALTER ROLE {role} PASSWORD" in passwords
    needed = set(re.findall(r"\$\{([A-Z_]+):\?", passwords))
    assert needed <= postgres["environment"].keys()
    migrate = services["migrate"]
    assert migrate["command"][:2] == ["migrate", "--dsn"] and "@postgres:5432/appdb" in migrate["command"][2]
    assert migrate["image"] == services["gateway"]["image"] and migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_passwords_have_one_default_each() -> None:
    defaults: dict[str, set[str]] = {}
    for name, default in ENV_VAR.findall((COMPOSE_DIR / "docker-compose.yml").read_text()):
        defaults.setdefault(name, set()).add(default)
    assert defaults and all(len(d) == 1 and "" not in d for d in defaults.values()), defaults


def test_compose_gateway_config_loads_and_reaches_pgbouncer_and_prometheus() -> None:
    services = compose()["services"]
    settings, needed = load_gateway_config((COMPOSE_DIR / "gateway.yaml").read_text())
    assert needed and needed <= services["gateway"]["environment"].keys()
    assert settings.server.host == settings.server.admin_host == "0.0.0.0"
    bouncer = ini(PGBOUNCER_INI.read_text())["pgbouncer"]
    assert f"@pgbouncer:{bouncer['listen_port']}/appdb" in settings.database.dsn
    stats_user = bouncer["stats_users"]
    assert (settings.database.pgbouncer_admin_dsn or "").startswith(f"postgresql://{stats_user}:")
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"gateway:{settings.server.admin_port}" in targets
    published = [p for p in services["gateway"]["ports"] if str(settings.server.admin_port) in p]
    assert published and all(p.startswith("127.0.0.1:") for p in published), "admin port stays on the host"


def test_compose_grafana_provisions_the_dashboard_and_datasource() -> None:
    grafana = compose()["services"]["grafana"]
    datasources = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert uid and datasources["datasources"][0]["isDefault"] is True  # what the dashboard's variable picks
    script = (COMPOSE_DIR / "grafana" / "entrypoint.sh").read_text()
    providers = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/tenant-proxy.yml").read_text())
    assert providers["providers"][0]["options"]["path"] in script
    assert "../grafana/dashboard.json:/etc/tenant-proxy/dashboard.json:ro" in grafana["volumes"]


@pytest.mark.parametrize("script", sorted(str(p.relative_to(COMPOSE_DIR)) for p in COMPOSE_DIR.rglob("*.sh")))
def test_compose_shell_scripts_parse(script: str) -> None:
    path = COMPOSE_DIR / script
    shell = "bash" if path.read_text().startswith("#!/usr/bin/env bash") else "sh"
    proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, shlex.join([shell, "-n", script]) + ": " + proc.stderr


def _revoked_lists() -> list[set[str]]:
    """The function names of each `p.proname = ANY (ARRAY[...])` list in 003_hardening.sql."""
    sql = (REPO / "deploy" / "sql" / "003_hardening.sql").read_text()
    return [set(re.findall(r"'(\w+)'", block)) for block in re.findall(r"ANY \(ARRAY\[(.*?)\]\)", sql, re.S)]


def test_revoked_functions_agree_with_the_guard_and_the_audit() -> None:
    """The role's wall (003), the guard and the audit name the same functions."""
    from proxy.policy.guard import ACTIVITY_FUNCTIONS, DENIED_FUNCTIONS
    from proxy.tools.audit import DANGEROUS_FUNCTIONS

    dangerous, activity = _revoked_lists()
    assert dangerous == set(DANGEROUS_FUNCTIONS)
    assert activity == set(ACTIVITY_FUNCTIONS)
    assert dangerous <= DENIED_FUNCTIONS and activity <= DENIED_FUNCTIONS


def test_the_dashboard_resolves_its_datasource_however_grafana_loads_it() -> None:
    """File provisioning (compose), the Kubernetes Grafana sidecar and a UI import all load
    the JSON as it is: no ${DS_PROMETHEUS} import input, which only the UI fills in; every
    query names the dashboard's own datasource variable."""
    text = (REPO / "deploy" / "grafana" / "dashboard.json").read_text()
    dashboard = json.loads(text)
    assert "__inputs" not in dashboard and "DS_PROMETHEUS" not in text
    variable = dashboard["templating"]["list"][0]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    uids = set(re.findall(r'"uid": "([^"]*)"', text)) - {dashboard["uid"]}
    assert uids == {"${datasource}"}, uids


def test_kubernetes_probes_reach_what_they_probe() -> None:
    """The kubelet sends tcpSocket and httpGet probes to the pod's IP: every probed port
    must be one its container listens on there, not on 127.0.0.1 only."""
    dep = k8s("deployment.yaml")
    data = k8s("configmap.yaml")["data"]
    server = load_gateway_config(data["config.yaml"])[0].server
    pgb = ini(data["pgbouncer.ini"])["pgbouncer"]
    listens = {"gateway": {server.port: server.host, server.admin_port: server.admin_host},
               "pgbouncer": {int(pgb["listen_port"]): pgb["listen_addr"]}}
    for c in dep["spec"]["template"]["spec"]["containers"]:
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(kind)
            if probe is None or "exec" in probe:
                continue
            target = probe.get("tcpSocket") or probe.get("httpGet")
            port = port_number(c, target["port"])
            assert listens[c["name"]].get(port) in ("*", "0.0.0.0"), (c["name"], kind, port)
    # and nobody else reaches PgBouncer: no Service port, no NetworkPolicy rule for it
    service_ports = {p["targetPort"] for p in k8s("service.yaml")["spec"]["ports"]}
    policy_ports = {p["port"] for rule in k8s("networkpolicy.yaml")["spec"]["ingress"] for p in rule["ports"]}
    assert not ({"pgbouncer", int(pgb["listen_port"])} & (service_ports | policy_ports))


def test_kubernetes_pool_sizes_fit_pgbouncers_limits() -> None:
    """The gateway's pool never holds more transactions than PgBouncer's pool runs at once:
    a surplus would queue in PgBouncer's first-come queue, behind the gateway's fair one."""
    data = k8s("configmap.yaml")["data"]
    database = load_gateway_config(data["config.yaml"])[0].database
    pgb = ini(data["pgbouncer.ini"])["pgbouncer"]
    assert database.pool_max_size <= int(pgb["default_pool_size"]) <= int(pgb["max_db_connections"])
    assert database.pool_min_size <= database.pool_max_size


def test_kubernetes_secrets_are_optional_unless_always_needed() -> None:
    """A config without JWT (or the catalog, or PgBouncer's figures) starts without those
    keys in the Secret; only the database password is always required."""
    gateway = container(k8s("deployment.yaml"), "gateway")
    refs = {e["valueFrom"]["secretKeyRef"]["key"]: e["valueFrom"]["secretKeyRef"] for e in gateway["env"]}
    required = {key for key, ref in refs.items() if not ref.get("optional")}
    assert required <= {"db-password", "admin-token-sha256"}, required
    assert {"jwt-secret", "control-password", "stats-password"} <= refs.keys() - required
    config = yaml.safe_load(k8s("configmap.yaml")["data"]["config.yaml"])
    del config["auth"]["jwt"]
    config["auth"]["api_keys"] = [{"name": "svc", "sha256": "0" * 64, "tenant": "aaaaaaaa-0000-4000-8000-00000000000a"}]
    env = {"PROXY_DB_PASSWORD": "x", "PROXY_STATS_PASSWORD": "x", "PROXY_CONTROL_PASSWORD": "x",
           "PROXY_ADMIN_TOKEN_SHA256": "0" * 64}
    assert parse_config(config, env).auth.jwt is None  # no PROXY_JWT_SECRET needed


def test_kubernetes_migrate_job_runs_the_gateways_image_as_a_superuser_dsn_from_the_secret() -> None:
    job = k8s("migrate-job.yaml")
    deployment = k8s("deployment.yaml")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert job["kind"] == "Job" and pod["restartPolicy"] == "Never"
    assert c["image"] == container(deployment, "gateway")["image"]
    assert c["args"] == ["migrate", "--dsn", "$(MIGRATE_DSN)"]
    ref = c["env"][0]["valueFrom"]["secretKeyRef"]
    secret = k8s("secret.example.yaml")
    assert (c["env"][0]["name"], ref["name"]) == ("MIGRATE_DSN", secret["metadata"]["name"])
    assert ref["key"] in secret["stringData"] and "@" in secret["stringData"][ref["key"]]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert "migrate-job.yaml" not in k8s("kustomization.yaml")["resources"], "a Job is run, not re-applied"
