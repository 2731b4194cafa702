//! The KrakenD gateway's configuration (`deploy/krakend/krakend.json`, docs/krakend.md) carries
//! the contract from the client to the service's Envoy and back untouched. There is no KrakenD
//! binary on these machines, so its properties are checked on the shipped file itself, against
//! the engine's own names (`request.rs`, `trace_context.rs`, `browser.rs`, the config's identity
//! headers), the chart's values and the Envoy configs, never against a copy of them:
//!
//! - the file is exactly what `deploy/krakend/services.yaml` generates (`UPDATE_KRAKEND=1`
//!   rewrites it);
//! - every listed service, the key service and every tenantless path is routed, and nothing else;
//! - every endpoint is a no-op `POST` under `/api/v1/` to one no-op backend, on the same path;
//! - `input_headers` are exactly what the contract reads, and no identity header;
//! - CORS answers with the browser lists, and Envoy's CORS headers (and only those) are removed
//!   from the backend's answer, so a browser sees one `Access-Control-Allow-Origin`;
//! - the timeout is above Envoy's whole answer, and KrakenD's own rate limiting and auth are off;
//! - docs/krakend.md names every field the file sets.

// The generator lives beside this file (`tests/krakend/generate.rs`), not as a test of its own.
#[path = "krakend/generate.rs"]
mod generate;

use std::collections::BTreeSet;
use std::path::Path;

use gybc_authz_engine::browser::{allowed_request_headers, exposed_response_headers};
use gybc_authz_engine::config::Config;
use gybc_authz_engine::request::{AUTHORIZATION, ORIGIN, X_API_KEY, X_ON_BEHALF_OF};
use gybc_authz_engine::trace_context::{
    B3, TRACEPARENT, TRACESTATE, X_B3_FLAGS, X_B3_SAMPLED, X_B3_SPAN_ID, X_B3_TRACE_ID,
};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

const CONFIG: &str = "deploy/krakend/krakend.json";
const SERVICES: &str = "deploy/krakend/services.yaml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn shipped() -> Json {
    serde_json::from_str(&read(CONFIG)).unwrap_or_else(|e| panic!("{CONFIG}: {e}"))
}

fn endpoints(krakend: &Json) -> &Vec<Json> {
    krakend["endpoints"]
        .as_array()
        .expect("`endpoints` is a list")
}

/// The one backend of an endpoint (no-op allows no other number).
fn backend(endpoint: &Json) -> &Json {
    let backends = endpoint["backend"].as_array().expect("`backend` is a list");
    assert_eq!(backends.len(), 1, "{}: one backend", endpoint["endpoint"]);
    &backends[0]
}

/// A list of header names, lower case (KrakenD, browsers and the engine compare them so).
fn names(list: &Json) -> BTreeSet<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("{list} is a list"))
        .iter()
        .map(|n| n.as_str().expect("a header name").to_ascii_lowercase())
        .collect()
}

fn lower<'a>(list: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    list.into_iter().map(str::to_ascii_lowercase).collect()
}

/// `0.5s`, `30s`, `500ms`, `1h` in seconds: the forms KrakenD, Envoy and the chart use here.
fn secs(duration: &str) -> f64 {
    let (number, unit) = duration
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| duration.split_at(i))
        .unwrap_or_else(|| panic!("`{duration}` has no unit"));
    let n: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("`{duration}` is not a duration"));
    n * match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => panic!("`{duration}`: unknown unit"),
    }
}

#[test]
fn the_shipped_file_is_what_the_service_list_generates() {
    let fresh = generate::render(&read(SERVICES));
    if std::env::var_os("UPDATE_KRAKEND").is_some() {
        // Written aside and renamed, so the other tests never read half a file.
        let aside = root().join(format!("{CONFIG}.new"));
        std::fs::write(&aside, &fresh).expect("write the configuration");
        std::fs::rename(&aside, root().join(CONFIG)).expect("replace the configuration");
        return;
    }
    let committed = read(CONFIG);
    if committed != fresh {
        let line = committed
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(fresh.lines().count()));
        panic!(
            "{CONFIG} is not what {SERVICES} generates (first difference at line {}): run \
             `UPDATE_KRAKEND=1 cargo test --test krakend` and commit the file",
            line + 1
        );
    }
}

#[test]
#[should_panic(expected = "service `Gateway`: not a lower-case path segment")]
fn a_bad_line_in_the_service_list_fails_the_generation() {
    generate::render(
        "services:\n  - { domain: llm, service: Gateway, envoy: \"http://llm.example\" }\n",
    );
}

#[test]
fn the_file_is_format_3_pinned_to_a_krakend_2_release() {
    let krakend = shipped();
    assert_eq!(
        krakend["version"], 3,
        "configuration format 3 (KrakenD 2.x)"
    );
    // A versioned schema: the unversioned one follows KrakenD's latest, another format.
    let schema = krakend["$schema"].as_str().expect("`$schema` is set");
    let release = schema
        .strip_prefix("https://www.krakend.io/schema/v2.")
        .and_then(|rest| rest.strip_suffix("/krakend.json"))
        .unwrap_or_else(|| panic!("`$schema` {schema} names no KrakenD 2.x release"));
    assert!(release.parse::<u32>().is_ok(), "`$schema` {schema}");
    assert!(
        read("docs/krakend.md").contains(&format!("KrakenD Community Edition 2.{release}")),
        "docs/krakend.md says which KrakenD release the file targets (2.{release})"
    );
}

#[test]
fn every_listed_service_the_key_service_and_each_tenantless_path_are_routed() {
    let krakend = shipped();
    let services: Yaml = serde_yaml_ng::from_str(&read(SERVICES)).expect("services.yaml parses");
    let services = services["services"].as_sequence().expect("a service list");
    let routed: Vec<&str> = endpoints(&krakend)
        .iter()
        .map(|e| e["endpoint"].as_str().expect("an endpoint path"))
        .collect();
    assert_eq!(
        routed.len(),
        services.len(),
        "one endpoint per listed service, nothing else: {routed:?}"
    );

    for s in services {
        let domain = s["domain"].as_str().expect("a domain");
        let prefix = match s.get("service").and_then(Yaml::as_str) {
            Some(service) => format!("/api/v1/{domain}/{service}"),
            None => format!("/api/v1/{domain}"),
        };
        let path = format!("{prefix}/{{method}}");
        let endpoint = endpoints(&krakend)
            .iter()
            .find(|e| e["endpoint"] == path.as_str())
            .unwrap_or_else(|| panic!("{path} is not routed"));
        let b = backend(endpoint);
        assert_eq!(
            b["host"],
            serde_json::json!([s["envoy"].as_str()]),
            "{path}"
        );
        assert_eq!(
            b["url_pattern"],
            path.as_str(),
            "{path}: the path goes through unchanged"
        );
    }

    // The key service, where the chart serves it.
    let values: Yaml =
        serde_yaml_ng::from_str(&read("helm/gybc-authz/values.yaml")).expect("values parse");
    let keys = format!(
        "{}/{{method}}",
        values["keyService"]["pathPrefix"]
            .as_str()
            .expect("keyService.pathPrefix")
    );
    assert!(
        routed.contains(&keys.as_str()),
        "the key service ({keys}) is routed"
    );

    // Each tenantless path (creating the first organisation) reaches its service.
    let matches = |pattern: &str, path: &str| {
        let (prefix, rest) = pattern.split_once("{method}").expect("a {method} pattern");
        rest.is_empty()
            && path
                .strip_prefix(prefix)
                .is_some_and(|m| !m.is_empty() && !m.contains('/'))
    };
    for path in &Config::default().policy.tenantless_paths {
        assert!(
            routed.iter().any(|p| matches(p, path)),
            "the tenantless path {path} is not routed"
        );
    }
}

#[test]
fn every_endpoint_is_a_no_op_post_under_api_v1_on_the_same_path() {
    let krakend = shipped();
    for e in endpoints(&krakend) {
        let path = e["endpoint"].as_str().expect("an endpoint path");
        assert!(path.starts_with("/api/v1/"), "{path}: outside /api/v1/");
        assert_eq!(e["method"], "POST", "{path}");
        assert_eq!(
            e["output_encoding"], "no-op",
            "{path}: status, body and headers as sent"
        );
        assert!(
            e.get("input_query_strings").is_none(),
            "{path}: no query string is part of the contract"
        );
        let b = backend(e);
        assert_eq!(b["method"], "POST", "{path}");
        assert_eq!(
            b["encoding"], "no-op",
            "{path}: the backend's answer is not parsed"
        );
        assert_eq!(
            b["url_pattern"], path,
            "{path}: the path goes through unchanged"
        );
    }
}

#[test]
fn input_headers_are_what_the_contract_reads_and_never_an_identity_header() {
    let config = Config::default();
    // The credential headers the engine reads, Origin (a publishable key's allowlist), the trace
    // context, and what a JSON call carries besides (Content-Type, Idempotency-Key).
    let credentials = lower([AUTHORIZATION, X_API_KEY, X_ON_BEHALF_OF, ORIGIN]);
    let trace = lower([
        TRACEPARENT,
        TRACESTATE,
        B3,
        X_B3_TRACE_ID,
        X_B3_SPAN_ID,
        X_B3_SAMPLED,
        X_B3_FLAGS,
    ]);
    let mut contract = credentials.clone();
    contract.extend(trace);
    contract.extend(lower(allowed_request_headers(&config)));
    let identity = lower(config.headers.all());

    let krakend = shipped();
    for e in endpoints(&krakend) {
        let path = &e["endpoint"];
        let inputs = names(&e["input_headers"]);
        assert!(
            credentials.is_subset(&inputs),
            "{path}: every credential header is forwarded: {inputs:?}"
        );
        assert!(
            inputs.is_disjoint(&identity),
            "{path}: an identity header the authorizer sets is forwarded: {inputs:?}"
        );
        assert_eq!(inputs, contract, "{path}: exactly what the contract reads");
    }
}

#[test]
fn cors_answers_with_the_browser_lists() {
    let krakend = shipped();
    let cors = &krakend["extra_config"]["security/cors"];
    assert_eq!(
        cors["allow_origins"],
        serde_json::json!(["*"]),
        "any origin: the key's allowlist is the rule"
    );
    assert_eq!(cors["allow_methods"], serde_json::json!(["POST"]));
    assert_eq!(
        names(&cors["allow_headers"]),
        lower(allowed_request_headers(&Config::default())),
        "a preflight allows what browser.rs lists"
    );
    // One gateway fronts every Envoy: it exposes each header any config's answers write.
    let exposed = names(&cors["expose_headers"]);
    assert_eq!(
        exposed,
        lower(exposed_response_headers(
            &generate::config_with_every_client_header()
        )),
        "a page reads what browser.rs lists"
    );
    assert!(exposed.is_superset(&lower(exposed_response_headers(&Config::default()))));
    assert_eq!(
        cors["allow_credentials"], false,
        "no cookies: credentials are headers"
    );
}

#[test]
fn envoys_cors_headers_and_only_those_are_removed_from_the_backends_answer() {
    // What KrakenD's CORS middleware (rs/cors) writes on an actual answer before the no-op
    // proxy appends the backend's headers: a second copy from Envoy would be appended to them.
    let written_by_krakend = lower([
        "Access-Control-Allow-Origin",
        "Access-Control-Expose-Headers",
        "Access-Control-Allow-Credentials",
    ]);
    let contract = lower(exposed_response_headers(
        &generate::config_with_every_client_header(),
    ));
    let krakend = shipped();
    for e in endpoints(&krakend) {
        let path = &e["endpoint"];
        let group = &backend(e)["extra_config"]["modifier/martian"]["fifo.Group"];
        assert!(
            names(&group["scope"]).contains("response"),
            "{path}: the group acts on the response"
        );
        let modifiers = group["modifiers"].as_array().expect("a modifier list");
        let removed: BTreeSet<String> = modifiers
            .iter()
            .filter_map(|m| m.get("header.Blacklist"))
            .inspect(|b| assert_eq!(b["scope"], serde_json::json!(["response"]), "{path}"))
            .flat_map(|b| names(&b["names"]))
            .collect();
        assert!(
            written_by_krakend.is_subset(&removed),
            "{path}: Envoy's copies of {written_by_krakend:?} stay: {removed:?}"
        );
        for name in &removed {
            assert!(
                name.starts_with("access-control-") && !contract.contains(name),
                "{path}: `{name}` is removed from the answer, but it is not a CORS header"
            );
        }
    }
}

/// Every `timeout` under a key named `parent`, anywhere in an Envoy config.
fn timeouts_under(yaml: &Yaml, parent: &str, out: &mut Vec<f64>) {
    match yaml {
        Yaml::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some(parent)
                    && let Some(t) = v.get("timeout").and_then(Yaml::as_str)
                {
                    out.push(secs(t));
                }
                timeouts_under(v, parent, out);
            }
        }
        Yaml::Sequence(s) => s.iter().for_each(|v| timeouts_under(v, parent, out)),
        _ => {}
    }
}

fn max(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, f64::max)
}

#[test]
fn the_timeout_is_above_envoys_whole_answer() {
    let krakend = shipped();
    let timeout = secs(krakend["timeout"].as_str().expect("a global timeout"));
    for e in endpoints(&krakend) {
        assert!(
            e.get("timeout").is_none(),
            "{}: the global timeout applies",
            e["endpoint"]
        );
    }

    // The chart's Envoys: the check's deadline, then the route's.
    let values: Yaml =
        serde_yaml_ng::from_str(&read("helm/gybc-authz/values.yaml")).expect("values parse");
    let chart = |v: &Yaml| secs(v.as_str().expect("a duration"));
    let check = chart(&values["envoy"]["authzTimeout"]);
    let route =
        chart(&values["envoy"]["routeTimeout"]).max(chart(&values["keyService"]["routeTimeout"]));
    assert!(
        timeout > check + route,
        "KrakenD's {timeout}s must exceed the chart's Envoy answer ({check}s + {route}s)"
    );

    // The Envoy configs shipped in deploy/envoy/.
    for file in std::fs::read_dir(root().join("deploy/envoy")).expect("deploy/envoy") {
        let path = file.expect("a file").path();
        let yaml: Yaml = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (mut checks, mut routes) = (Vec::new(), Vec::new());
        timeouts_under(&yaml, "grpc_service", &mut checks);
        timeouts_under(&yaml, "route", &mut routes);
        assert!(!routes.is_empty(), "{}: routes found", path.display());
        let (check, route) = (max(checks), max(routes));
        assert!(
            timeout > check + route,
            "KrakenD's {timeout}s must exceed {}'s answer ({check}s + {route}s)",
            path.display()
        );
    }
}

/// Every key of every object in the file.
fn keys(json: &Json, out: &mut BTreeSet<String>) {
    match json {
        Json::Object(m) => {
            for (k, v) in m {
                out.insert(k.clone());
                keys(v, out);
            }
        }
        Json::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

#[test]
fn krakend_adds_nothing_but_cors_router_flags_and_the_header_removal() {
    let krakend = shipped();
    let namespaces = |extra: &Json| -> BTreeSet<String> {
        extra
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    // No `qos/ratelimit/*` (the authorizer limits per key, fleet-wide) and no `auth/*` (it
    // authenticates): a namespace added here needs its reason in docs/krakend.md first.
    assert_eq!(
        namespaces(&krakend["extra_config"]),
        BTreeSet::from(["security/cors".to_owned(), "router".to_owned()])
    );
    for e in endpoints(&krakend) {
        assert!(e.get("extra_config").is_none(), "{}", e["endpoint"]);
        assert_eq!(
            namespaces(&backend(e)["extra_config"]),
            BTreeSet::from(["modifier/martian".to_owned()]),
            "{}",
            e["endpoint"]
        );
    }
}

#[test]
fn docs_name_every_field_the_file_sets() {
    let docs = read("docs/krakend.md");
    let mut fields = BTreeSet::new();
    keys(&shipped(), &mut fields);
    let missing: Vec<_> = fields
        .iter()
        .filter(|k| !k.starts_with('@') && !docs.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/krakend.md does not explain {missing:?}"
    );
}
