"""The Helm chart, checked with real tools: Helm's own SDK (helm-python-sdk) lints and renders
it for the defaults and every scenario under ci/; every manifest is validated against the
Kubernetes schemas (kubernetes-validate); the rendered Envoy config goes through the real
`envoy --mode validate` (in module mode with the built module loaded), and the rendered daemon
config through `gybc-authz check-config`.
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

from conftest import (
    CHART,
    CI_FILES,
    MODULE_FILE,
    REPO,
    SCENARIOS,
    SHIPPED_ENVOY,
    SHIPPED_MODULE_ENVOY,
    load_values,
)

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
# A key file in the format the key store reads, for the module to load while Envoy validates.
KEYS_EXAMPLE = REPO / "deploy" / "keys.example.yaml"
# The module filter's name in Envoy's HTTP filter chain and per-route configs.
MODULE_FILTER = "gybc_authz"
# Envoy's CORS filter, before gybc-authz in both modes (docs/browsers.md).
CORS_FILTER = "envoy.filters.http.cors"
# The values that make the chart's Envoy config the shipped files' (the app in the pod on :3000).
SHIPPED_VALUES = {"app": {"enabled": True, "image": {"repository": "app"}, "port": 3000},
                  "envoy": {"upstream": {"address": ""}}}
# The app in the pod, the least values that run it (the app tests start from these).
APP = {"app": {"enabled": True, "image": {"repository": "a"}}, "envoy": {"upstream": {"address": ""}}}
# The routes of deploy/envoy/per-route.yaml, as envoy.routes values.
PER_ROUTE_ROUTES = [
    {"match": {"prefix": "/api/v1/public/"}, "settings": {"gybc.public": "true"}},
    {"match": {"prefix": "/api/v1/support/"},
     "settings": {"gybc.required_scopes": "threads:read, users:impersonate"}},
    {"match": {"path": "/api/v1/orgs/join"}, "settings": {"gybc.tenantless": "true"}},
    {"match": {"prefix": "/api/v1/internal/"}, "settings": {"gybc.allowed_methods": "api_key"}},
]


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


def is_key_service(d: dict) -> bool:
    """Whether a manifest is the key service's (keyService.enabled): tests/chart/test_key_service.py."""
    return d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "key-service"


def one(docs, kind: str, name_suffix: str = "", key_service: bool = False) -> dict:
    """The one `kind` manifest named *name_suffix: the main workload's, or the key service's."""
    found = [
        d for d in manifests(docs) if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)
        and is_key_service(d) == key_service
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


def container_names(docs) -> list[str]:
    return [c["name"] for c in deployment(docs)["spec"]["template"]["spec"]["containers"]]


def is_module(docs) -> bool:
    """Module mode, as the pod shows it: no gybc-authz container."""
    return "gybc-authz" not in container_names(docs)


def engine_container(docs) -> dict:
    """The container the decision engine runs in: gybc-authz, or Envoy in module mode."""
    return container(docs, "envoy" if is_module(docs) else "gybc-authz")


def mounts(c: dict) -> dict[str, dict]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def ingress_hcm(env_cfg: dict) -> dict:
    listener = {l["name"]: l for l in env_cfg["static_resources"]["listeners"]}["ingress"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def ingress_routes(env_cfg: dict) -> list[dict]:
    return ingress_hcm(env_cfg)["route_config"]["virtual_hosts"][0]["routes"]


def module_filter(env_cfg: dict) -> dict:
    """The dynamic module filter's typed_config in the ingress listener's filter chain."""
    found = [f["typed_config"] for f in ingress_hcm(env_cfg)["http_filters"] if f["name"] == MODULE_FILTER]
    assert len(found) == 1, ingress_hcm(env_cfg)["http_filters"]
    return found[0]


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


def run_envoy_validate(envoy: Path, config_text: str, tmp_path: Path, env: dict | None = None) -> None:
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(config_text)
    proc = subprocess.run(
        [str(envoy), "--mode", "validate", "--disable-hot-restart", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def run_module_envoy_validate(envoy: Path, envoy_text: str, daemon_text: str, module_dir: Path,
                              tmp_path: Path, engine_env: dict[str, str] | None = None) -> None:
    """`envoy --mode validate` with the module loaded as in the pod. Validation loads the module,
    which reads the config file its filter names: the daemon config is written out (with a key
    file where its key store names one) and the filter pointed at it. The module gets the
    engine's variables (`engine_env`) and nothing of this process's GYBC_AUTHZ* ones."""
    cfg = yaml.safe_load(daemon_text) or {}
    key_store = cfg.get("key_store") or {}
    if key_store.get("type") == "file":
        keys = tmp_path / "keys" / Path(key_store["path"]).name
        keys.parent.mkdir(exist_ok=True)
        keys.write_text(KEYS_EXAMPLE.read_text())
        key_store["path"] = str(keys)
        daemon_text = yaml.safe_dump(cfg)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(daemon_text)
    env_cfg = yaml.safe_load(envoy_text)
    module_filter(env_cfg)["filter_config"]["value"] = str(config_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GYBC_AUTHZ")}
    env.update(engine_env or {})
    env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(module_dir)
    run_envoy_validate(envoy, yaml.safe_dump(env_cfg, sort_keys=False), tmp_path, env)


# === lint and schema ===


def test_there_are_scenarios():
    names = {f.stem for f in CI_FILES}
    assert {
        "default-values",
        "with-app-container-values",
        "with-hpa-and-servicemonitor-values",
        "existing-secrets-values",
        "with-dashboard-and-alerts-values",
        "module-values",
        "module-with-routes-values",
        "key-service-values",
        "module-key-service-values",
        "browser-values",
        "redis-sentinel-values",
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
        ({"mode": "inline"}, "mode"),
        ({"module": {"installResources": {"request": {}}}}, "request"),
        ({"networkPolicy": {"ingressFrom": []}}, "ingressFrom"),
        ({"networkPolicy": {"metricsFrom": [{"namespace": "monitoring"}]}}, "namespace"),
        ({"app": {"ports": [{"containerPort": 3000}]}}, "ports"),
        # Per-route settings: only the keys gybc-authz reads, with string values.
        ({"envoy": {"routes": [{"match": {"prefix": "/a"}, "settings": {"gybc.pubilc": "true"}}]}},
         "gybc.pubilc"),
        ({"envoy": {"routes": [{"match": {"prefix": "/a"}, "settings": {"gybc.public": True}}]}},
         "gybc.public"),
        ({"envoy": {"routes": [{"match": {"prefix": "/a"}, "settings": {"gybc.allowed_methods": "jwt,cookie"}}]}},
         "gybc.allowed_methods"),
        ({"envoy": {"routes": [{"match": {"regex": ".*"}, "settings": {"gybc.public": "true"}}]}}, "regex"),
        ({"envoy": {"routes": [{"match": {"prefix": "/a"}, "settings": {}}]}}, "settings"),
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
    if v["networkPolicy"]["enabled"]:
        expected.add("NetworkPolicy")
    if v["autoscaling"]["enabled"]:
        expected.add("HorizontalPodAutoscaler")
    if v["serviceMonitor"]["enabled"]:
        expected.add("ServiceMonitor")
    if v["prometheusRule"]["enabled"]:
        expected.add("PrometheusRule")
    assert kinds(docs) == expected
    # The key service's resources, when it is on (tests/chart/test_key_service.py), and nothing
    # of it otherwise.
    ks_expected = {"ConfigMap", "Deployment", "Service"}
    if v["networkPolicy"]["enabled"]:
        ks_expected.add("NetworkPolicy")
    if v["keyService"]["podDisruptionBudget"]["enabled"]:
        ks_expected.add("PodDisruptionBudget")
    assert {d["kind"] for d in manifests(docs) if is_key_service(d)} == (
        ks_expected if v["keyService"]["enabled"] else set())
    assert not any("key-service" in d["metadata"]["name"] for d in manifests(docs)
                   if not is_key_service(d))
    dashboards = [d for d in manifests(docs) if d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == (1 if v["grafanaDashboard"]["enabled"] else 0)
    for d in manifests(docs):
        # Only the dashboard may live elsewhere: where Grafana's sidecar looks for it.
        want = (v["grafanaDashboard"]["namespace"] or NAMESPACE) if d in dashboards else NAMESPACE
        assert d["metadata"].get("namespace") == want, d["metadata"]
        assert d["metadata"]["labels"]["helm.sh/chart"].startswith("gybc-authz-")
    # The Deployment's replica count belongs to the HPA when there is one.
    assert ("replicas" in deployment(docs)["spec"]) != v["autoscaling"]["enabled"]


@pytest.mark.parametrize("mode", ["as-given", "module"])
@pytest.mark.parametrize("values_file", SCENARIOS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS, ids=["oldest", "newest"])
def test_every_manifest_is_valid_kubernetes(chart, kubernetes_validate, values_file, kube_version, mode):
    """Every scenario as written, and switched to module mode."""
    version = kube_version or kubernetes_validate.utils.latest_version()
    values = load_values(values_file)
    docs = render(chart, merged(values, mode="module") if mode == "module" else values)
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
        for c in pod["containers"] + pod.get("initContainers", []):
            assert_hardened(c["securityContext"], f"{where}/{c['name']}")
            ours = c["name"] in ("gybc-authz", "envoy", "install-module")
            assert c["resources"].get("requests") or not ours, c
            assert c["resources"].get("limits", {}).get("memory") or not ours, c


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_probes_and_ports(chart, values_file):
    docs = render(chart, load_values(values_file))
    if is_module(docs):
        return assert_module_probes_and_ports(docs)
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


def assert_module_probes_and_ports(docs):
    """Module mode: Envoy is the only server of the pod's own (besides the app), probed on /ready."""
    pod = deployment(docs)["spec"]["template"]["spec"]
    envoy = container(docs, "envoy")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-stats"}
    assert envoy["livenessProbe"]["httpGet"] == {"path": "/ready", "port": "envoy-stats"}
    assert "--disable-hot-restart" in envoy["args"]
    assert pod["terminationGracePeriodSeconds"] > envoy["lifecycle"]["preStop"]["sleep"]["seconds"]
    # Service ports lead to named container ports: Envoy's two, no daemon port.
    named = {p["name"] for c in pod["containers"] for p in c.get("ports", [])}
    assert named == {"http", "envoy-stats"}
    assert {p["targetPort"] for p in one(docs, "Service")["spec"]["ports"]} == named
    env_cfg = yaml.safe_load(envoy_yaml(docs))
    listeners = {l["name"]: l["address"]["socket_address"]["port_value"]
                 for l in env_cfg["static_resources"]["listeners"]}
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
    # Module mode has no /readyz: the pod asks Envoy's /ready on the stats port instead.
    script = " ".join(one(render(chart, {"mode": "module"}), "Pod")["spec"]["containers"][0]["command"])
    assert ":9902/ready" in script and "readyz" not in script and ":8181" not in script


# === the configs inside ===


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_rendered_envoy_config_passes_envoy_validate(chart, envoy, tmp_path, values_file, request):
    """Module-mode scenarios need the built module: Envoy loads it to validate the filter."""
    docs = render(chart, load_values(values_file))
    if not is_module(docs):
        return run_envoy_validate(envoy, envoy_yaml(docs), tmp_path)
    module_dir = request.getfixturevalue("envoy_module_dir")
    # The path the filter names is the file mounted into Envoy (the one validated below).
    assert module_filter(yaml.safe_load(envoy_yaml(docs)))["filter_config"]["value"] == \
        mounts(container(docs, "envoy"))["config"]["mountPath"]
    run_module_envoy_validate(envoy, envoy_yaml(docs), daemon_yaml(docs), module_dir, tmp_path,
                              pod_env(docs))


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_every_scenario_switched_to_module_mode_passes_envoy_validate(
        chart, envoy, envoy_module_dir, tmp_path, values_file):
    docs = render(chart, merged(load_values(values_file), mode="module"))
    run_module_envoy_validate(envoy, envoy_yaml(docs), daemon_yaml(docs), envoy_module_dir, tmp_path,
                              pod_env(docs))


@pytest.mark.parametrize("config", [SHIPPED_ENVOY, PER_ROUTE_ENVOY], ids=lambda p: p.name)
def test_shipped_envoy_config_passes_envoy_validate(envoy, tmp_path, config):
    run_envoy_validate(envoy, config.read_text(), tmp_path)


def test_shipped_module_envoy_config_passes_envoy_validate(chart, envoy, envoy_module_dir, tmp_path):
    """deploy/envoy/envoy-module.yaml with the built module, reading the chart's default config
    file (validation loads the module, which reads the file the filter names)."""
    shipped = SHIPPED_MODULE_ENVOY.read_text()
    assert module_filter(yaml.safe_load(shipped))["filter_config"]["value"] == "/etc/gybc-authz/config.yaml"
    run_module_envoy_validate(envoy, shipped, daemon_yaml(render(chart, None)), envoy_module_dir, tmp_path)


def test_chart_renders_the_shipped_envoy_config(chart):
    """With the shipped file's settings (app in the pod on :3000), the chart's Envoy config is
    deploy/envoy/envoy.yaml, field for field: the file the e2e tests run is the one users get."""
    rendered = yaml.safe_load(envoy_yaml(render(chart, SHIPPED_VALUES)))
    shipped = yaml.safe_load(SHIPPED_ENVOY.read_text())
    assert rendered == shipped


def test_chart_renders_the_shipped_per_route_config(chart):
    """envoy.routes in sidecar mode: the routes of deploy/envoy/per-route.yaml give that file,
    field for field (ext_authz context_extensions), which the end-to-end tests run route by route."""
    values = merged(SHIPPED_VALUES, envoy__routes=PER_ROUTE_ROUTES)
    rendered = yaml.safe_load(envoy_yaml(render(chart, values)))
    assert rendered == yaml.safe_load(PER_ROUTE_ENVOY.read_text())


def test_chart_renders_the_shipped_module_config(chart):
    """Module mode with the shipped file's settings is deploy/envoy/envoy-module.yaml, field for
    field, including the config path: the file the daemon reads in sidecar mode."""
    docs = render(chart, merged(SHIPPED_VALUES, mode="module"))
    rendered = yaml.safe_load(envoy_yaml(docs))
    assert rendered == yaml.safe_load(SHIPPED_MODULE_ENVOY.read_text())
    sidecar = render(chart, SHIPPED_VALUES)
    assert module_filter(rendered)["filter_config"]["value"] == \
        container(sidecar, "gybc-authz")["args"][-1] == \
        mounts(container(sidecar, "gybc-authz"))["config"]["mountPath"]


# Stand-ins for the Secret items the ci/ scenarios name, by (Secret, item).
SECRET_STAND_INS = {
    ("gybc-redis", "url"): "rediss://redis.gybc.svc.cluster.local:6380",
}


def pod_env(docs, secrets: dict | None = None, of: dict | None = None) -> dict[str, str]:
    """The engine's environment as the kubelet builds it (the gybc-authz container's, or in
    module mode Envoy's; or container `of`'s): each Secret item from `secrets` (else
    SECRET_STAND_INS, else "stand-in"), and `$(VAR)` in a value expanded from the variables
    defined before it (`$$` escapes; an unknown reference stays as written)."""
    secrets = {**SECRET_STAND_INS, **(secrets or {})}
    env: dict[str, str] = {}
    for e in (of or engine_container(docs)).get("env", []):
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
    # Module mode strips the same headers, and switches the module filter off instead.
    routes = ingress_routes(yaml.safe_load(envoy_yaml(render(chart, merged(values, mode="module")))))
    health = [r for r in routes if "path" in r["match"]]
    assert [r["match"]["path"] for r in health] == ["/healthz", "/readyz", "/livez"]
    for r in health:
        assert {"x-gybc-tenant", "x-gybc-user", "x-api-key", "x-on-behalf-of"} <= set(r["request_headers_to_remove"])
        assert r["typed_per_filter_config"] == {MODULE_FILTER: {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
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


def test_redis_by_sentinel(chart, daemon, tmp_path):
    """gybcAuthz.redis.sentinel renders `redis.sentinel` (no URLs), both passwords come from the
    Secret as variables the config names, and the daemon, and the key service, accept it."""
    values = load_values(CHART / "ci" / "redis-sentinel-values.yaml")
    for docs in [render(chart, values), render(chart, merged(values, mode="module"))]:
        cfg = yaml.safe_load(daemon_yaml(docs))
        redis = cfg["redis"]
        assert "urls" not in redis and "cluster" not in redis
        assert redis["password_env"] == "GYBC_AUTHZ_REDIS_PASSWORD"
        assert redis["sentinel"] == {
            "master_name": "mymaster",
            "urls": values["gybcAuthz"]["redis"]["sentinel"]["urls"],
            "password_env": "GYBC_AUTHZ_REDIS_SENTINEL_PASSWORD",
        }
        env = {e["name"]: e for e in engine_container(docs)["env"]}
        for var in ["GYBC_AUTHZ_REDIS_PASSWORD", "GYBC_AUTHZ_REDIS_SENTINEL_PASSWORD"]:
            assert env[var]["valueFrom"]["secretKeyRef"] == {
                "name": "gybc-redis", "key": "redis-password"}, var
        proc = check_config(daemon, docs, tmp_path, pod_env(docs))
        assert proc.returncode == 0, proc.stdout + proc.stderr + daemon_yaml(docs)
    # Without the sentinels' password variable the daemon says which one is missing.
    docs = render(chart, values)
    env = {k: v for k, v in pod_env(docs).items() if k != "GYBC_AUTHZ_REDIS_SENTINEL_PASSWORD"}
    proc = check_config(daemon, docs, tmp_path, env)
    assert proc.returncode == 64 and "redis.sentinel.password_env" in proc.stderr, proc.stderr
    # A CA and TLS to the data nodes, as a user adds them.
    docs = render(chart, merged(values, gybcAuthz__redis__sentinel__dataNodesTls=True,
                                gybcAuthz__config__redis={"sentinel": {"tls_ca_file": "/ca.pem"}}))
    sentinel = yaml.safe_load(daemon_yaml(docs))["redis"]["sentinel"]
    assert sentinel["data_nodes_tls"] is True and sentinel["tls_ca_file"] == "/ca.pem"
    assert sentinel["master_name"] == "mymaster"


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


# === NetworkPolicy: only Envoy's listener and the probe/metrics ports ===


def policy_ports(rule: dict) -> set[int]:
    assert all(p["protocol"] == "TCP" for p in rule["ports"]), rule
    return {p["port"] for p in rule["ports"]}


@pytest.mark.parametrize("values_file", SCENARIOS)
def test_network_policy_admits_only_envoy_and_probe_ports(chart, values_file):
    """The identity headers are trusted because every request passes Envoy: the policy admits
    exactly Envoy's listener, Envoy's stats port and (sidecar) the daemon's probe port, which are
    the ports Envoy and the daemon listen on for the network, and never the app's or the ext_authz
    gRPC port."""
    values = load_values(values_file)
    v = chart.merge_values(values)
    docs = render(chart, values)
    policy = one(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == deployment(docs)["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    traffic, probes = spec["ingress"]
    assert policy_ports(traffic) == {v["envoy"]["ports"]["http"]}
    # What listens on the pod's address, read from the configs the pod runs.
    env_cfg = yaml.safe_load(envoy_yaml(docs))
    listeners = {l["name"]: l["address"]["socket_address"] for l in env_cfg["static_resources"]["listeners"]}
    assert traffic["ports"][0]["port"] == listeners["ingress"]["port_value"]
    want = {listeners["stats"]["port_value"]}
    if not is_module(docs):
        http_addr = yaml.safe_load(daemon_yaml(docs))["server"]["http_addr"]
        assert http_addr.startswith("0.0.0.0:")
        want.add(int(http_addr.rsplit(":", 1)[1]))
    assert policy_ports(probes) == want
    # And those are exactly the ports the pod declares.
    declared = {p["containerPort"] for c in deployment(docs)["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])}
    assert policy_ports(traffic) | policy_ports(probes) == declared
    closed = {v["envoy"]["ports"]["admin"], v["gybcAuthz"]["ports"]["grpc"]}
    if v["app"]["enabled"]:
        closed.add(v["app"]["port"])
    assert not closed & (policy_ports(traffic) | policy_ports(probes))


def test_network_policy_sources(chart):
    test_pod_labels = one(render(chart, None), "Pod")["metadata"]["labels"]

    def rules(values):
        return one(render(chart, values), "NetworkPolicy")["spec"]["ingress"]

    # Defaults: traffic from anywhere (the Service's clients, in or outside the cluster); probes
    # and metrics from any pod of the cluster, where Prometheus runs in a namespace of its own.
    traffic, probes = rules(None)
    assert "from" not in traffic
    assert probes["from"][0] == {"namespaceSelector": {}}
    # Narrowed lists are used as given, plus the helm test pod, so `helm test` still works.
    ingress_ns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    traffic, probes = rules({"networkPolicy": {"trafficFrom": [ingress_ns], "metricsFrom": [monitoring]}})
    for rule, peer in [(traffic, ingress_ns), (probes, monitoring)]:
        assert rule["from"][0] == peer and len(rule["from"]) == 2
        selector = rule["from"][1]["podSelector"]["matchLabels"]
        assert selector.items() <= test_pod_labels.items(), (selector, test_pod_labels)
        assert "app.kubernetes.io/name" not in selector, "must not select the chart's own pods"
    # An empty list admits any source, as an empty `from` does in Kubernetes.
    _, probes = rules({"networkPolicy": {"metricsFrom": []}})
    assert "from" not in probes


def test_network_policy_can_be_disabled(chart):
    for values in ({"networkPolicy": {"enabled": False}}, {"networkPolicy": {"enabled": False}, "mode": "module"}):
        assert "NetworkPolicy" not in kinds(render(chart, values))


def test_app_container_declares_no_port(chart):
    """The app listens on loopback for Envoy only: no containerPort (nothing may name or expose
    it), and its probes reach it through Envoy's listener on health paths."""
    docs = render(chart, load_values(CHART / "ci" / "with-app-container-values.yaml"))
    app = container(docs, "threads-api")
    assert "ports" not in app
    envoy_port = container(docs, "envoy")["ports"][0]["containerPort"]
    assert app["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": envoy_port}
    assert app["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": envoy_port}


def test_notes_tell_the_app_to_listen_on_loopback(chart):
    def notes(values):
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return next(text for path, text in out.items() if path.endswith("NOTES.txt"))

    assert "must listen on 127.0.0.1:3000 only" in notes(APP)
    assert "every address" not in notes(dict(APP, app=dict(APP["app"], env=[{"name": "ADDR", "value": "127.0.0.1:3000"}])))
    text = notes(dict(APP, app=dict(APP["app"], env=[{"name": "LISTEN_ADDR", "value": "0.0.0.0:3000"}])))
    assert "WARNING: app.env/app.args mention every address (0.0.0.0 or [::]) in: LISTEN_ADDR." in text
    text = notes(merged(APP, networkPolicy__enabled=False))
    assert "any pod in the cluster can\ncall it directly" in text


# === module mode: the engine inside Envoy ===

MODULE_SCENARIOS = [p for p in SCENARIOS if p.values[0] and "module" in p.values[0].stem]


def test_sidecar_mode_renders_what_it_did(chart):
    """`mode: sidecar` is the default, and nothing of module mode leaks into it."""
    base = render(chart, None)
    explicit = render(chart, {"mode": "sidecar",
                              "module": {"installResources": {"requests": {"cpu": "1"}}, "volumeSizeLimit": "1Gi"}})
    assert explicit == base
    pod = deployment(base)["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert container_names(base) == ["envoy", "gybc-authz"]
    assert "env" not in container(base, "envoy")
    assert "module" not in {v["name"] for v in pod["volumes"]}
    assert "dynamic_modules" not in envoy_yaml(base)


@pytest.mark.parametrize("values_file", MODULE_SCENARIOS)
def test_module_mode_runs_the_engine_in_envoy(chart, values_file):
    values = load_values(values_file)
    v = chart.merge_values(values)
    docs = render(chart, values)
    pod = deployment(docs)["spec"]["template"]["spec"]
    names = container_names(docs)
    assert "gybc-authz" not in names
    assert names == ["envoy"] + ([v["app"]["name"]] if v["app"]["enabled"] else [])
    # The init container copies the module (and the libgcc_s it needs, which Envoy's distroless
    # image lacks) from the gybc-authz image into an emptyDir ...
    (init,) = pod["initContainers"]
    a = v["gybcAuthz"]
    assert init["name"] == "install-module"
    assert init["image"] == f"{a['image']['repository']}:{a['image']['tag'] or chart.metadata['appVersion']}"
    module_dir = "/usr/local/lib/gybc-authz"
    assert init["command"] == ["/usr/local/bin/copy-file", f"{module_dir}/{MODULE_FILE}",
                               f"{module_dir}/libgcc_s.so.1", "/module"]
    assert mounts(init) == {"module": {"name": "module", "mountPath": "/module"}}
    volume = {vol["name"]: vol for vol in pod["volumes"]}["module"]
    assert volume == {"name": "module", "emptyDir": {"sizeLimit": v["module"]["volumeSizeLimit"]}}
    # ... which Envoy mounts read-only where its search path points, the path the module has
    # in the image.
    envoy = container(docs, "envoy")
    assert mounts(envoy)["module"] == {"name": "module", "mountPath": module_dir, "readOnly": True}
    env = {e["name"]: e.get("value") for e in envoy["env"]}
    assert env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] == module_dir
    assert env["LD_LIBRARY_PATH"] == module_dir
    # Envoy's filter reads the config file mounted at the path the daemon reads it from.
    env_cfg = yaml.safe_load(envoy_yaml(docs))
    config_mount = mounts(envoy)["config"]
    assert config_mount == {"name": "config", "mountPath": "/etc/gybc-authz/config.yaml",
                            "subPath": "config.yaml", "readOnly": True}
    assert module_filter(env_cfg) == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"name": "gybc_authz_envoy", "do_not_close": True, "metrics_namespace": "gybc"},
        "filter_name": MODULE_FILTER,
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": config_mount["mountPath"]},
    }
    assert MODULE_FILE == f"lib{module_filter(env_cfg)['dynamic_module_config']['name']}.so"
    # No ext_authz, no gRPC cluster: nothing calls a daemon.
    assert [f["name"] for f in ingress_hcm(env_cfg)["http_filters"]] == \
        [CORS_FILTER, MODULE_FILTER, "envoy.filters.http.router"]
    assert "gybc_authz" not in {c["name"] for c in env_cfg["static_resources"]["clusters"]}
    assert "ext_authz" not in envoy_yaml(docs)
    # The key file, when there is one, is mounted into Envoy where the config says.
    key_store = yaml.safe_load(daemon_yaml(docs)).get("key_store", {})
    if key_store.get("type") == "file":
        keys = mounts(envoy)["keys"]
        assert keys["readOnly"] is True and "subPath" not in keys
        assert key_store["path"].startswith(keys["mountPath"] + "/")
    # The metrics are Envoy's: one scrape target, the stats port.
    assert "authz-http" not in {p["name"] for p in one(docs, "Service")["spec"]["ports"]}
    if v["serviceMonitor"]["enabled"]:
        endpoints = one(docs, "ServiceMonitor")["spec"]["endpoints"]
        assert {(e["port"], e["path"]) for e in endpoints} == {("envoy-stats", "/stats/prometheus")}
        # The module's envoy_gybc_authz_* series are renamed to the daemon's names, which the
        # dashboard and alerts query.
        (relabel,) = endpoints[0]["metricRelabelings"]
        assert relabel["sourceLabels"] == ["__name__"] and relabel["targetLabel"] == "__name__"
        name = re.fullmatch(relabel["regex"], "envoy_gybc_authz_decisions_total")
        assert name and name.expand(relabel["replacement"].replace("$1", r"\1")) == "gybc_authz_decisions_total"
        assert re.fullmatch(relabel["regex"], "envoy_cluster_upstream_rq") is None


def test_module_mode_gives_envoy_the_engine_environment(chart):
    """The Redis credentials and extraEnv go where the engine runs: Envoy's container."""
    docs = render(chart, load_values(CHART / "ci" / "module-with-routes-values.yaml"))
    names = [e["name"] for e in container(docs, "envoy")["env"]]
    assert names == ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH", "LD_LIBRARY_PATH", "GYBC_AUTHZ_REDIS_PASSWORD",
                     "GYBC_AUTHZ_REDIS_URL", "GYBC_AUTHZ__REDIS__URLS", "GYBC_AUTHZ__LOG__LEVEL"]
    assert pod_env(docs)["GYBC_AUTHZ__REDIS__URLS"] == "[rediss://redis.gybc.svc.cluster.local:6380]"
    docs = render(chart, load_values(CHART / "ci" / "module-values.yaml"))
    env = {e["name"]: e for e in container(docs, "envoy")["env"]}
    assert env["GYBC_AUTHZ_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "gybc-redis", "key": "password"}
    assert yaml.safe_load(daemon_yaml(docs))["redis"]["password_env"] == "GYBC_AUTHZ_REDIS_PASSWORD"


def test_per_route_settings_in_both_modes(chart):
    """envoy.routes: the same gybc.* keys, as ext_authz context_extensions (sidecar) or as the
    module filter's per-route JSON object (module), between the health routes and the catch-all."""
    values = load_values(CHART / "ci" / "module-with-routes-values.yaml")
    configured = values["envoy"]["routes"]
    for mode in ("sidecar", "module"):
        routes = ingress_routes(yaml.safe_load(envoy_yaml(render(chart, merged(values, mode=mode)))))
        health, per_route, catch_all = routes[:2], routes[2:-1], routes[-1]
        assert [r["match"]["path"] for r in health] == ["/healthz", "/readyz"]
        assert catch_all["match"] == {"prefix": "/"} and "typed_per_filter_config" not in catch_all
        assert [r["match"] for r in per_route] == [r["match"] for r in configured]
        for route, want in zip(per_route, configured):
            assert route["route"] == {"cluster": "app", "timeout": "30s"}
            (name, cfg), = route["typed_per_filter_config"].items()
            if mode == "sidecar":
                assert name == "envoy.filters.http.ext_authz"
                assert cfg["check_settings"]["context_extensions"] == want["settings"]
            else:
                assert name == MODULE_FILTER
                assert cfg["@type"] == ("type.googleapis.com/envoy.extensions.filters.http."
                                        "dynamic_modules.v3.DynamicModuleFilterPerRoute")
                assert cfg["dynamic_module_config"] == {"name": "gybc_authz_envoy"}
                assert cfg["filter_name"] == MODULE_FILTER
                assert cfg["filter_config"]["@type"] == "type.googleapis.com/google.protobuf.StringValue"
                assert json.loads(cfg["filter_config"]["value"]) == want["settings"]


# === checksum ===


def test_checksum_annotation_follows_both_configs(chart):
    base = checksum(render(chart, None))
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum(render(chart, None)) == base, "stable across renders"
    daemon_change = merged(None, gybcAuthz__config={"log": {"level": "debug"}})
    envoy_change = merged(None, envoy__authzTimeout="0.3s")
    keyfile_change = merged(None, gybcAuthz__keyFile={"existingSecret": "k"})
    routes_change = merged(None, envoy__routes=PER_ROUTE_ROUTES[:1])
    for values in (daemon_change, envoy_change, keyfile_change, routes_change, {"mode": "module"}):
        assert checksum(render(chart, values)) != base, values
    # Nothing else rolls the pods.
    assert checksum(render(chart, {"replicaCount": 5, "podAnnotations": {"a": "b"}})) == base
    assert checksum(render(chart, {"grafanaDashboard": {"enabled": True},
                                   "prometheusRule": {"enabled": True}})) == base
    assert checksum(render(chart, {"networkPolicy": {"enabled": False}})) == base


# === contradictions stop the render ===


def test_app_probes_through_envoy_are_accepted(chart):
    probe = {"httpGet": {"path": "/healthz?full=1", "port": 8080}}
    docs = render(chart, dict(APP, app=dict(APP["app"], livenessProbe=probe, readinessProbe={"exec": {"command": ["true"]}})))
    assert container(docs, "app")["livenessProbe"] == probe


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
        ({"gybcAuthz": {"redis": {"urls": ["redis://r:6379"],
                                  "sentinel": {"masterName": "m", "urls": ["redis://s:26379"]}}}},
         "gybcAuthz.redis.sentinel names the primary"),
        ({"gybcAuthz": {"redis": {"cluster": True,
                                  "sentinel": {"masterName": "m", "urls": ["redis://s:26379"]}}}},
         "gybcAuthz.redis.sentinel names the primary"),
        ({"gybcAuthz": {"redis": {"sentinel": {"masterName": "m"}}}}, "needs gybcAuthz.redis.sentinel.urls"),
        ({"gybcAuthz": {"redis": {"sentinel": {"urls": ["redis://s:26379"]}}}}, "needs gybcAuthz.redis.sentinel.masterName"),
        ({"gybcAuthz": {"redis": {"sentinel": {"masterName": "m", "urls": ["redis://s:26379"],
                                               "passwordKey": "p"}}}},
         "sentinel.passwordKey names an item of gybcAuthz.redis.existingSecret, which is empty"),
        ({"gybcAuthz": {"redis": {"sentinel": {"masterName": "m", "urls": ["redis://s:26379"]}},
                        "config": {"redis": {"sentinel": {"master_name": "x", "urls": ["redis://s"]}}}}},
         "sentinels are set twice"),
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
        # Module mode: no daemon to outlive Envoy, but Envoy must fit in the grace period.
        ({"mode": "module", "terminationGracePeriodSeconds": 5}, "must exceed envoy.preStopSleepSeconds"),
        ({"mode": "module", "serviceMonitor": {"enabled": True, "scrapeEnvoy": False}},
         "leaves nothing to scrape in module mode"),
        # The app listens on loopback: the kubelet cannot probe app.port on the pod IP ...
        (dict(APP, app=dict(APP["app"], readinessProbe={"httpGet": {"path": "/readyz", "port": 3000}})),
         "app.readinessProbe probes app.port 3000"),
        (dict(APP, app=dict(APP["app"], livenessProbe={"tcpSocket": {"port": 3000}})),
         "app.livenessProbe probes app.port 3000"),
        (dict(APP, app=dict(APP["app"], startupProbe={"grpc": {"port": 3000}})),
         "app.startupProbe probes app.port 3000"),
        # ... nor name a port the app does not declare ...
        (dict(APP, app=dict(APP["app"], readinessProbe={"httpGet": {"path": "/readyz", "port": "app"}})),
         'app.readinessProbe.httpGet.port is the name "app"'),
        # ... and through Envoy only a health path answers without credentials.
        (dict(APP, app=dict(APP["app"], readinessProbe={"httpGet": {"path": "/status", "port": 8080}})),
         "/status, which is not in envoy.healthPaths"),
    ],
)
def test_contradictory_values_fail_with_a_message(chart, helm, values, message):
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE)
