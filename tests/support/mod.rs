//! Shared scaffolding for the integration tests: a local key endpoint (JWKS or Google's X.509
//! map), RSA signing keys, a key file, and the real daemon started on ephemeral loopback ports.
#![allow(dead_code)]

pub mod browser;
pub mod envoy;
pub mod key_service;
pub mod otlp;
pub mod redis;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use gybc_authz::app::{self, Options, Running};
use gybc_authz::cli::check::check_request;
use gybc_authz::dev::{SigningKey, firebase_claims};
use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use gybc_authz_engine::clock::{Clock, ManualClock};
use gybc_authz_engine::config::Config;
use gybc_authz_engine::store::KeyStore;
use serde_json::Value;
use tonic::transport::Channel;

pub const PROJECT: &str = "gybc-test";
pub const APP_PROJECT: &str = "gybc-endusers";
pub const TENANT: &str = "t1";
pub const OTHER_TENANT: &str = "t2";
pub const API_PATH: &str = "/api/v1/llm/gateway/list-threads";
pub const ORG_CREATE: &str = "/api/v1/orgs/create";
pub const APP_ORIGIN: &str = "https://app.example.com";
pub const IP_TENANT: &str = "ip-tenant-a";
/// The identity headers with their default names.
pub const IDENTITY_HEADERS: [&str; 6] = [
    "x-tenant-id",
    "x-user-id",
    "x-auth-method",
    "x-api-key-id",
    "x-scopes",
    "x-impersonated-by",
];

// === key endpoint ===

/// A key endpoint on 127.0.0.1:0 that counts fetches and can be told to fail or serve new keys.
pub struct KeyServer {
    pub addr: SocketAddr,
    state: Arc<KeyServerState>,
    task: tokio::task::JoinHandle<()>,
}

struct KeyServerState {
    body: Mutex<String>,
    max_age: Mutex<Option<u64>>,
    fetches: AtomicUsize,
    failing: AtomicBool,
    delay_ms: std::sync::atomic::AtomicU64,
}

impl KeyServer {
    pub async fn start(body: String) -> Self {
        let state = Arc::new(KeyServerState {
            body: Mutex::new(body),
            max_age: Mutex::new(Some(3600)),
            fetches: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            delay_ms: Default::default(),
        });
        let app = Router::new()
            .route("/keys", get(serve_keys))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/keys", self.addr)
    }

    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    pub fn set_body(&self, body: String) {
        *self.state.body.lock().unwrap() = body;
    }

    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_max_age(&self, secs: Option<u64>) {
        *self.state.max_age.lock().unwrap() = secs;
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_keys(State(s): State<Arc<KeyServerState>>) -> axum::response::Response {
    s.fetches.fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if s.failing.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response();
    }
    let cache = match *s.max_age.lock().unwrap() {
        Some(a) => format!("public, max-age={a}, must-revalidate, no-transform"),
        None => "no-cache".into(),
    };
    let body = s.body.lock().unwrap().clone();
    (
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::CACHE_CONTROL, cache),
        ],
        body,
    )
        .into_response()
}

// === keys and tokens ===

/// One RSA signing key per process and name: generation is the slow part of a test's set-up.
pub fn signing_key(kid: &str) -> Arc<SigningKey> {
    static KEYS: Mutex<BTreeMap<String, Arc<SigningKey>>> = Mutex::new(BTreeMap::new());
    KEYS.lock()
        .unwrap()
        .entry(kid.to_owned())
        .or_insert_with(|| Arc::new(SigningKey::generate(kid).unwrap()))
        .clone()
}

/// API keys written to the test key file; generated fresh for each environment.
#[derive(Clone)]
pub struct TestKeys {
    /// `sk_`, tenant t1, scope `threads:read`, 5/60s.
    pub secret: String,
    /// `sk_` with `users:impersonate`, tenant t1.
    pub impersonator: String,
    /// `sk_` with limit 2/60s.
    pub limited: String,
    pub revoked: String,
    pub expired: String,
    /// Well-formed but in no store.
    pub unknown: String,
    /// `pk_`, tenant t1, provider `endusers`, origin allowlist.
    pub publishable: String,
    /// `pk_`, tenant t1, provider `endusers`, Identity Platform tenant `ip-tenant-a`.
    pub publishable_ip: String,
}

impl TestKeys {
    pub fn generate() -> Self {
        let s = || ApiKey::generate(KeyKind::Secret);
        let p = || ApiKey::generate(KeyKind::Publishable);
        Self {
            secret: s(),
            impersonator: s(),
            limited: s(),
            revoked: s(),
            expired: s(),
            unknown: s(),
            publishable: p(),
            publishable_ip: p(),
        }
    }

    /// The records of the key file, as a key service would store them.
    pub fn records(&self) -> Vec<gybc_authz_engine::store::KeyRecord> {
        let file: gybc_authz_engine::store::KeyFile =
            serde_yaml_ng::from_str(&self.file()).unwrap();
        gybc_authz_engine::store::parse_entries(&file.keys).unwrap()
    }

    fn file(&self) -> String {
        let h = |k: &str| format!("sha256:{}", KeyHash::of(k).to_hex());
        format!(
            r#"keys:
  - {{ id: key_secret, hash: "{}", kind: secret, tenant: {TENANT}, scopes: [threads:read], rate_limit: 5/60s, name: backend }}
  - {{ id: key_impersonator, hash: "{}", kind: secret, tenant: {TENANT}, scopes: [threads:read, users:impersonate] }}
  - {{ id: key_limited, hash: "{}", kind: secret, tenant: {TENANT}, rate_limit: 2/60s }}
  - {{ id: key_revoked, hash: "{}", kind: secret, tenant: {TENANT}, status: revoked }}
  - {{ id: key_expired, hash: "{}", kind: secret, tenant: {TENANT}, expires_at: "2020-01-01T00:00:00Z" }}
  - {{ id: key_app, hash: "{}", kind: publishable, tenant: {TENANT}, jwt_provider: endusers, allowed_origins: ["{APP_ORIGIN}"], rate_limit: 3/60s }}
  - {{ id: key_app_ip, hash: "{}", kind: publishable, tenant: {TENANT}, jwt_provider: endusers, identity_platform_tenant: {IP_TENANT} }}
"#,
            h(&self.secret),
            h(&self.impersonator),
            h(&self.limited),
            h(&self.revoked),
            h(&self.expired),
            h(&self.publishable),
            h(&self.publishable_ip),
        )
    }
}

// === the daemon ===

/// Everything a decision test needs, torn down on drop.
pub struct TestEnv {
    pub dashboard_keys: KeyServer,
    pub app_keys: KeyServer,
    pub keys: TestKeys,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    pub daemon: Option<Running>,
    pub client: AuthorizationClient<Channel>,
    pub key_file: PathBuf,
    /// The daemon's config as written, for a second host of the same engine (Envoy's module).
    pub config_yaml: String,
}

/// Extra YAML for the test config (appended), and a store override.
#[derive(Default)]
pub struct EnvOptions {
    pub extra_yaml: String,
    /// Replaces the default `key_store:` line (a file store over the test keys).
    pub key_store_yaml: Option<String>,
    /// The keys to use (replicas of one fleet share them); fresh ones by default.
    pub keys: Option<TestKeys>,
    /// Replaces the default `log:` line (allows logged at info).
    pub log_yaml: Option<String>,
    /// `server.http_authz` (the HTTP authorization mode), as a YAML flow mapping.
    pub http_authz_yaml: Option<String>,
    pub store: Option<Arc<dyn KeyStore>>,
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::start_with(EnvOptions::default()).await
    }

    pub async fn start_with(opts: EnvOptions) -> Self {
        let dashboard = signing_key("dashboard-1");
        let app = signing_key("app-1");
        let dashboard_keys = KeyServer::start(SigningKey::jwks(&[&dashboard])).await;
        let app_keys = KeyServer::start(SigningKey::jwks(&[&app])).await;
        let keys = opts.keys.clone().unwrap_or_else(TestKeys::generate);
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("keys.yaml");
        std::fs::write(&key_file, keys.file()).unwrap();
        let yaml = format!(
            r#"server: {{ grpc_addr: "127.0.0.1:0", http_addr: "127.0.0.1:0", shutdown_grace_secs: 2{} }}
jwt:
  unknown_kid_refetch_interval_ms: 300
  providers:
    - {{ name: dashboard, project_id: {PROJECT}, keys: {{ type: url, url: "{}" }} }}
    - {{ name: endusers, project_id: {APP_PROJECT}, keys: {{ type: url, url: "{}" }} }}
{}
{}
{}"#,
            opts.http_authz_yaml
                .as_ref()
                .map(|h| format!(", http_authz: {h}"))
                .unwrap_or_default(),
            dashboard_keys.url(),
            app_keys.url(),
            opts.key_store_yaml.clone().unwrap_or_else(|| format!(
                "key_store: {{ type: file, path: \"{}\", reload_interval_ms: 50 }}",
                key_file.display()
            )),
            opts.log_yaml
                .clone()
                .unwrap_or_else(|| "log: { allow_level: info }".into()),
            opts.extra_yaml,
        );
        let cfg = Config::from_yaml(&yaml, &BTreeMap::new()).expect("test config is valid");
        let clock = Arc::new(ManualClock::now());
        let daemon = app::start(
            cfg,
            Options {
                clock: clock.clone(),
                // A test's store stands in for a remote one: behind the key cache, as Redis is.
                store: opts.store.map(gybc_authz_engine::KeySource::Remote),
                dev_jwks: None,
            },
        )
        .await
        .expect("daemon starts");
        assert!(
            daemon.wait_ready(Duration::from_secs(10)).await,
            "daemon became ready"
        );
        let client = AuthorizationClient::connect(format!("http://{}", daemon.grpc_addr))
            .await
            .unwrap();
        Self {
            dashboard_keys,
            app_keys,
            keys,
            clock,
            dir,
            daemon: Some(daemon),
            client,
            key_file,
            config_yaml: yaml,
        }
    }

    pub fn now(&self) -> u64 {
        self.clock.now_secs()
    }

    /// A dashboard user's token (provider `dashboard`), valid for an hour.
    pub fn user_token(&self, sub: &str, tenant: Option<&str>) -> String {
        signing_key("dashboard-1").sign(&firebase_claims(PROJECT, sub, tenant, self.now(), 3600))
    }

    /// An end user's token for publishable keys (provider `endusers`).
    pub fn app_user_token(&self, sub: &str, tenant: Option<&str>) -> String {
        signing_key("app-1").sign(&firebase_claims(APP_PROJECT, sub, tenant, self.now(), 3600))
    }

    /// Dashboard-project claims to tamper with before signing.
    pub fn claims(&self, sub: &str, tenant: Option<&str>) -> Value {
        firebase_claims(PROJECT, sub, tenant, self.now(), 3600)
    }

    pub fn sign(&self, claims: &Value) -> String {
        signing_key("dashboard-1").sign(claims)
    }

    pub async fn check(&self, path: &str, headers: &[(&str, &str)]) -> CheckResponse {
        let h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.check_raw(check_request("POST", path, "api.example.com", &h))
            .await
    }

    pub async fn check_raw(&self, req: CheckRequest) -> CheckResponse {
        self.client
            .clone()
            .check(req)
            .await
            .expect("Check succeeds as an RPC")
            .into_inner()
    }

    pub async fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
    }
}

// === reading answers ===

fn headers(h: &[HeaderValueOption]) -> BTreeMap<String, String> {
    h.iter()
        .map(|o| {
            let hv = o.header.as_ref().unwrap();
            (hv.key.clone(), hv.value.clone())
        })
        .collect()
}

#[derive(Debug)]
pub struct Allowed {
    pub upstream: BTreeMap<String, String>,
    pub removed: Vec<String>,
    pub to_client: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct Denied {
    pub status: i32,
    pub grpc_code: i32,
    pub reason: String,
    pub code: String,
    pub message: String,
    pub headers: BTreeMap<String, String>,
}

#[track_caller]
pub fn allowed(resp: &CheckResponse) -> Allowed {
    assert_eq!(
        resp.status.as_ref().map(|s| s.code),
        Some(0),
        "expected an allow: {resp:?}"
    );
    match &resp.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            for h in ok.headers.iter().chain(&ok.response_headers_to_add) {
                assert_eq!(h.append_action, 2, "OVERWRITE_IF_EXISTS_OR_ADD on {h:?}");
            }
            Allowed {
                upstream: headers(&ok.headers),
                removed: ok.headers_to_remove.clone(),
                to_client: headers(&ok.response_headers_to_add),
            }
        }
        other => panic!("expected an OkResponse, got {other:?}"),
    }
}

#[track_caller]
pub fn denied(resp: &CheckResponse) -> Denied {
    let grpc_code = resp.status.as_ref().map_or(0, |s| s.code);
    assert_ne!(
        grpc_code, 0,
        "a denial must carry a non-zero gRPC code: {resp:?}"
    );
    match &resp.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            let body: Value = serde_json::from_str(&d.body).expect("denial body is JSON");
            let h = headers(&d.headers);
            assert_eq!(
                h.get("content-type").map(String::as_str),
                Some("application/json")
            );
            Denied {
                status: d.status.as_ref().map_or(0, |s| s.code),
                grpc_code,
                reason: body["reason"].as_str().unwrap().to_owned(),
                code: body["code"].as_str().unwrap().to_owned(),
                message: body["message"].as_str().unwrap().to_owned(),
                headers: h,
            }
        }
        other => panic!("expected a DeniedResponse, got {other:?}"),
    }
}

/// Asserts a denial's status, reason and body code, and returns it for further checks.
#[track_caller]
pub fn assert_denied(resp: &CheckResponse, status: i32, reason: &str) -> Denied {
    let d = denied(resp);
    assert_eq!((d.status, d.reason.as_str()), (status, reason), "{d:?}");
    let code = match status {
        400 => "invalid_argument",
        401 => "unauthenticated",
        403 => "permission_denied",
        429 => "resource_exhausted",
        503 => "unavailable",
        s => panic!("unexpected status {s}"),
    };
    assert_eq!(d.code, code);
    d
}

/// The set of identity headers an allow must strip because it does not set them, plus the
/// credentials that never go upstream.
pub fn expected_removed(upstream: &BTreeMap<String, String>) -> Vec<String> {
    let mut v: Vec<String> = IDENTITY_HEADERS
        .iter()
        .filter(|h| !upstream.contains_key(**h))
        .map(|h| h.to_string())
        .collect();
    v.push("x-api-key".into());
    v.push("x-on-behalf-of".into());
    v
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// === metrics ===

/// The daemon's `/metrics` text.
pub async fn scrape(env: &TestEnv) -> Metrics {
    let addr = env.daemon.as_ref().expect("running daemon").http_addr;
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    Metrics(text)
}

/// A scraped `/metrics` page.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the series `name` whose labels include all of `labels` (0 when absent).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name
                || !labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            {
                continue;
            }
            assert!(
                found.is_none(),
                "{name} {labels:?} matches more than one series"
            );
            found = Some(value.parse::<f64>().unwrap());
        }
        found.unwrap_or(0.0)
    }

    /// Every label value on the page.
    pub fn label_values(&self) -> Vec<String> {
        let mut out = Vec::new();
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((_, rest)) = line.split_once('{') else {
                continue;
            };
            let labels = rest.rsplit_once('}').map_or("", |(l, _)| l);
            for pair in labels.split("\",") {
                if let Some((_, v)) = pair.split_once("=\"") {
                    out.push(v.trim_end_matches('"').to_owned());
                }
            }
        }
        out
    }

    /// Names of every metric family on the page.
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}

// === shared test doubles and waits ===

/// A key store that cannot be reached (for the 503 `unavailable` paths).
pub struct UnreachableStore;

impl gybc_authz_engine::store::KeyStore for UnreachableStore {
    fn lookup<'a>(
        &'a self,
        _: &'a KeyHash,
    ) -> futures_util::future::BoxFuture<
        'a,
        Result<Option<Arc<gybc_authz_engine::store::Key>>, gybc_authz_engine::store::StoreError>,
    > {
        Box::pin(async {
            Err(gybc_authz_engine::store::StoreError::Unavailable(
                "connection refused".into(),
            ))
        })
    }
}

/// Polls `f` until it holds, failing the test after `within`.
pub async fn wait_until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
