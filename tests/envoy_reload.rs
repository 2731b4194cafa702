//! Config reload in module mode, through the real Envoy 1.40 with the module loaded and its
//! listener delivered by file-based LDS (`path_config_source` + `watched_directory`), two workers
//! and a one-second drain, as an xDS control plane would push listener updates.
//!
//! Under steady load (an allowed `sk_` key, unknown keys, fresh JWTs) the listener is rewritten
//! over and over, alternating (a) a change elsewhere in the listener with the same gybc-authz
//! config and (b) a real config change. Nothing may answer 503 or anything else unexpected, a key
//! held at its limit stays at 429, the last config is the one in force, Envoy's memory and
//! threads stay flat, and the old engines stop once their listeners have drained. A changed
//! config that cannot load in time is refused by Envoy, which keeps serving the old one.

mod support;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gybc_authz_engine::authn::apikey::{ApiKey, KeyKind};
use gybc_authz_engine::clock::Clock;
use serde_yaml_ng::Value;
use support::envoy::*;
use support::*;

/// Two workers, so a reload meets more than one thread's streams; a one-second drain, so old
/// listeners go away within the test.
const ENVOY_ARGS: [&str; 4] = ["--concurrency", "2", "--drain-time-s", "1"];
/// Listener rewrites, half (a) and half (b).
const RELOADS: usize = 32;
/// How often the listener is rewritten (each waits for Envoy to apply the previous one first).
const RELOAD_EVERY: Duration = Duration::from_millis(400);
/// A bound on one update being applied or rejected, not a performance assertion.
const APPLIED_WITHIN: Duration = Duration::from_secs(20);
/// Requests per load task at most, so a stuck reload cannot make the load run forever.
const MAX_REQUESTS_PER_TASK: u64 = 200_000;

// === the listener, by file-based LDS ===

/// Envoy's bootstrap with the shipped module config's `ingress` listener moved into a file that
/// Envoy watches (LDS), and that file, rewritten by [`Lds::write`].
struct Lds {
    dir: tempfile::TempDir,
    /// The shipped `ingress` listener on a fixed loopback port (an update keeps the address).
    template: Value,
    bootstrap: EnvoyConfig,
}

impl Lds {
    fn new(upstream: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The module reads its config inline (`Lds::write`); the path is replaced there.
        let mut bootstrap = EnvoyConfig::shipped()
            .on_loopback(upstream, upstream)
            .into_module(Path::new("/replaced/by/the/listener"));
        let listeners = bootstrap.0["static_resources"]["listeners"]
            .as_sequence_mut()
            .unwrap();
        let at = listeners
            .iter()
            .position(|l| l["name"].as_str() == Some("ingress"))
            .unwrap();
        let mut template = listeners.remove(at);
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        template["address"]["socket_address"]["port_value"] = port.into();
        bootstrap.0["node"] = serde_yaml_ng::from_str(
            "{ id: gybc-authz-reload-test, cluster: gybc-authz-reload-test }",
        )
        .unwrap();
        let lds_path = dir.path().join("lds.yaml");
        let mut lds: Value = serde_yaml_ng::from_str(
            "{ lds_config: { resource_api_version: V3, path_config_source: { watched_directory: {} } } }",
        )
        .unwrap();
        let source = &mut lds["lds_config"]["path_config_source"];
        source["path"] = lds_path.display().to_string().into();
        source["watched_directory"]["path"] = dir.path().display().to_string().into();
        bootstrap.0["dynamic_resources"] = lds;
        Self {
            dir,
            template,
            bootstrap,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("lds.yaml")
    }

    /// Writes the listener with this HCM `stat_prefix` and this gybc-authz config (the module's
    /// `filter_config`, inline), replacing the file at once as Envoy expects.
    fn write(&self, stat_prefix: &str, engine_yaml: &str) {
        let mut listener = self.template.clone();
        let hcm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"];
        hcm["stat_prefix"] = stat_prefix.into();
        let filter = hcm["http_filters"]
            .as_sequence_mut()
            .unwrap()
            .iter_mut()
            .find(|f| f["name"].as_str() == Some(MODULE_FILTER))
            .expect("the module's filter");
        filter["typed_config"]["filter_config"]["value"] = engine_yaml.into();
        listener.as_mapping_mut().unwrap().insert(
            "@type".into(),
            "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
        );
        let mut doc = serde_yaml_ng::Mapping::new();
        doc.insert("resources".into(), Value::Sequence(vec![listener]));
        replace_file(&self.path(), &serde_yaml_ng::to_string(&doc).unwrap());
    }
}

/// The stack under test: the tests' keys and signing keys, an upstream, and Envoy reading its
/// listener from `lds`.
struct Reloading {
    env: TestEnv,
    upstream: Upstream,
    lds: Lds,
    envoy: Envoy,
}

impl Reloading {
    /// Envoy with the environment's gybc-authz config as the listener's first version.
    async fn start() -> Self {
        let env = TestEnv::start_with(EnvOptions {
            extra_yaml: BASE_EXTRA.into(),
            ..Default::default()
        })
        .await;
        let upstream = Upstream::start().await;
        let lds = Lds::new(upstream.addr);
        lds.write("ingress", &env.config_yaml);
        let envoy =
            Envoy::start_module_with_args(&lds.bootstrap, env.clock.now_nanos(), &ENVOY_ARGS).await;
        let s = Self {
            env,
            upstream,
            lds,
            envoy,
        };
        // The first engine in the process fails closed until it has loaded (documented).
        wait_until(
            "the first engine loaded",
            Duration::from_secs(20),
            async || s.get(&client(), "/loaded-probe", &[]).await.status != 503,
        )
        .await;
        s
    }

    /// The gybc-authz config of this environment, with `extra` appended.
    fn engine_yaml(&self, extra: &str) -> String {
        format!("{}\n{extra}\n", self.env.config_yaml)
    }

    async fn get(&self, http: &reqwest::Client, path: &str, headers: &[(&str, &str)]) -> Reply {
        send(http, &self.envoy, &self.upstream, "GET", path, headers).await
    }

    /// Rewrites the listener and waits until Envoy has applied (or, `rejected`, refused) it.
    async fn reload(&self, stat_prefix: &str, engine_yaml: &str, rejected: bool) {
        let stat = if rejected {
            "listener_manager.lds.update_rejected"
        } else {
            "listener_manager.lds.update_success"
        };
        let before = self.envoy.counter(stat).await;
        self.lds.write(stat_prefix, engine_yaml);
        let deadline = Instant::now() + APPLIED_WITHIN;
        while self.envoy.counter(stat).await == before {
            assert!(
                Instant::now() < deadline,
                "Envoy did not count {stat} within {APPLIED_WITHIN:?}:\n{}",
                self.envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The module's live-engines gauge as Envoy shows it, after requests have copied it over.
    async fn engines_live(&self) -> f64 {
        self.get(&client(), "/stats-probe", &[]).await;
        self.envoy
            .stats()
            .await
            .get("envoy_gybc_authz_engines_live", &[])
    }

    /// Filter configs by what became of their engine: (started, reused, refused).
    async fn engine_configs(&self) -> (f64, f64, f64) {
        self.get(&client(), "/stats-probe", &[]).await;
        let stats = self.envoy.stats().await;
        let n = |outcome| {
            stats.get(
                "envoy_gybc_authz_engine_configs_total",
                &[("outcome", outcome)],
            )
        };
        (n("started"), n("reused"), n("refused"))
    }
}

/// The test config's additions: a default limit the load's `sk_` key never reaches.
const BASE_EXTRA: &str = "rate_limit: { default: 1000000/1s }";

/// A real config change: one more tenantless path (where a JWT without a tenant is allowed).
fn tenantless(path: &str) -> String {
    format!("policy: {{ tenantless_paths: [\"{ORG_CREATE}\", \"{path}\"] }}")
}

// === load ===

/// What each kind of request got back: status → count, and transport errors.
#[derive(Default)]
struct Tally {
    statuses: Mutex<BTreeMap<(&'static str, u16), u64>>,
    errors: Mutex<Vec<String>>,
}

/// One client task sending one kind of request until `stop`.
fn load(
    s: &Arc<Reloading>,
    kind: &'static str,
    tally: &Arc<Tally>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (s, tally, stop) = (s.clone(), tally.clone(), stop.clone());
    tokio::spawn(async move {
        // Each request on its own connection. Envoy closes a connection still open on a listener
        // at the end of its drain, whatever the filter, and a request in flight on it fails; that
        // is Envoy's drain, not the module. New connections always reach the newest listener.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        for n in 0..MAX_REQUESTS_PER_TASK {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let credential = match kind {
                "sk_allowed" => ("x-api-key", s.env.keys.impersonator.clone()),
                "unknown_key" => ("x-api-key", ApiKey::generate(KeyKind::Secret)),
                "fresh_jwt" => (
                    "authorization",
                    format!(
                        "Bearer {}",
                        s.env.user_token(&format!("user-{n}"), Some(TENANT))
                    ),
                ),
                _ => unreachable!(),
            };
            let url = s.envoy.url(API_PATH);
            match http
                .get(url)
                .header(credential.0, &credential.1)
                .send()
                .await
            {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let _ = r.bytes().await;
                    *tally
                        .statuses
                        .lock()
                        .unwrap()
                        .entry((kind, status))
                        .or_default() += 1;
                }
                Err(e) => tally.errors.lock().unwrap().push(format!("{kind}: {e:?}")),
            }
        }
    })
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listener_reloads_under_load_answer_no_503_and_keep_limits_and_memory_flat() {
    let s = Arc::new(Reloading::start().await);
    let engine_base = s.engine_yaml("");
    let http = client();

    // A key held at its limit (2/60s; the module's clock stands still).
    let limited = s.env.keys.limited.clone();
    for _ in 0..2 {
        s.get(&http, API_PATH, &[("x-api-key", &limited)])
            .await
            .allowed();
    }
    s.get(&http, API_PATH, &[("x-api-key", &limited)])
        .await
        .denied(429, "rate_limited");

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = ["sk_allowed", "unknown_key", "fresh_jwt", "sk_allowed"]
        .into_iter()
        .map(|kind| load(&s, kind, &tally, &stop))
        .collect();

    let mut samples = Vec::new();
    let mut engine_yaml = engine_base.clone();
    let mut last_b = None;
    let mut earlier_b = None;
    for i in 0..RELOADS {
        let started = Instant::now();
        let prefix = if i % 4 < 2 { "ingress_a" } else { "ingress_b" };
        if i % 2 == 0 {
            // (a) the listener changes, the gybc-authz config does not (a comment is no change).
            let commented = format!("# reload {i}\n{engine_yaml}");
            s.reload(prefix, &commented, false).await;
        } else {
            // (b) a real change: another tenantless path.
            let path = format!("/reload/{i}");
            engine_yaml = format!("{engine_base}{}\n", tenantless(&path));
            s.reload(prefix, &engine_yaml, false).await;
            earlier_b = last_b.replace(path);
        }
        // (The load reaches the upstream meanwhile, so only the answer is looked at. A new
        // connection each time: Envoy closes an idle one on a drained listener, which a client
        // may find only when it sends on it.)
        let r = client()
            .get(s.envoy.url(API_PATH))
            .header("x-api-key", &limited)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert_eq!(status, 429, "the limited key after reload {i}: {body}");
        samples.push(s.envoy.rss_and_threads());
        tokio::time::sleep(RELOAD_EVERY.saturating_sub(started.elapsed())).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }

    let statuses = tally.statuses.lock().unwrap().clone();
    let errors = tally.errors.lock().unwrap().clone();
    eprintln!("statuses: {statuses:?}\ntransport errors: {}", errors.len());
    let expected = |kind: &str| match kind {
        "unknown_key" => 401,
        _ => 200,
    };
    let unexpected: Vec<_> = statuses
        .iter()
        .filter(|((kind, status), _)| *status != expected(kind))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected answers under reloads: {unexpected:?}"
    );
    for kind in ["sk_allowed", "unknown_key", "fresh_jwt"] {
        assert!(
            statuses
                .get(&(kind, expected(kind)))
                .is_some_and(|n| *n > 0),
            "no {kind} answered: {statuses:?}"
        );
    }
    assert!(
        errors.is_empty(),
        "transport errors under reloads: {errors:?}"
    );

    // The last config is in force: its tenantless path allows a JWT without a tenant, the one
    // before it no more (a fresh connection, so the new listener answers).
    let (last_b, earlier_b) = (last_b.unwrap(), earlier_b.unwrap());
    let token = format!("Bearer {}", s.env.user_token("tenantless-user", None));
    let fresh = client();
    s.get(&fresh, &last_b, &[("authorization", &token)])
        .await
        .allowed();
    s.get(&fresh, &earlier_b, &[("authorization", &token)])
        .await
        .denied(403, "tenant_required");

    // Flat: the first third against the last third of the samples.
    let third = samples.len() / 3;
    let mean = |part: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| {
        part.iter().map(f).sum::<u64>() as f64 / part.len() as f64
    };
    for (what, f) in [
        ("RSS", (|s: &(u64, u64)| s.0) as fn(&(u64, u64)) -> u64),
        ("threads", |s| s.1),
    ] {
        let (early, late) = (
            mean(&samples[..third], f),
            mean(&samples[samples.len() - third..], f),
        );
        assert!(
            (late - early).abs() <= early * 0.10,
            "Envoy's {what} moved from {early} to {late} over {RELOADS} reloads: {samples:?}"
        );
    }

    // Once the old listeners have drained, one engine is left. Every (a) kept its engine and
    // every (b) started one, after the first.
    wait_until(
        "one live engine after the drain",
        Duration::from_secs(20),
        async || s.engines_live().await == 1.0,
    )
    .await;
    let changes = (RELOADS / 2) as f64;
    wait_until("the engine counts", Duration::from_secs(5), async || {
        s.engine_configs().await == (1.0 + changes, changes, 0.0)
    })
    .await;
    let log = s.envoy.log();
    for line in [
        "Engine started for a new config.",
        "Engine reused",
        "Engine stopped",
    ] {
        assert!(log.contains(line), "`{line}` is not in Envoy's log");
    }
}

/// A listener that accepts connections and never answers: a signing-key URL that hangs.
async fn hanging_endpoint() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_that_cannot_load_in_time_is_refused_and_the_old_one_keeps_serving() {
    let s = Reloading::start().await;
    let http = client();
    let key = s.env.keys.secret.clone();
    s.get(&http, API_PATH, &[("x-api-key", &key)])
        .await
        .allowed();

    let (hanging, task) = hanging_endpoint().await;
    // The test config's providers plus one whose keys never come.
    let providers = format!(
        "    - {{ name: dashboard, project_id: {PROJECT}, keys: {{ type: url, url: \"{}\" }} }}\n\
         \x20   - {{ name: endusers, project_id: {APP_PROJECT}, keys: {{ type: url, url: \"{}\" }} }}\n\
         \x20   - {{ name: hanging, project_id: {PROJECT}, keys: {{ type: url, url: \"http://{hanging}/keys\" }} }}\n",
        s.env.dashboard_keys.url(),
        s.env.app_keys.url(),
    );
    let yaml = s.env.config_yaml.replace(
        &format!(
            "    - {{ name: endusers, project_id: {APP_PROJECT}, keys: {{ type: url, url: \"{}\" }} }}\n",
            s.env.app_keys.url()
        ),
        "",
    );
    let yaml = yaml.replace(
        &format!(
            "    - {{ name: dashboard, project_id: {PROJECT}, keys: {{ type: url, url: \"{}\" }} }}\n",
            s.env.dashboard_keys.url()
        ),
        &providers,
    );
    assert!(yaml.contains("name: hanging"), "{yaml}");
    let bad = format!("{yaml}\nmodule: {{ ready_timeout_ms: 1000 }}\n");
    s.reload("ingress", &bad, true).await;

    // Envoy says why, and keeps serving the old config.
    let log = s.envoy.log();
    assert!(
        log.contains("not ready within 1000 ms") && log.contains("`hanging`"),
        "the refusal's reason is not in Envoy's log:\n{log}"
    );
    let fresh = client();
    s.get(&fresh, API_PATH, &[("x-api-key", &key)])
        .await
        .allowed();
    s.get(&fresh, API_PATH, &[("x-api-key", &s.env.keys.unknown)])
        .await
        .denied(401, "invalid_api_key");
    wait_until(
        "the refused engine stopped",
        Duration::from_secs(10),
        async || s.engines_live().await == 1.0,
    )
    .await;
    wait_until("the refusal counted", Duration::from_secs(5), async || {
        s.engine_configs().await == (2.0, 0.0, 1.0)
    })
    .await;
    task.abort();
}
