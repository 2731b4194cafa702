"""The Helm chart, checked with real tools: Helm's own SDK (helm-python-sdk) lints and renders
it for the defaults and every scenario under ci/; every manifest is validated against the
Kubernetes schemas (kubernetes-validate); the rendered Envoy config goes through the real
`envoy --mode validate`, and the rendered daemon config through `gybc-authz check-config`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import CHART, CI_FILES, REPO, SCENARIOS, SHIPPED_ENVOY, load_values

RELEASE = "demo"
NAMESPACE = "gybc"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema known.
KUBE_VERSIONS = ["1.30.0", None]
# Kinds from CRDs, which have no schema in kubernetes-validate; checked field by field below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# The dashboard and alerts in deploy/, and the chart's copies of them.
OBSERVABILITY = REPO / "deploy" / "observability"
OBSERVABILITY_FILES = ["grafana-dashboard.json", "prometheus-rules.yaml"]
# The per-route example next to the sidecar config.
PER_ROUTE_ENVOY = SHIPPED_ENVOY.parent / "per-route.yaml"


# === helpers ===


def render(chart, values: dict | None) -> dict[str, list[dict]]:
    """Template path -> its manifests (parsed), as `helm install` would render them."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: dict[str, list[dict]] = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        parsed = [d for d in yaml.safe_load_all(text) if d]
        if parsed:
            docs[path] = parsed
    return docs


def manifests(docs: dict[str, list[dict]]) -> list[dict]:
    return [d for ds in docs.values() for d in ds]


def one(docs, kind: str, name_suffix: str = "") -> dict:
    found = [
        d for d in manifests(docs) if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs) -> set[str]:
    return {d["kind"] for d in manifests(docs)}


def deployment(docs) -> dict:
    return one(docs, "Deployment")


def container(docs, name: str) -> dict:
    cs = {c["name"]: c for c in deployment(docs)["spec"]["template"]["spec"]["containers"]}
    assert name in cs, f"no container {name}: {list(cs)}"
    return cs[name]


def envoy_yaml(docs) -> str:
    return one(docs, "ConfigMap", "-envoy")["data"]["envoy.yaml"]


def daemon_yaml(docs) -> str:
    return one(docs, "ConfigMap", "-config")["data"]["config.yaml"]


def checksum(docs) -> str:
    return deployment(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def merged(values: dict | None, **overrides) -> dict:
    v = copy.deepcopy(values) if values else {}
    for path, value in overrides.items():
        node = v
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return v


def run_envoy_validate(envoy: Path, config_text: str, tmp_path: Path) -> None:
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(config_text)
    proc = subprocess.run(
        [str(envoy), "--mode", "validate", "--disable-hot-restart", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# === lint and schema ===


def test_there_are_scenarios():
    names = {f.stem for f in CI_FILES}
    assert {
        "default-values",
        "with-app-container-values",
        "with-hpa-and-servicemonitor-values",
        "existing-secrets-values",
        "with-dashboard-and-alerts-values",
    } <= names, names


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_lint_is_clean(helm, values_file):
    report = helm.lint(CHART, load_values(values_file), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_values_match_the_schema(chart, values_file):
    chart.validate_schema(load_values(values_file))


def test_schema_is_strict(chart, helm):
    schema = chart.schema
    assert schema["additionalProperties"] is False
    for bad, where in [
        ({"replicas": 3}, "replicas"),
        ({"gybcAuthz": {"config": {"server": {"grpc_addr": "0.0.0.0:50051"}}}}, "server"),
        ({"gybcAuthz": {"config": {"jwt": {"provider": []}}}}, "provider"),
        ({"gybcAuthz": {"config": {"log": {"format": "xml"}}}}, "format"),
        ({"envoy": {"authzTimeout": "half a second"}}, "authzTimeout"),
        ({"envoy": {"upstream": {"port": 0}}}, "port"),
        ({"gybcAuthz": {"redis": {"urls": ["http://redis"]}}}, "urls"),
    ]:
        with pytest.raises(helm.HelmValuesError, match=where):
            chart.validate_schema(bad)
        with pytest.raises(helm.HelmValuesError):
            chart.render(bad, name=RELEASE)


def test_every_value_is_documented(chart):
    """Each key of values.yaml has a `# --` comment above it, or sits under a documented key."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=values.schema.json"
    key = re.compile(r"^(\s*)([A-Za-z][\w-]*):(.*)$")
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    undocumented = []
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m:
            continue
        indent, name, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        documented = any(c.startswith("# --") for c in block)
        inherited = any(d for _, _, d in stack)
        is_section = rest == "" or rest.startswith("#")
        if not (documented or inherited or is_section):
            undocumented.append(".".join([k for _, k, _ in stack] + [name]))
        stack.append((indent, name, documented))
    assert undocumented == [], f"values without a `# --` comment: {undocumented}"


# === rendering ===


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_renders_the_expected_resources(chart, values_file):
    values = load_values(values_file)
    docs = render(chart, values)
    v = chart.merge_values(values)
    expected = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"}
    if v["autoscaling"]["enabled"]:
        expected.add("HorizontalPodAutoscaler")
    if v["serviceMonitor"]["enabled"]:
        expected.add("ServiceMonitor")
    if v["prometheusRule"]["enabled"]:
        expected.add("PrometheusRule")
    assert kinds(docs) == expected
    dashboards = [d for d in manifests(docs) if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == (1 if v["grafanaDashboard"]["enabled"] else 0)
    for d in manifests(docs):
        # Only the dashboard may live elsewhere: where Grafana's sidecar looks for it.
        want = (v["grafanaDashboard"]["namespace"] or NAMESPACE) if d in dashboards else NAMESPACE
        assert d["metadata"].get("namespace") == want, d["metadata"]
        assert d["metadata"]["labels"]["helm.sh/chart"].startswith("gybc-authz-")
    # The Deployment's replica count belongs to the HPA when there is one.
    assert ("replicas" in deployment(docs)["spec"]) != v["autoscaling"]["enabled"]


@pytest.mark.parametrize("values_file", SCENARIOS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS, ids=["oldest", "newest"])
def test_every_manifest_is_valid_kubernetes(chart, kubernetes_validate, values_file, kube_version):
    version = kube_version or kubernetes_validate.utils.latest_version()
    docs = render(chart, load_values(values_file))
    for path, ds in docs.items():
        for d in ds:
            if (d["apiVersion"], d["kind"]) in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path}: {d['kind']} {d['metadata']['name']} (k8s {version}): "
                            f"{'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_labels_and_selectors_line_up(chart, values_file):
    docs = render(chart, load_values(values_file))
    selector = {"app.kubernetes.io/name": "gybc-authz", "app.kubernetes.io/instance": RELEASE}
    dep = deployment(docs)
    assert dep["spec"]["selector"]["matchLabels"] == selector
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert one(docs, "Service")["spec"]["selector"] == selector
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    test_pod = one(docs, "Pod")
    assert not selector.items() <= test_pod["metadata"]["labels"].items(), \
        "the helm test pod must not be selected by the Service or the PDB"
    sa = one(docs, "ServiceAccount")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["automountServiceAccountToken"] is False


# === security defaults and probes ===

HARDENED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def assert_hardened(sc: dict, what: str):
    for k, want in HARDENED.items():
        assert sc.get(k) is want, f"{what}: securityContext.{k} = {sc.get(k)!r}"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: {sc}"
    assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{what}: {sc}"
    assert not sc.get("privileged", False), what


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_security_defaults(chart, values_file):
    docs = render(chart, load_values(values_file))
    for pod, where in [
        (deployment(docs)["spec"]["template"]["spec"], "deployment"),
        (one(docs, "Pod")["spec"], "helm test pod"),
    ]:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        for c in pod["containers"]:
            assert_hardened(c["securityContext"], f"{where}/{c['name']}")
            assert c["resources"].get("requests") or c["name"] not in ("gybc-authz", "envoy"), c
            assert c["resources"].get("limits", {}).get("memory") or c["name"] not in ("gybc-authz", "envoy"), c


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_probes_and_ports(chart, values_file):
    docs = render(chart, load_values(values_file))
    cfg = yaml.safe_load(daemon_yaml(docs))
    authz = container(docs, "gybc-authz")
    ports = {p["name"]: p["containerPort"] for p in authz["ports"]}
    # The kubelet probes the pod IP: the daemon's HTTP port must listen on every address, on
    # the port the probes name. gRPC stays on loopback, reachable by Envoy only.
    assert cfg["server"]["http_addr"] == f"0.0.0.0:{ports['authz-http']}"
    assert cfg["server"]["grpc_addr"].startswith("127.0.0.1:")
    assert authz["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "authz-http"}
    assert authz["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "authz-http"}
    assert authz["args"] == ["serve", "--config", "/etc/gybc-authz/config.yaml"]
    envoy = container(docs, "envoy")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-stats"}
    assert envoy["livenessProbe"]["httpGet"]["port"] == "envoy-stats"
    assert "--disable-hot-restart" in envoy["args"]
    # The daemon outlives Envoy at shutdown, and both fit in the grace period.
    pod = deployment(docs)["spec"]["template"]["spec"]
    authz_sleep = authz["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert authz_sleep >= envoy["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > authz_sleep + cfg["server"]["shutdown_grace_secs"]
    # Service ports lead to named container ports.
    named = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    for p in one(docs, "Service")["spec"]["ports"]:
        assert p["targetPort"] in named, p
    # Envoy's config points at the daemon's gRPC port and serves the ports the pod declares.
    env_cfg = yaml.safe_load(envoy_yaml(docs))
    clusters = {c["name"]: c for c in env_cfg["static_resources"]["clusters"]}
    ep = clusters["gybc_authz"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert f"127.0.0.1:{ep['address']['socket_address']['port_value']}" == cfg["server"]["grpc_addr"]
    listeners = {
        l["name"]: l["address"]["socket_address"]["port_value"]
        for l in env_cfg["static_resources"]["listeners"]
    }
    envoy_ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert listeners == {"ingress": envoy_ports["http"], "stats": envoy_ports["envoy-stats"]}
    assert env_cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_helm_test_pod_probes_readyz(chart):
    docs = render(chart, None)
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = " ".join(pod["spec"]["containers"][0]["command"])
    assert f"/readyz" in script and ":8181/readyz" in script
    assert f"{RELEASE}-gybc-authz" in script
    assert pod["spec"]["restartPolicy"] == "Never"


# === the configs inside ===


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_rendered_envoy_config_passes_envoy_validate(chart, envoy, tmp_path, values_file):
    docs = render(chart, load_values(values_file))
    run_envoy_validate(envoy, envoy_yaml(docs), tmp_path)


@pytest.mark.parametrize("config", [SHIPPED_ENVOY, PER_ROUTE_ENVOY], ids=lambda p: p.name)
def test_shipped_envoy_config_passes_envoy_validate(envoy, tmp_path, config):
    run_envoy_validate(envoy, config.read_text(), tmp_path)


def test_chart_renders_the_shipped_envoy_config(chart):
    """With the shipped file's settings (app in the pod on :3000), the chart's Envoy config is
    deploy/envoy/envoy.yaml, field for field: the file the e2e tests run is the one users get."""
    values = {"app": {"enabled": True, "image": {"repository": "app"}, "port": 3000},
              "envoy": {"upstream": {"address": ""}}}
    rendered = yaml.safe_load(envoy_yaml(render(chart, values)))
    shipped = yaml.safe_load(SHIPPED_ENVOY.read_text())
    assert rendered == shipped


# Stand-ins for the Secret items the ci/ scenarios name, by (Secret, item).
SECRET_STAND_INS = {
    ("gybc-redis", "url"): "rediss://redis.gybc.svc.cluster.local:6380",
}


def pod_env(docs, secrets: dict | None = None) -> dict[str, str]:
    """The gybc-authz container's environment as the kubelet builds it: each Secret item from
    `secrets` (else SECRET_STAND_INS, else "stand-in"), and `$(VAR)` in a value expanded from
    the variables defined before it (`$$` escapes; an unknown reference stays as written)."""
    secrets = {**SECRET_STAND_INS, **(secrets or {})}
    env: dict[str, str] = {}
    for e in container(docs, "gybc-authz").get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(
                r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                e["value"],
            )
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets.get((ref["name"], ref["key"]), "stand-in")
    return env


def check_config(daemon: Path, docs, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`gybc-authz check-config` on the rendered config, with exactly `env` as the pod's variables."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(daemon_yaml(docs))
    full = {k: v for k, v in os.environ.items() if not k.startswith("GYBC_AUTHZ")}
    full.update(env)
    return subprocess.run([str(daemon), "check-config", str(cfg)], capture_output=True, text=True,
                          env=full, timeout=60)


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_rendered_daemon_config_passes_check_config(chart, daemon, tmp_path, values_file):
    docs = render(chart, load_values(values_file))
    # The variables the pod gets, from its Secrets with stand-in values.
    proc = check_config(daemon, docs, tmp_path, pod_env(docs))
    assert proc.returncode == 0, proc.stdout + proc.stderr + daemon_yaml(docs)
    assert proc.stdout.strip().endswith(": ok")


def test_custom_identity_header_names_are_stripped_on_health_routes(chart):
    values = load_values(CHART / "ci" / "with-app-container-values.yaml")
    env_cfg = yaml.safe_load(envoy_yaml(render(chart, values)))
    hcm = env_cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    health = [r for r in routes if "path" in r["match"]]
    assert [r["match"]["path"] for r in health] == ["/healthz", "/readyz", "/livez"]
    for r in health:
        stripped = r["request_headers_to_remove"]
        assert {"x-gybc-tenant", "x-gybc-user", "x-auth-method", "x-api-key", "x-on-behalf-of"} <= set(stripped)
        assert "x-tenant-id" not in stripped
        assert r["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    # Every other request is checked: the catch-all route has no per-route override.
    assert "typed_per_filter_config" not in routes[-1]


def test_app_container_is_the_upstream(chart):
    docs = render(chart, load_values(CHART / "ci" / "with-app-container-values.yaml"))
    app = container(docs, "threads-api")
    assert_hardened(app["securityContext"], "app")
    env_cfg = yaml.safe_load(envoy_yaml(docs))
    appc = {c["name"]: c for c in env_cfg["static_resources"]["clusters"]}["app"]
    sa = appc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (appc["type"], sa["address"], sa["port_value"]) == ("STATIC", "127.0.0.1", 3000)
    cfg = yaml.safe_load(daemon_yaml(docs))
    assert cfg["key_store"]["type"] == "file"


def test_fronting_a_service(chart):
    docs = render(chart, load_values(CHART / "ci" / "with-hpa-and-servicemonitor-values.yaml"))
    env_cfg = yaml.safe_load(envoy_yaml(docs))
    appc = {c["name"]: c for c in env_cfg["static_resources"]["clusters"]}["app"]
    sa = appc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (appc["type"], sa["address"], sa["port_value"]) == (
        "STRICT_DNS", "threads-api.gybc.svc.cluster.local", 80)
    assert [c["name"] for c in deployment(docs)["spec"]["template"]["spec"]["containers"]] == [
        "envoy", "gybc-authz"]


def test_existing_secrets_are_mounted_and_wired(chart):
    docs = render(chart, load_values(CHART / "ci" / "existing-secrets-values.yaml"))
    pod = deployment(docs)["spec"]["template"]["spec"]
    cfg = yaml.safe_load(daemon_yaml(docs))
    # The key file: a read-only directory mount of the Secret (updates reach the pod), and
    # the daemon's key_store points into it.
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["keys"]["secret"]["secretName"] == "gybc-api-keys"
    mount = {m["name"]: m for m in container(docs, "gybc-authz")["volumeMounts"]}["keys"]
    assert mount["readOnly"] is True and "subPath" not in mount
    assert cfg["key_store"] == {"type": "file", "path": f"{mount['mountPath']}/keys.yaml",
                                "reload_interval_ms": 500}
    # Redis: the URL and the password from the Secret as environment variables; the URL
    # reaches the daemon as a config override, so the file names no host.
    env = {e["name"]: e for e in container(docs, "gybc-authz")["env"]}
    assert env["GYBC_AUTHZ_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "gybc-redis", "key": "password"}
    assert env["GYBC_AUTHZ_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "gybc-redis", "key": "url"}
    assert env["GYBC_AUTHZ__REDIS__URLS"]["value"] == "[$(GYBC_AUTHZ_REDIS_URL)]"
    assert "urls" not in cfg["redis"]
    assert cfg["redis"]["password_env"] == "GYBC_AUTHZ_REDIS_PASSWORD"
    assert cfg["redis"]["username"] == "gybc-authz"
    assert cfg["redis"]["timeout_ms"] == 150
    assert "password" not in daemon_yaml(docs).replace("password_env", "")
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]


def test_redis_url_from_a_secret_reaches_the_daemon(chart, daemon, tmp_path):
    """The Secret's item becomes GYBC_AUTHZ__REDIS__URLS, the override the daemon reads: the
    rendered config alone names no Redis, so check-config passes only when the URL arrives."""
    docs = render(chart, load_values(CHART / "ci" / "existing-secrets-values.yaml"))
    names = [e["name"] for e in container(docs, "gybc-authz")["env"]]
    # The kubelet expands $(VAR) only from variables defined earlier in the list.
    assert names.index("GYBC_AUTHZ_REDIS_URL") < names.index("GYBC_AUTHZ__REDIS__URLS")

    def run(url: str | None):
        env = pod_env(docs, {("gybc-redis", "url"): url} if url is not None else None)
        if url is None:
            env = {k: v for k, v in env.items()
                   if k not in ("GYBC_AUTHZ_REDIS_URL", "GYBC_AUTHZ__REDIS__URLS")}
        return check_config(daemon, docs, tmp_path, env)

    # One URL, with the trailing newline `kubectl create secret --from-file` often leaves.
    for url in ["rediss://redis.gybc.svc.cluster.local:6380", "rediss://redis-0.internal:6380\n"]:
        proc = run(url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # The value is the one the daemon validates: a password in the URL is refused ...
    proc = run("rediss://:hunter2@redis.internal:6380")
    assert proc.returncode == 64 and "redis.urls[0]: must not contain a password" in proc.stderr, proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr
    # ... several URLs need cluster mode ...
    proc = run("redis://a:6379, redis://b:6379")
    assert proc.returncode == 64 and "several URLs need `cluster: true`" in proc.stderr, proc.stderr
    clustered = render(chart, merged(load_values(CHART / "ci" / "existing-secrets-values.yaml"),
                                     gybcAuthz__redis__cluster=True))
    proc = check_config(daemon, clustered, tmp_path,
                        pod_env(clustered, {("gybc-redis", "url"): "redis://a:6379, redis://b:6379"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and without the variables there is no Redis at all.
    proc = run(None)
    assert proc.returncode == 64 and "urls" in proc.stderr, proc.stderr


def test_redis_urls_from_values_with_the_password_from_a_secret(chart, daemon, tmp_path):
    values = merged(load_values(CHART / "ci" / "existing-secrets-values.yaml"),
                    gybcAuthz__redis__urlKey="", gybcAuthz__redis__urls=["rediss://redis.gybc.svc:6380"])
    docs = render(chart, values)
    cfg = yaml.safe_load(daemon_yaml(docs))
    assert cfg["redis"]["urls"] == ["rediss://redis.gybc.svc:6380"]
    assert {e["name"] for e in container(docs, "gybc-authz")["env"]} == {
        "GYBC_AUTHZ_REDIS_PASSWORD", "GYBC_AUTHZ__LOG__LEVEL"}
    proc = check_config(daemon, docs, tmp_path, pod_env(docs))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_key_file_from_a_configmap(chart):
    docs = render(chart, load_values(CHART / "ci" / "with-app-container-values.yaml"))
    vols = {v["name"]: v for v in deployment(docs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["keys"]["configMap"]["name"] == "gybc-api-keys"


def test_service_monitor(chart):
    docs = render(chart, load_values(CHART / "ci" / "with-hpa-and-servicemonitor-values.yaml"))
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"] == one(docs, "Service")["spec"]["selector"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service_ports = {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    endpoints = {(e["port"], e["path"]) for e in sm["spec"]["endpoints"]}
    assert endpoints == {("authz-http", "/metrics"), ("envoy-stats", "/stats/prometheus")}
    for e in sm["spec"]["endpoints"]:
        assert e["port"] in service_ports
        assert (e["interval"], e["scrapeTimeout"]) == ("15s", "5s")
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment(docs)["metadata"]["name"]
    assert one(docs, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": "25%", "selector": one(docs, "PodDisruptionBudget")["spec"]["selector"]}


# === observability: the dashboard and alerts of deploy/observability/ ===


@pytest.mark.parametrize("name", OBSERVABILITY_FILES)
def test_chart_copies_of_the_observability_files_are_identical(name):
    """The chart ships files/<name> (Helm reads files inside the chart only); it must be
    deploy/observability/<name>, byte for byte. After editing deploy/, copy it over."""
    shipped, copy_ = OBSERVABILITY / name, CHART / "files" / name
    assert copy_.read_bytes() == shipped.read_bytes(), f"cp {shipped} {copy_}"


def test_grafana_dashboard_configmap(chart, kubernetes_validate):
    values = load_values(CHART / "ci" / "with-dashboard-and-alerts-values.yaml")
    docs = render(chart, values)
    cm = one(docs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["name"] == f"{RELEASE}-gybc-authz-dashboard"
    assert cm["metadata"]["namespace"] == "monitoring"
    labels = cm["metadata"]["labels"]
    assert labels["grafana_dashboard"] == "1", "the label Grafana's sidecar selects by default"
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Platform"}
    # The dashboard exactly as shipped: the same text (Grafana's `{{label}}` legends untouched
    # by Helm's templating), and valid JSON.
    text = (OBSERVABILITY / "grafana-dashboard.json").read_text()
    assert cm["data"] == {"gybc-authz.json": text}
    assert json.loads(cm["data"]["gybc-authz.json"])["uid"] == "gybc-authz"
    for version in ["1.30.0", kubernetes_validate.utils.latest_version()]:
        kubernetes_validate.validate(cm, version, strict=True)
    # The label is the sidecar's choice: Helm merges the map with the default, and null drops it.
    cm = one(render(chart, merged(values, grafanaDashboard__labels={"dashboards": "gybc", "grafana_dashboard": None},
                                  grafanaDashboard__namespace="")), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["dashboards"] == "gybc" and "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == NAMESPACE
    # Off by default.
    assert [d for d in manifests(render(chart, None)) if d["metadata"]["name"].endswith("-dashboard")] == []


# The PrometheusRule CRD (monitoring.coreos.com/v1), the fields the chart may emit.
RULE_GROUP_FIELDS = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
# Prometheus durations as the CRD's pattern accepts them (e.g. 10m, 1h30m).
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def test_prometheus_rule(chart):
    values = load_values(CHART / "ci" / "with-dashboard-and-alerts-values.yaml")
    docs = render(chart, values)
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert rule["metadata"]["name"] == f"{RELEASE}-gybc-authz"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert all(isinstance(v, str) for v in rule["metadata"]["labels"].values())
    # The same groups as deploy/observability/prometheus-rules.yaml.
    shipped = yaml.safe_load((OBSERVABILITY / "prometheus-rules.yaml").read_text())
    assert shipped["apiVersion"] == rule["apiVersion"] and shipped["kind"] == rule["kind"]
    assert rule["spec"] == {"groups": shipped["spec"]["groups"]}
    # The CRD's structure, field by field (kubernetes-validate has no schema for it).
    groups = rule["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    alerts = []
    for g in groups:
        assert set(g) <= RULE_GROUP_FIELDS and isinstance(g["name"], str) and g["name"], g
        assert isinstance(g["rules"], list) and g["rules"], g
        for r in g["rules"]:
            assert set(r) <= RULE_FIELDS, r
            assert ("alert" in r) != ("record" in r), r
            assert isinstance(r["expr"], str) and "gybc_authz_" in r["expr"], r
            assert DURATION.match(r.get("for", "0")), r
            for field in ("labels", "annotations"):
                m = r.get(field, {})
                assert all(LABEL_NAME.match(k) and isinstance(v, str) for k, v in m.items()), r
            if "alert" in r:
                alerts.append(r["alert"])
                assert r["labels"]["severity"] in {"warning", "critical"}, r
                assert r["annotations"]["summary"], r
    assert len(alerts) == len(set(alerts)), alerts
    # Off by default.
    assert "PrometheusRule" not in kinds(render(chart, None))


# === checksum ===


def test_checksum_annotation_follows_both_configs(chart):
    base = checksum(render(chart, None))
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum(render(chart, None)) == base, "stable across renders"
    daemon_change = merged(None, gybcAuthz__config={"log": {"level": "debug"}})
    envoy_change = merged(None, envoy__authzTimeout="0.3s")
    keyfile_change = merged(None, gybcAuthz__keyFile={"existingSecret": "k"})
    for values in (daemon_change, envoy_change, keyfile_change):
        assert checksum(render(chart, values)) != base, values
    # Nothing else rolls the pods.
    assert checksum(render(chart, {"replicaCount": 5, "podAnnotations": {"a": "b"}})) == base
    assert checksum(render(chart, {"grafanaDashboard": {"enabled": True},
                                   "prometheusRule": {"enabled": True}})) == base


# === contradictions stop the render ===


@pytest.mark.parametrize(
    "values, message",
    [
        ({"app": {"enabled": True, "image": {"repository": "a"}}}, "envoy.upstream.address must be empty"),
        ({"envoy": {"upstream": {"address": ""}}}, "Envoy has no upstream"),
        ({"app": {"enabled": True}, "envoy": {"upstream": {"address": ""}}}, "app.image.repository"),
        ({"gybcAuthz": {"keyFile": {"existingSecret": "a", "existingConfigMap": "b"}}}, "not both"),
        ({"gybcAuthz": {"keyFile": {"existingSecret": "a"}, "config": {"key_store": {"type": "none"}}}},
         "key_store is set by the chart"),
        ({"gybcAuthz": {"config": {"key_store": {"type": "file", "path": "/k.yaml"}}}}, "keyFile"),
        ({"gybcAuthz": {"config": {"key_store": {"type": "redis"}}}}, "no Redis is named"),
        ({"gybcAuthz": {"config": {"rate_limit": {"backend": "redis"}}}}, "no Redis is named"),
        ({"gybcAuthz": {"redis": {"urls": ["redis://r:6379"], "existingSecret": "s"},
                        "config": {"redis": {"password_file": "/p"}}}}, "password is set twice"),
        ({"gybcAuthz": {"redis": {"urls": ["redis://r:6379"]}, "config": {"redis": {"urls": ["redis://x"]}}}},
         "set twice"),
        ({"gybcAuthz": {"redis": {"urlKey": "url"}}}, "existingSecret, which is empty"),
        ({"gybcAuthz": {"redis": {"urls": ["redis://r:6379"], "existingSecret": "s", "urlKey": "url"}}},
         "Redis URLs are set twice: gybcAuthz.redis.urlKey"),
        ({"gybcAuthz": {"redis": {"existingSecret": "s", "urlKey": "url"},
                        "config": {"redis": {"urls": ["redis://x:6379"]}}}},
         "Redis URLs are set twice: gybcAuthz.redis.urlKey"),
        ({"envoy": {"ports": {"http": 8181}}}, "one port"),
        ({"podDisruptionBudget": {"maxUnavailable": 1}}, "not both"),
        ({"podDisruptionBudget": {"minAvailable": None}}, "needs minAvailable or maxUnavailable"),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "greater than"),
        ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}, "needs targetCPU"),
        ({"gybcAuthz": {"preStopSleepSeconds": 1}}, "at least envoy.preStopSleepSeconds"),
        ({"terminationGracePeriodSeconds": 20}, "must exceed"),
    ],
)
def test_contradictory_values_fail_with_a_message(chart, helm, values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE)
