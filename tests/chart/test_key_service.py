"""The key service's part of the chart (keyService.enabled): a Deployment whose pods run Envoy,
gybc-authz in front of it in the chart's `mode`, and `gybc-authz key-service` with its API on
127.0.0.1 and its admin port (probes, metrics) on the pod IP, configured by the config's
`key_service` section; a Service and a NetworkPolicy that reach Envoy's listener and the admin
port only; a ServiceMonitor with the daemon's. Rendered in both modes, validated against the
Kubernetes schemas and by the real `envoy --mode validate` (module mode with the built module
loaded), and run: the real key service, started with the rendered arguments and config against
a real redis-server, listens on loopback only for its API, and its probes answer as the kubelet
would ask them, following Redis down and back.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import CHART, SCENARIOS, SHIPPED_KEY_SERVICE_ENVOY, SHIPPED_MODULE_ENVOY, load_values
from test_chart import (
    KUBE_VERSIONS,
    MODULE_FILTER,
    RELEASE,
    assert_hardened,
    daemon_yaml,
    deployment,
    ingress_hcm,
    ingress_routes,
    is_key_service,
    manifests,
    merged,
    module_filter,
    mounts,
    one,
    pod_env,
    render,
    run_envoy_validate,
    run_module_envoy_validate,
)

KS_VALUES = CHART / "ci" / "key-service-values.yaml"
KS_MODULE_VALUES = CHART / "ci" / "module-key-service-values.yaml"
# The least values that run the key service: it needs the Redis key store.
KS_MIN = {"keyService": {"enabled": True},
          "gybcAuthz": {"redis": {"urls": ["redis://redis:6379"]}, "config": {"key_store": {"type": "redis"}}}}
EXT_AUTHZ = "envoy.filters.http.ext_authz"
# Envoy's CORS filter, before gybc-authz (docs/browsers.md).
CORS = "envoy.filters.http.cors"
ROUTER = "envoy.filters.http.router"
# Both key-service scenarios, each in both modes.
KS_CASES = [pytest.param(f, mode, id=f"{f.stem}-{mode}") for f in (KS_VALUES, KS_MODULE_VALUES)
            for mode in ("sidecar", "module")]


# === helpers ===


def ks(docs, kind: str, name_suffix: str = "") -> dict:
    return one(docs, kind, name_suffix, key_service=True)


def ks_pod(docs) -> dict:
    return ks(docs, "Deployment")["spec"]["template"]["spec"]


def ks_containers(docs) -> dict[str, dict]:
    return {c["name"]: c for c in ks_pod(docs)["containers"]}


def ks_envoy_yaml(docs) -> str:
    return ks(docs, "ConfigMap", "-envoy")["data"]["envoy.yaml"]


def ks_envoy(docs) -> dict:
    return yaml.safe_load(ks_envoy_yaml(docs))


def render_case(chart, values_file: Path, mode: str) -> tuple[dict, dict]:
    """The scenario in `mode`: its manifests and its merged values."""
    values = merged(load_values(values_file), mode=mode)
    return render(chart, values), chart.merge_values(values)


def listener_ports(env_cfg: dict) -> dict[str, int]:
    return {l["name"]: l["address"]["socket_address"]["port_value"] for l in env_cfg["static_resources"]["listeners"]}


def cluster_address(env_cfg: dict, name: str) -> str:
    clusters = {c["name"]: c for c in env_cfg["static_resources"]["clusters"]}
    sa = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    return f"{sa['address']}:{sa['port_value']}"


def flag(args: list[str], name: str) -> str:
    (value,) = [args[i + 1] for i, a in enumerate(args) if a == name]
    return value


def ks_section(docs) -> dict:
    """The config's `key_service` section, which the key service reads."""
    return yaml.safe_load(daemon_yaml(docs))["key_service"]


def http_get(port: int, path: str) -> int:
    """The status of GET <path> on 127.0.0.1:<port>, as the kubelet's httpGet probe asks it."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0


def as_module(sidecar_cfg: dict) -> dict:
    """A sidecar Envoy config with the engine inside Envoy, exactly as deploy/envoy/envoy-module.yaml
    does it for deploy/envoy/envoy.yaml: the ext_authz filter replaced by that file's module filter,
    the gybc_authz cluster dropped."""
    module_entry = next(f for f in ingress_hcm(yaml.safe_load(SHIPPED_MODULE_ENVOY.read_text()))["http_filters"]
                        if f["name"] == MODULE_FILTER)
    hcm = ingress_hcm(sidecar_cfg)
    hcm["http_filters"] = [module_entry if f["name"] == EXT_AUTHZ else f for f in hcm["http_filters"]]
    resources = sidecar_cfg["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != "gybc_authz"]
    return sidecar_cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, ready, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"{what} exited with {proc.returncode}: {out}{err}")
        if ready():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} not ready within {timeout} s")


def answers(port: int, probe: bytes, expect: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(probe)
            return expect in s.recv(64)
    except OSError:
        return False


def listening_addresses(port: int) -> list[str]:
    """The local addresses of the sockets listening on `port`, from the kernel's tables (hex, as
    /proc/net/tcp{,6} write them: 127.0.0.1 is 0100007F)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(addr)
    return found


# === off by default ===


@pytest.mark.parametrize("values_file", [p for p in SCENARIOS
                                         if not (p.values[0] and "key-service" in p.values[0].stem)])
def test_off_renders_nothing_of_the_key_service(chart, values_file):
    """Off (the default), the key service leaves no trace, whatever else keyService says."""
    values = load_values(values_file)
    docs = render(chart, values)
    assert not [d["metadata"]["name"] for d in manifests(docs) if is_key_service(d) or "key-service" in str(d)]
    tuned = merged(values, keyService={"enabled": False, "port": 9000, "replicaCount": 5,
                                       "allowedScopes": ["a:b"], "service": {"type": "ClusterIP", "port": 81}})
    assert render(chart, tuned) == docs


# === on, in both modes ===


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_resources(chart, values_file, mode):
    docs, v = render_case(chart, values_file, mode)
    k = v["keyService"]
    name = f"{RELEASE}-gybc-authz-key-service"
    mine = [d for d in manifests(docs) if is_key_service(d)]
    assert sorted(d["kind"] for d in mine) == sorted(
        ["ConfigMap", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"])
    assert {d["metadata"]["name"] for d in mine} == {name, f"{name}-envoy"}
    dep = ks(docs, "Deployment")
    assert dep["spec"]["replicas"] == k["replicaCount"]
    # Selectors of its own: the main workload's never pick its pods, and its never pick theirs.
    selector = dep["spec"]["selector"]["matchLabels"]
    ks_labels = dep["spec"]["template"]["metadata"]["labels"]
    main_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= ks_labels.items() and not selector.items() <= main_labels.items()
    for kind, path in [("Service", ["spec", "selector"]),
                       ("PodDisruptionBudget", ["spec", "selector", "matchLabels"]),
                       ("NetworkPolicy", ["spec", "podSelector", "matchLabels"])]:
        main, own = one(docs, kind), ks(docs, kind)
        for p in path:
            main, own = main[p], own[p]
        assert own == selector, kind
        assert not main.items() <= ks_labels.items(), f"the main {kind} selects the key service's pods"
    pdb = ks(docs, "PodDisruptionBudget")["spec"]
    # (Helm drops a null value from the merged values.)
    want = {key: k["podDisruptionBudget"][key] for key in ("minAvailable", "maxUnavailable")
            if k["podDisruptionBudget"].get(key) is not None}
    assert {key: pdb[key] for key in ("minAvailable", "maxUnavailable") if key in pdb} == want
    # The same ServiceAccount as the main workload, and no API token.
    assert ks_pod(docs)["serviceAccountName"] == deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"]
    assert ks_pod(docs)["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_pod_runs_gybc_authz_as_the_chart_mode_says(chart, values_file, mode):
    """Sidecar: Envoy, the gybc-authz container (ext_authz), the key service. Module: Envoy with
    the module copied in by the main workload's init container, and the key service."""
    docs, v = render_case(chart, values_file, mode)
    pod = ks_pod(docs)
    main_pod = deployment(docs)["spec"]["template"]["spec"]
    main = {c["name"]: c for c in main_pod["containers"]}
    names = list(ks_containers(docs))
    if mode == "sidecar":
        assert names == ["envoy", "gybc-authz", "key-service"]
        assert "initContainers" not in pod
        # The same gybc-authz container as the main workload's.
        assert ks_containers(docs)["gybc-authz"] == main["gybc-authz"]
    else:
        assert names == ["envoy", "key-service"]
        assert pod["initContainers"] == main_pod["initContainers"]
        assert [c["name"] for c in pod["initContainers"]] == ["install-module"]
    # The same Envoy container as the main workload's (its bootstrap comes from another ConfigMap).
    assert ks_containers(docs)["envoy"] == main["envoy"]
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    main_volumes = {vol["name"]: vol for vol in main_pod["volumes"]}
    assert volumes["envoy-config"]["configMap"]["name"] == ks(docs, "ConfigMap", "-envoy")["metadata"]["name"]
    # The same config file as the main workload's: one config for both.
    assert volumes["config"] == main_volumes["config"]
    assert {n: vol for n, vol in volumes.items() if n != "envoy-config"} == \
        {n: vol for n, vol in main_volumes.items() if n in volumes and n != "envoy-config"}


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_listens_on_loopback_only(chart, values_file, mode):
    """The config's `key_service` section, not flags, says where it listens: its API on
    127.0.0.1:<keyService.port>, the one Envoy's key_service cluster names, with no containerPort;
    its admin port on the pod IP, declared, and probed there (liveness /healthz, readiness
    /readyz)."""
    docs, v = render_case(chart, values_file, mode)
    k = v["keyService"]
    c = ks_containers(docs)["key-service"]
    assert c["args"] == ["key-service", "--config", "/etc/gybc-authz/config.yaml"]
    section = ks_section(docs)
    assert section["listen_addr"] == f"127.0.0.1:{k['port']}"
    assert cluster_address(ks_envoy(docs), "key_service") == section["listen_addr"]
    assert section["admin_addr"] == f"0.0.0.0:{k['adminPort']}"
    assert section["path_prefix"] == k["pathPrefix"]
    assert section["allowed_scopes"] == k["allowedScopes"]
    assert c["ports"] == [{"name": "ks-admin", "containerPort": k["adminPort"], "protocol": "TCP"}]
    assert c["livenessProbe"] == {"httpGet": {"path": "/healthz", "port": "ks-admin"}, **k["livenessProbe"]}
    assert c["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": "ks-admin"}, **k["readinessProbe"]}
    assert "startupProbe" not in c
    # Nothing else in the pod listens on its ports.
    declared = [p["containerPort"] for x in ks_pod(docs)["containers"] for p in x.get("ports", [])]
    assert k["port"] not in declared and k["port"] not in listener_ports(ks_envoy(docs)).values()
    assert declared.count(k["adminPort"]) == 1 and k["adminPort"] not in listener_ports(ks_envoy(docs)).values()
    # It outlives Envoy at shutdown, within the grace period.
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= ks_containers(docs)["envoy"]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert ks_pod(docs)["terminationGracePeriodSeconds"] > sleep


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_reads_the_main_config_and_redis_credentials(chart, daemon, tmp_path, values_file, mode):
    """The key service's store is the config's Redis key store, with the credentials the engine
    gets: the same mounted file and the same variables, which pass check-config."""
    docs, v = render_case(chart, values_file, mode)
    c = ks_containers(docs)["key-service"]
    assert flag(c["args"], "--config") == mounts(c)["config"]["mountPath"]
    # The section's other fields come from gybcAuthz.config.key_service.
    tuned = render(chart, merged(load_values(values_file), mode=mode,
                                 gybcAuthz__config__key_service={"max_active_keys_per_tenant": 7}))
    assert ks_section(tuned)["max_active_keys_per_tenant"] == 7
    assert mounts(c)["config"] == {"name": "config", "mountPath": "/etc/gybc-authz/config.yaml",
                                   "subPath": "config.yaml", "readOnly": True}
    assert yaml.safe_load(daemon_yaml(docs))["key_store"] == {"type": "redis"}
    engine = ks_containers(docs)["envoy" if mode == "module" else "gybc-authz"]
    engine_env = [e for e in engine["env"] if not e["name"].startswith(("ENVOY_", "LD_"))]
    assert c["env"] == engine_env
    assert "GYBC_AUTHZ_REDIS_PASSWORD" in {e["name"] for e in c["env"]}
    env = pod_env(docs, of=c)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(daemon_yaml(docs))
    full = {key: val for key, val in os.environ.items() if not key.startswith("GYBC_AUTHZ")}
    proc = subprocess.run([str(daemon), "check-config", str(cfg)], capture_output=True, text=True,
                          env={**full, **env}, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_is_reached_through_envoy_only(chart, values_file, mode):
    """The Service has two ports: the API through Envoy's ingress listener, and the key service's
    admin port (probes, metrics). The NetworkPolicy admits the listener from trafficFrom, the
    admin port from metricsFrom, and nothing else: never the API's own port."""
    docs, v = render_case(chart, values_file, mode)
    k = v["keyService"]
    listeners = listener_ports(ks_envoy(docs))
    envoy_ports = {p["name"]: p["containerPort"] for p in ks_containers(docs)["envoy"]["ports"]}
    port, admin = ks(docs, "Service")["spec"]["ports"]
    assert port["port"] == k["service"]["port"]
    assert port["targetPort"] == "http" and envoy_ports["http"] == listeners["ingress"]
    assert admin == {"name": "ks-admin", "port": k["adminPort"], "targetPort": "ks-admin", "protocol": "TCP"}
    spec = ks(docs, "NetworkPolicy")["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    rule, metrics_rule = spec["ingress"]
    assert rule["ports"] == [{"port": listeners["ingress"], "protocol": "TCP"}]
    assert metrics_rule["ports"] == [{"port": k["adminPort"], "protocol": "TCP"}]
    admitted = {p["port"] for r in spec["ingress"] for p in r["ports"]}
    assert k["port"] not in admitted
    # From whoever may send the main workload traffic, and read its metrics (and the helm test
    # pod, when narrowed).
    for r, peers in ((rule, v["networkPolicy"]["trafficFrom"]), (metrics_rule, v["networkPolicy"]["metricsFrom"])):
        assert r.get("from", [])[:len(peers)] == peers
        assert ("from" in r) == bool(peers)
    # Off with the chart's NetworkPolicy.
    off = render(chart, merged(load_values(values_file), mode=mode, networkPolicy__enabled=False))
    assert not [d for d in manifests(off) if is_key_service(d) and d["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_api_goes_through_gybc_authz(chart, values_file, mode):
    """Envoy routes only `<pathPrefix>/` to the key service, checked by gybc-authz: its filter
    (ext_authz, or the module) comes before the router, and no route switches it off."""
    docs, v = render_case(chart, values_file, mode)
    env_cfg = ks_envoy(docs)
    api, rest = ingress_routes(env_cfg)
    assert api == {"match": {"prefix": v["keyService"]["pathPrefix"] + "/"},
                   "route": {"cluster": "key_service", "timeout": v["keyService"]["routeTimeout"]}}
    assert rest["match"] == {"prefix": "/"} and rest["direct_response"]["status"] == 404
    # Envoy's own answers are the key API's JSON errors: the 404, a timeout, an unreachable service.
    assert json.loads(rest["direct_response"]["body"]["inline_string"])["code"] == "not_found"
    assert rest["response_headers_to_add"][0]["header"] == {"key": "content-type", "value": "application/json"}
    mappers = ingress_hcm(env_cfg)["local_reply_config"]["mappers"]
    assert [m["body_format_override"]["json_format"]["code"] for m in mappers] == ["deadline_exceeded", "unavailable"]
    hcm = ingress_hcm(env_cfg)
    # The virtual host's only per-filter setting is the CORS policy (docs/browsers.md): nothing
    # switches gybc-authz off, on any route.
    assert list(hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]) == [CORS]
    assert all("typed_per_filter_config" not in r for r in (api, rest))
    filters = [f["name"] for f in hcm["http_filters"]]
    clusters = {c["name"] for c in env_cfg["static_resources"]["clusters"]}
    if mode == "sidecar":
        assert filters == [CORS, EXT_AUTHZ, ROUTER]
        ext = hcm["http_filters"][1]["typed_config"]
        assert ext["failure_mode_allow"] is False and ext["transport_api_version"] == "V3"
        assert ext["grpc_service"]["envoy_grpc"]["cluster_name"] == "gybc_authz"
        assert cluster_address(env_cfg, "gybc_authz") == yaml.safe_load(daemon_yaml(docs))["server"]["grpc_addr"]
        assert clusters == {"gybc_authz", "key_service", "envoy_admin"}
    else:
        assert filters == [CORS, MODULE_FILTER, ROUTER]
        assert module_filter(env_cfg)["filter_config"]["value"] == \
            mounts(ks_containers(docs)["envoy"])["config"]["mountPath"]
        assert clusters == {"key_service", "envoy_admin"}
        assert "ext_authz" not in ks_envoy_yaml(docs)
    # The same listeners and ports as the main workload's Envoy; admin on loopback.
    main_cfg = yaml.safe_load(one(docs, "ConfigMap", "-envoy")["data"]["envoy.yaml"])
    assert listener_ports(env_cfg) == listener_ports(main_cfg)
    assert env_cfg["admin"] == main_cfg["admin"]
    assert ingress_hcm(env_cfg)["http_filters"] == ingress_hcm(main_cfg)["http_filters"]


def test_chart_renders_the_shipped_key_service_config(chart):
    """With the shipped file's settings, the key service's Envoy config is
    deploy/envoy/key-service.yaml field for field, the file tests/key_service_envoy.rs runs; in
    module mode, that file with the module in place of ext_authz as envoy-module.yaml has it."""
    shipped = yaml.safe_load(SHIPPED_KEY_SERVICE_ENVOY.read_text())
    assert ks_envoy(render(chart, KS_MIN)) == shipped
    assert ks_envoy(render(chart, merged(KS_MIN, mode="module"))) == as_module(shipped)


# === Envoy validates it ===


def test_shipped_key_service_envoy_config_passes_envoy_validate(envoy, tmp_path):
    run_envoy_validate(envoy, SHIPPED_KEY_SERVICE_ENVOY.read_text(), tmp_path)


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_envoy_config_passes_envoy_validate(chart, envoy, tmp_path, values_file, mode, request):
    """The rendered bootstrap through the real `envoy --mode validate`; in module mode with the
    built module loaded, reading the rendered config with Redis on a loopback port."""
    docs, _ = render_case(chart, values_file, mode)
    if mode == "sidecar":
        return run_envoy_validate(envoy, ks_envoy_yaml(docs), tmp_path)
    cfg = yaml.safe_load(daemon_yaml(docs))
    cfg["redis"]["urls"] = [f"redis://127.0.0.1:{free_port()}"]
    envoy_c = ks_containers(docs)["envoy"]
    env = {k: v for k, v in pod_env(docs, of=envoy_c).items() if k.startswith("GYBC_AUTHZ")}
    env.pop("GYBC_AUTHZ__REDIS__URLS", None)
    run_module_envoy_validate(envoy, ks_envoy_yaml(docs), yaml.safe_dump(cfg),
                              request.getfixturevalue("envoy_module_dir"), tmp_path, env)


# === the key service runs as rendered ===


def test_rendered_key_service_runs_on_loopback_only(chart, daemon, redis_server, tmp_path):
    """The real `gybc-authz key-service` with the rendered arguments and config, on a real
    redis-server: its API's one listening socket is 127.0.0.1's, and a request that did not come
    through gybc-authz (no identity headers) gets 401; its admin port listens on every address,
    and the probes as rendered answer there: live throughout, ready while Redis answers, not
    ready while it is down, ready again when it returns."""
    redis_port, ks_port, admin_port = free_port(), free_port(), free_port()
    redis_args = [str(redis_server), "--port", str(redis_port), "--bind", "127.0.0.1",
                  "--save", "", "--appendonly", "no"]

    def start_redis():
        return subprocess.Popen(redis_args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    redis = start_redis()
    service = None
    try:
        wait_for("redis-server", lambda: answers(redis_port, b"PING\r\n", b"+PONG"), redis)
        values = merged(load_values(KS_VALUES), keyService__port=ks_port, keyService__adminPort=admin_port,
                        gybcAuthz__redis={"urls": [f"redis://127.0.0.1:{redis_port}"], "existingSecret": ""})
        docs = render(chart, values)
        c = ks_containers(docs)["key-service"]
        config = tmp_path / "config.yaml"
        config.write_text(daemon_yaml(docs))
        args = [str(config) if a == mounts(c)["config"]["mountPath"] else a for a in c["args"]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GYBC_AUTHZ")}
        service = subprocess.Popen([str(daemon), *args], env={**env, **pod_env(docs, of=c)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for("gybc-authz key-service", lambda: listening_addresses(ks_port), service)
        assert listening_addresses(ks_port) == ["0100007F"], "the key service must bind 127.0.0.1 only"
        assert set(listening_addresses(admin_port)) <= {"00000000", "00000000000000000000000000000000"}
        conn = http.client.HTTPConnection("127.0.0.1", ks_port, timeout=5)
        conn.request("POST", f"{ks_section(docs)['path_prefix']}/list-keys", body="{}",
                     headers={"content-type": "application/json"})
        assert conn.getresponse().status == 401
        # The probes, on the port and paths the pod spec names.
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        live, ready = (c[p]["httpGet"] for p in ("livenessProbe", "readinessProbe"))
        assert ports[live["port"]] == ports[ready["port"]] == admin_port
        wait_for("readiness", lambda: http_get(admin_port, ready["path"]) == 200, service)
        assert http_get(admin_port, live["path"]) == 200
        redis.kill()
        redis.communicate(timeout=20)
        wait_for("not ready while Redis is down", lambda: http_get(admin_port, ready["path"]) == 503, service)
        assert http_get(admin_port, live["path"]) == 200, "alive while Redis is down"
        redis = start_redis()
        wait_for("ready again once Redis returns", lambda: http_get(admin_port, ready["path"]) == 200, service)
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        conn.request("GET", "/metrics")
        assert "gybc_authz_key_service_store_up 1" in conn.getresponse().read().decode()
    finally:
        for p in (service, redis):
            if p is not None:
                p.terminate()
                p.communicate(timeout=20)


# === security, checks, schema ===


@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_security_defaults(chart, values_file, mode):
    docs, _ = render_case(chart, values_file, mode)
    pod = ks_pod(docs)
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    for c in pod["containers"] + pod.get("initContainers", []):
        assert_hardened(c["securityContext"], f"key service/{c['name']}")
        assert c["resources"].get("requests") and c["resources"].get("limits", {}).get("memory"), c["name"]
    # The key service's own securityContext is merged over the hardened defaults.
    docs = render(chart, merged(load_values(values_file), mode=mode,
                                keyService__securityContext={"runAsUser": 1000}))
    sc = ks_containers(docs)["key-service"]["securityContext"]
    assert sc["runAsUser"] == 1000
    assert_hardened(sc, "key-service with its own securityContext")


def test_key_service_checksum_follows_its_configs(chart):
    def checksum(values):
        return ks(render(chart, values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum(KS_MIN)
    assert checksum(KS_MIN) == base
    for change in (merged(KS_MIN, keyService__routeTimeout="3s"), merged(KS_MIN, envoy__authzTimeout="0.3s"),
                   merged(KS_MIN, gybcAuthz__config__log={"level": "debug"}), merged(KS_MIN, mode="module")):
        assert checksum(change) != base, change
    assert checksum(merged(KS_MIN, keyService__replicaCount=5, keyService__podAnnotations={"a": "b"})) == base


def test_helm_test_pod_calls_the_key_service_through_envoy(chart):
    script = " ".join(one(render(chart, KS_MIN), "Pod")["spec"]["containers"][0]["command"])
    assert f"http://{RELEASE}-gybc-authz-key-service:80/api/v1/iam/api-keys/list-keys" in script
    assert "key-service" not in " ".join(one(render(chart, None), "Pod")["spec"]["containers"][0]["command"])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"keyService": {"enabled": True}}, "keyService.enabled needs the Redis key store"),
        ({"keyService": {"enabled": True}, "gybcAuthz": {"keyFile": {"existingSecret": "keys"}}},
         "keyService.enabled needs the Redis key store"),
        (merged(KS_MIN, keyService__port=9902), "keyService.port 9902 is taken"),
        (merged(KS_MIN, keyService__port=50051), "keyService.port 50051 is taken"),
        (merged(KS_MIN, keyService__adminPort=8090), "keyService.adminPort 8090 is taken"),
        (merged(KS_MIN, keyService__adminPort=9902), "keyService.adminPort 9902 is taken"),
        (merged(KS_MIN, keyService__preStopSleepSeconds=1), "keyService.preStopSleepSeconds must be at least"),
        (merged(KS_MIN, keyService__preStopSleepSeconds=30, gybcAuthz__shutdownGraceSeconds=1),
         "must exceed keyService.preStopSleepSeconds"),
        (merged(KS_MIN, keyService__podDisruptionBudget__maxUnavailable=1), "not both"),
        (merged(KS_MIN, keyService__podDisruptionBudget__minAvailable=None), "needs minAvailable or maxUnavailable"),
    ],
)
def test_contradictory_key_service_values_fail_with_a_message(chart, helm, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name=RELEASE)


def test_key_service_port_may_be_the_apps_in_module_mode(chart):
    """Only the ports of the key service's own pod count: gybc-authz's are free in module mode."""
    docs = render(chart, merged(KS_MIN, mode="module", keyService__port=50051))
    assert ks_section(docs)["listen_addr"] == "127.0.0.1:50051"


def test_key_service_schema_is_strict(chart, helm):
    for bad, where in [
        ({"keyService": {"enabled": True, "listen": "0.0.0.0:8090"}}, "listen"),
        ({"keyService": {"port": 0}}, "port"),
        ({"keyService": {"adminPort": 70000}}, "adminPort"),
        ({"keyService": {"readinessProbe": {"httpGet": {"path": "/"}}}}, "readinessProbe"),
        # The chart sets the key service's addresses, prefix and scopes from keyService.
        ({"gybcAuthz": {"config": {"key_service": {"listen_addr": "0.0.0.0:8090"}}}}, "listen_addr"),
        ({"gybcAuthz": {"config": {"key_service": {"allowed_scopes": ["a:b"]}}}}, "allowed_scopes"),
        ({"gybcAuthz": {"config": {"key_service": {"max_active_keys_per_tenant": 0}}}}, "max_active_keys_per_tenant"),
        ({"keyService": {"pathPrefix": "api/keys"}}, "pathPrefix"),
        ({"keyService": {"pathPrefix": "/api/keys/"}}, "pathPrefix"),
        ({"keyService": {"allowedScopes": []}}, "allowedScopes"),
        ({"keyService": {"allowedScopes": ["a b"]}}, "allowedScopes"),
        ({"keyService": {"routeTimeout": "ten seconds"}}, "routeTimeout"),
        ({"keyService": {"service": {"targetPort": 8090}}}, "targetPort"),
        ({"keyService": {"podDisruptionBudget": {"minAvailable": "half"}}}, "minAvailable"),
    ]:
        with pytest.raises(helm.HelmValuesError, match=where):
            chart.validate_schema(bad)


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS, ids=["oldest", "newest"])
@pytest.mark.parametrize("values_file, mode", KS_CASES)
def test_key_service_manifests_are_valid_kubernetes(chart, kubernetes_validate, values_file, mode, kube_version):
    version = kube_version or kubernetes_validate.utils.latest_version()
    docs, _ = render_case(chart, values_file, mode)
    mine = [d for d in manifests(docs) if is_key_service(d)]
    assert len(mine) == 5
    for d in mine:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{d['kind']} {d['metadata']['name']} (k8s {version}): "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


# === scraped as the daemon is ===


@pytest.mark.parametrize("mode", ["sidecar", "module"])
def test_key_service_metrics_are_scraped_with_the_daemons(chart, mode):
    """With serviceMonitor.enabled, a ServiceMonitor of its own scrapes the key service's /metrics
    on its Service's admin port, at the daemon's interval and with its labels; off, none."""
    values = merged(KS_MIN, mode=mode, serviceMonitor={"enabled": True, "interval": "15s", "scrapeTimeout": "5s",
                                                       "labels": {"release": "prom"}, "scrapeEnvoy": True})
    docs = render(chart, values)
    sm = ks(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"] == ks(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert sm["spec"]["endpoints"] == [{"port": "ks-admin", "path": "/metrics", "interval": "15s", "scrapeTimeout": "5s"}]
    assert "ks-admin" in {p["name"] for p in ks(docs, "Service")["spec"]["ports"]}
    # The main workload's ServiceMonitor never selects the key service's Service.
    main = one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    assert not main.items() <= ks(docs, "Service")["metadata"]["labels"].items()
    assert not [d for d in manifests(render(chart, KS_MIN)) if is_key_service(d) and d["kind"] == "ServiceMonitor"]
