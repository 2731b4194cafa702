//! The generator of the KrakenD gateway's configuration: `deploy/krakend/services.yaml` (one line
//! per service) and the engine's own header names in, `deploy/krakend/krakend.json` out.
//! `tests/krakend.rs` compares the committed file with [`render`]'s output, and rewrites it when
//! run with `UPDATE_KRAKEND=1`. docs/krakend.md says why each setting is there.

use gybc_authz_engine::browser::{allowed_request_headers, exposed_response_headers};
use gybc_authz_engine::config::Config;
use gybc_authz_engine::request::{READ_HEADERS, X_REQUEST_ID};
use serde::{Deserialize, Serialize};

/// The KrakenD release this configuration is written for: Community Edition 2.13, whose
/// configuration format is 3.
const SCHEMA: &str = "https://www.krakend.io/schema/v2.13/krakend.json";
/// Above Envoy's whole answer (the check's `authzTimeout`, 0.5 s, plus the longest route
/// timeout, 30 s): the client gets Envoy's and the authorizer's statuses, never KrakenD's own
/// 500 for a request that was still being answered. `tests/krakend.rs` checks it against the
/// chart and the Envoy configs.
const TIMEOUT: &str = "35s";
/// How long a browser may reuse a preflight's answer (Chromium caps it at 2 h).
const CORS_MAX_AGE: &str = "1h";
/// The CORS response headers Envoy's CORS filter may write. KrakenD's CORS middleware writes its
/// own before the no-op proxy appends the backend's headers, so Envoy's copies are removed from
/// the backend's response: a browser refuses an answer with two `Access-Control-Allow-Origin`.
const ENVOY_CORS_HEADERS: [&str; 7] = [
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Max-Age",
    "Access-Control-Allow-Private-Network",
];

// === the service list ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceList {
    services: Vec<Service>,
}

/// One line of `deploy/krakend/services.yaml`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    domain: String,
    #[serde(default)]
    service: Option<String>,
    envoy: String,
}

impl Service {
    /// `/api/v1/<domain>[/<service>]/{method}`: the gateway's path and the backend's, the same.
    fn path(&self) -> String {
        match &self.service {
            Some(s) => format!("/api/v1/{}/{s}/{{method}}", self.domain),
            None => format!("/api/v1/{}/{{method}}", self.domain),
        }
    }

    /// Every problem of the line, so a typo fails the generation instead of shipping a route.
    fn check(&self) -> Vec<String> {
        let segment = |s: &str| {
            !s.is_empty()
                && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let mut problems = Vec::new();
        if !segment(&self.domain) {
            problems.push(format!(
                "domain `{}`: not a lower-case path segment",
                self.domain
            ));
        }
        if let Some(s) = &self.service
            && !segment(s)
        {
            problems.push(format!("service `{s}`: not a lower-case path segment"));
        }
        let host = self
            .envoy
            .strip_prefix("http://")
            .or_else(|| self.envoy.strip_prefix("https://"));
        if !host.is_some_and(|h| !h.is_empty() && !h.contains('/')) {
            problems.push(format!(
                "envoy `{}`: must be http(s)://host[:port], without a path",
                self.envoy
            ));
        }
        problems
    }
}

// === the configuration, in KrakenD's field names (https://www.krakend.io/docs/) ===

#[derive(Serialize)]
struct Krakend {
    #[serde(rename = "$schema")]
    schema: &'static str,
    /// Keys starting with `@` are comments to KrakenD and its linter.
    #[serde(rename = "@comment")]
    comment: &'static str,
    version: u8,
    name: &'static str,
    port: u16,
    timeout: &'static str,
    extra_config: ServiceExtra,
    endpoints: Vec<Endpoint>,
}

#[derive(Serialize)]
struct ServiceExtra {
    #[serde(rename = "security/cors")]
    cors: Cors,
    router: Router,
}

#[derive(Serialize)]
struct Cors {
    allow_origins: Vec<&'static str>,
    allow_methods: Vec<&'static str>,
    allow_headers: Vec<String>,
    expose_headers: Vec<String>,
    allow_credentials: bool,
    max_age: &'static str,
}

#[derive(Serialize)]
struct Router {
    disable_redirect_trailing_slash: bool,
    disable_redirect_fixed_path: bool,
}

#[derive(Serialize)]
struct Endpoint {
    endpoint: String,
    method: &'static str,
    output_encoding: &'static str,
    input_headers: Vec<String>,
    backend: Vec<Backend>,
}

#[derive(Serialize)]
struct Backend {
    host: Vec<String>,
    url_pattern: String,
    method: &'static str,
    encoding: &'static str,
    extra_config: BackendExtra,
}

#[derive(Serialize)]
struct BackendExtra {
    #[serde(rename = "modifier/martian")]
    martian: Martian,
}

/// A martian `fifo.Group` holding one `header.Blacklist` on the response: KrakenD's own
/// documented shape (a group in both scopes around a modifier in one), so the executor has a
/// request and a response modifier to call whatever its version.
#[derive(Serialize)]
struct Martian {
    #[serde(rename = "fifo.Group")]
    group: FifoGroup,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FifoGroup {
    scope: [&'static str; 2],
    aggregate_errors: bool,
    modifiers: [Blacklist; 1],
}

#[derive(Serialize)]
struct Blacklist {
    #[serde(rename = "header.Blacklist")]
    blacklist: BlacklistNames,
}

#[derive(Serialize)]
struct BlacklistNames {
    scope: [&'static str; 1],
    names: Vec<&'static str>,
}

/// `x-b3-traceid` → `X-B3-Traceid`: Go's canonical form, the key under which KrakenD looks a
/// header up and forwards it.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The config whose answers carry every optional client header (the IETF rate-limit fields): one
/// gateway fronts every service's Envoy, whatever each one's config.
pub fn config_with_every_client_header() -> Config {
    let mut config = Config::default();
    config.rate_limit.ietf_headers = true;
    config
}

/// What the contract reads from a client: every header the engine reads except `x-request-id`
/// (Envoy makes one per request), then what a JSON call carries besides (its body's type, the
/// key service's retry key), in the engine's order.
fn input_headers(config: &Config) -> Vec<String> {
    let mut names: Vec<&str> = READ_HEADERS
        .iter()
        .copied()
        .filter(|h| *h != X_REQUEST_ID)
        .collect();
    for h in allowed_request_headers(config) {
        if !names.contains(&h) {
            names.push(h);
        }
    }
    names.into_iter().map(canonical).collect()
}

/// The configuration `services_yaml` generates, as the text committed in
/// `deploy/krakend/krakend.json`.
pub fn render(services_yaml: &str) -> String {
    let list: ServiceList = serde_yaml_ng::from_str(services_yaml)
        .unwrap_or_else(|e| panic!("deploy/krakend/services.yaml: {e}"));
    let mut problems: Vec<String> = list.services.iter().flat_map(Service::check).collect();
    let mut paths: Vec<String> = list.services.iter().map(Service::path).collect();
    paths.sort();
    paths.dedup();
    if paths.len() != list.services.len() {
        problems.push("two lines name the same domain and service".into());
    }
    assert!(
        problems.is_empty(),
        "deploy/krakend/services.yaml: {problems:?}"
    );

    let config = config_with_every_client_header();
    let inputs = input_headers(&config);
    let endpoints = list
        .services
        .iter()
        .map(|s| Endpoint {
            endpoint: s.path(),
            method: "POST",
            output_encoding: "no-op",
            input_headers: inputs.clone(),
            backend: vec![Backend {
                host: vec![s.envoy.clone()],
                url_pattern: s.path(),
                method: "POST",
                encoding: "no-op",
                extra_config: BackendExtra {
                    martian: Martian {
                        group: FifoGroup {
                            scope: ["request", "response"],
                            aggregate_errors: true,
                            modifiers: [Blacklist {
                                blacklist: BlacklistNames {
                                    scope: ["response"],
                                    names: ENVOY_CORS_HEADERS.to_vec(),
                                },
                            }],
                        },
                    },
                },
            }],
        })
        .collect();
    let krakend = Krakend {
        schema: SCHEMA,
        comment: "Generated from deploy/krakend/services.yaml by tests/krakend/generate.rs \
                  (UPDATE_KRAKEND=1 cargo test --test krakend): do not edit. \
                  Every setting is explained in docs/krakend.md.",
        version: 3,
        name: "GYBC API gateway",
        port: 8080,
        timeout: TIMEOUT,
        extra_config: ServiceExtra {
            cors: Cors {
                allow_origins: vec!["*"],
                allow_methods: vec!["POST"],
                allow_headers: allowed_request_headers(&config)
                    .into_iter()
                    .map(canonical)
                    .collect(),
                expose_headers: exposed_response_headers(&config)
                    .into_iter()
                    .map(canonical)
                    .collect(),
                allow_credentials: false,
                max_age: CORS_MAX_AGE,
            },
            router: Router {
                disable_redirect_trailing_slash: true,
                disable_redirect_fixed_path: true,
            },
        },
        endpoints,
    };
    serde_json::to_string_pretty(&krakend).expect("the configuration serializes") + "\n"
}
