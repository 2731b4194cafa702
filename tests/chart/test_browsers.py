"""The chart's CORS policy (docs/browsers.md): Envoy's CORS filter runs before gybc-authz in both
modes, in the main workload's Envoy and the key service's, with the policy that
`gybc-authz cors-policy` prints for the rendered config. The header lists are the engine's
(crates/engine/src/browser.rs), never a copy kept in this file; only the origins and the max
age come from values.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import SCENARIOS, load_values
from test_chart import (
    CORS_FILTER,
    MODULE_FILTER,
    RELEASE,
    daemon_yaml,
    envoy_yaml,
    ingress_hcm,
    is_key_service,
    manifests,
    merged,
    one,
    pod_env,
    render,
)

EXT_AUTHZ = "envoy.filters.http.ext_authz"
MODES = ["sidecar", "module"]


def engine_policy(daemon: Path, docs, tmp_path: Path) -> dict:
    """`gybc-authz cors-policy` on the rendered config, with the pod's variables."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(daemon_yaml(docs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GYBC_AUTHZ")}
    env.update(pod_env(docs))
    proc = subprocess.run([str(daemon), "cors-policy", "--config", str(cfg)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def envoy_configs(docs) -> list[dict]:
    """The main workload's Envoy config and, with keyService.enabled, the key service's."""
    configs = [yaml.safe_load(envoy_yaml(docs))]
    if any(is_key_service(d) for d in manifests(docs)):
        ks = one(docs, "ConfigMap", "-envoy", key_service=True)
        configs.append(yaml.safe_load(ks["data"]["envoy.yaml"]))
    return configs


def cors_of(env_cfg: dict) -> tuple[list[str], dict | None]:
    """The ingress listener's filter names, and its virtual host's CORS policy (if any)."""
    hcm = ingress_hcm(env_cfg)
    vhost = hcm["route_config"]["virtual_hosts"][0]
    return [f["name"] for f in hcm["http_filters"]], vhost.get("typed_per_filter_config", {}).get(CORS_FILTER)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("values_file", SCENARIOS)
def test_the_cors_policy_is_the_engine_s_before_gybc_authz(chart, daemon, tmp_path, values_file, mode):
    values = merged(load_values(values_file), mode=mode)
    docs = render(chart, values)
    cors = chart.merge_values(values)["envoy"]["cors"]
    want = engine_policy(daemon, docs, tmp_path)
    # What values may change; everything else is the engine's.
    want["allow_origin_string_match"] = cors["allowOrigins"]
    want["max_age"] = str(cors["maxAgeSeconds"])
    authz = MODULE_FILTER if mode == "module" else EXT_AUTHZ
    for env_cfg in envoy_configs(docs):
        filters, policy = cors_of(env_cfg)
        assert filters[:2] == [CORS_FILTER, authz], filters
        assert policy == want


def test_the_defaults_are_exactly_what_the_engine_prints(chart, daemon, tmp_path):
    """With the chart's defaults, origins and max age included, the policy is the one
    `gybc-authz cors-policy` prints (and deploy/envoy/*.yaml carry: tests/cors.rs)."""
    docs = render(chart, None)
    (_, policy), = [cors_of(c) for c in envoy_configs(docs)]
    assert policy == engine_policy(daemon, docs, tmp_path)


def test_the_ietf_fields_are_exposed_when_sent(chart, daemon, tmp_path):
    """`rate_limit.ietf_headers: true` adds RateLimit and RateLimit-Policy to the answers, and so
    to the exposed headers, in both modes."""
    for mode in MODES:
        off = render(chart, {"mode": mode})
        on = render(chart, {"mode": mode, "gybcAuthz": {"config": {"rate_limit": {"ietf_headers": True}}}})
        exposed = lambda docs: cors_of(envoy_configs(docs)[0])[1]["expose_headers"].split(", ")
        assert "ratelimit" not in exposed(off)
        assert exposed(on) == engine_policy(daemon, on, tmp_path)["expose_headers"].split(", ")
        assert {"ratelimit", "ratelimit-policy"} <= set(exposed(on))


def test_the_filter_can_be_turned_off(chart):
    """envoy.cors.enabled: false, for a gateway in front that answers CORS itself: no filter and
    no policy, in both modes and for the key service too."""
    ks = {"keyService": {"enabled": True},
          "gybcAuthz": {"redis": {"urls": ["redis://redis:6379"]}, "config": {"key_store": {"type": "redis"}}}}
    for mode in MODES:
        docs = render(chart, merged(ks, mode=mode, envoy__cors={"enabled": False}))
        for env_cfg in envoy_configs(docs):
            filters, policy = cors_of(env_cfg)
            assert CORS_FILTER not in filters and policy is None
            assert "cors" not in yaml.safe_dump(env_cfg)


@pytest.mark.parametrize("bad, where", [
    ({"envoy": {"cors": {"allowOrigins": []}}}, "allowOrigins"),
    ({"envoy": {"cors": {"allowOrigins": [{"regex": ".*"}]}}}, "regex"),
    ({"envoy": {"cors": {"allowOrigins": [{"exact": "https://app.example.com/path"}]}}}, "exact"),
    ({"envoy": {"cors": {"allowOrigins": [{"exact": "https://a.example", "prefix": "https://"}]}}}, "allowOrigins"),
    ({"envoy": {"cors": {"maxAgeSeconds": -1}}}, "maxAgeSeconds"),
    ({"envoy": {"cors": {"maxAge": 60}}}, "maxAge"),
    ({"envoy": {"cors": {"enabled": "yes"}}}, "enabled"),
])
def test_the_schema_refuses_a_bad_cors_value(chart, helm, bad, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE)
