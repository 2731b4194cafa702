//! Redis primary failovers under steady load, through the real Envoy in both modes: two data-path
//! replicas and the key service (`gybc-authz key-service`) on one Redis that fails over, either a
//! Sentinel setup (a primary, a replica and three real `redis-sentinel`s) or a 6-node Redis
//! Cluster (3 primaries, 3 replicas). Under load there are a cached key, a key first asked for
//! after the failure (uncached) and a key at its exact limit. The primary is SIGKILLed (in a
//! cluster, the one that is the first seed address and owns the cached key's limiter slot and
//! the uncached key's record); then:
//! - the cached key gets no 5xx at any point;
//! - the uncached key gets only 503 with `Retry-After` until it works, and 200 from then on (a
//!   breaker that closed and opened again would show as 503s after a 200);
//! - the limited key gets only 200 and 429;
//! - from 2 s after the promotion: a key made through the key service works on both replicas
//!   within 1 s, its revocation is seen by both within 1 s, and the fleet limit is exact (N of N);
//! - each replica counts the failover, writes its usage counts to the new primary, and its circuit
//!   breaker opens at most twice (no flapping);
//! - the old primary, restarted, rejoins as a replica with no error on our side;
//! - a graceful failover (`SENTINEL FAILOVER`, `CLUSTER FAILOVER`) gives no error at all (not one
//!   answer, not one Redis error counted), and the key service and the revocation events follow
//!   it too.
//!
//! Every run prints the promotion time, the longest run of non-2xx answers per key type and the
//! time until the limits were exact again (docs/operations.md records one run). The four tests
//! run one at a time (a lock): each starts its own Redis, Envoys and engines, and two at once on
//! a small machine would only measure each other.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use gybc_authz_engine::ratelimit::RateLimit;
use gybc_authz_engine::redis_conn::Names;
use gybc_authz_engine::store::KeyRecord;
use serde_json::json;
use support::envoy::*;
use support::key_service::{KeyService, Who};
use support::redis::*;
use support::*;

/// One failover test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The limit of the keys that check the fleet limit: N of N across both replicas.
const N: u32 = 4;
/// Keys at that limit, one per attempt to see the limit exact again.
const EXACT_KEYS: usize = 16;
/// How long after the promotion everything must be back (the bound).
const BACK_WITHIN: Duration = Duration::from_secs(2);
/// How long a new key, a revocation, may take to reach both replicas.
const PROPAGATION: Duration = Duration::from_secs(1);
/// Pause between one load task's requests.
const LOAD_PAUSE: Duration = Duration::from_millis(25);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Cached,
    Uncached,
    Limited,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    status: u16,
    retry_after: bool,
}

/// One replica's answers for one key, in order.
struct Series {
    kind: Kind,
    replica: &'static str,
    samples: Vec<Sample>,
}

/// Requests in a loop through each replica's Envoy, for each key, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<(Kind, &'static str, tokio::task::JoinHandle<Vec<Sample>>)>,
}

impl Load {
    fn start(replicas: &[(&'static str, String)], keys: &[(Kind, String)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let http = client();
        let mut tasks = Vec::new();
        for (name, url) in replicas {
            for (kind, key) in keys {
                let (stop, http, url, key) = (stop.clone(), http.clone(), url.clone(), key.clone());
                tasks.push((
                    *kind,
                    *name,
                    tokio::spawn(async move {
                        let mut samples = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            samples.push(hit(&http, &url, &key).await);
                            tokio::time::sleep(LOAD_PAUSE).await;
                        }
                        samples
                    }),
                ));
            }
        }
        Self { stop, tasks }
    }

    async fn stop(self) -> Vec<Series> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for (kind, replica, task) in self.tasks {
            out.push(Series {
                kind,
                replica,
                samples: task.await.unwrap(),
            });
        }
        out
    }
}

/// Runs a blocking helper (a `redis-cli`, a process start) without stalling the engines and the
/// load that share this runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// One request through an Envoy with this key.
async fn hit(http: &reqwest::Client, url: &str, key: &str) -> Sample {
    let sent = Instant::now();
    let mut req = http.post(url);
    if !key.is_empty() {
        req = req.header("x-api-key", key);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("request through Envoy failed: {e}"));
    Sample {
        at: sent,
        status: resp.status().as_u16(),
        retry_after: resp.headers().contains_key("retry-after"),
    }
}

/// The samples of `s` sent in `[from, to)`.
fn window(s: &Series, from: Instant, to: Instant) -> impl Iterator<Item = &Sample> {
    s.samples.iter().filter(move |x| x.at >= from && x.at < to)
}

/// The longest run of non-2xx answers: how long (first to the next 2xx) and how many.
fn longest_non_2xx(samples: &[Sample]) -> (Duration, usize) {
    let (mut best, mut run_start, mut run_len) = ((Duration::ZERO, 0), None::<Instant>, 0);
    for s in samples {
        if (200..300).contains(&s.status) {
            if let Some(start) = run_start.take() {
                best = best.max((s.at - start, run_len));
            }
            run_len = 0;
        } else {
            run_start.get_or_insert(s.at);
            run_len += 1;
        }
    }
    if let (Some(start), Some(last)) = (run_start, samples.last()) {
        best = best.max((last.at - start, run_len));
    }
    best
}

/// A record like the test keys', for a new secret.
fn record(base: &KeyRecord, id: &str, limit: Option<RateLimit>) -> (String, KeyRecord) {
    let key = ApiKey::generate(KeyKind::Secret);
    let mut r = base.clone();
    r.id = id.into();
    r.hash = KeyHash::of(&key);
    r.rate_limit = limit;
    r.scopes = Vec::new();
    (key, r)
}

/// Two data-path replicas and the key service.
struct Fleet {
    a: Stack,
    b: Stack,
    ks: KeyService,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(mode: Mode, keys: &TestKeys, redis_yaml: &str) -> Self {
        let opts = || EnvOptions {
            keys: Some(keys.clone()),
            key_store_yaml: Some("key_store: { type: redis }".into()),
            // A default limit the load never reaches: only the limited keys are ever 429.
            extra_yaml: format!(
                "{redis_yaml}\nrate_limit: {{ backend: redis, failure_mode: fail_open, default: 1000000/60s }}\n"
            ),
            ..Default::default()
        };
        let a = Stack::start_with(mode, opts()).await;
        let b = Stack::start_with(mode, opts()).await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("key-service.yaml");
        std::fs::write(
            &config,
            format!(
                "key_store: {{ type: redis }}\n{redis_yaml}\njwt:\n  providers:\n    - {{ name: endusers, project_id: {APP_PROJECT} }}\n"
            ),
        )
        .unwrap();
        let ks = blocking(|| KeyService::start_with_config(&config, &[], &[]));
        Self {
            a,
            b,
            ks,
            http: client(),
            _dir: dir,
        }
    }

    fn urls(&self) -> Vec<(&'static str, String)> {
        vec![
            ("a", self.a.envoy.url(API_PATH)),
            ("b", self.b.envoy.url(API_PATH)),
        ]
    }

    /// Waits until `key` gets `status` from both replicas; how long that took.
    async fn on_both(&self, what: &str, key: &str, status: u16, within: Duration) -> Duration {
        let started = Instant::now();
        for (name, url) in self.urls() {
            loop {
                if hit(&self.http, &url, key).await.status == status {
                    break;
                }
                assert!(
                    started.elapsed() < within,
                    "{what}: replica {name} still does not answer {status} after {within:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        started.elapsed()
    }

    /// 2N requests with `key` (limit N), alternating between the replicas: (allowed, limited,
    /// anything else).
    async fn fleet_limit(&self, key: &str) -> (u32, u32, u32) {
        let urls = self.urls();
        let mut counts = (0, 0, 0);
        for i in 0..2 * N as usize {
            match hit(&self.http, &urls[i % 2].1, key).await.status {
                200 => counts.0 += 1,
                429 => counts.1 += 1,
                _ => counts.2 += 1,
            }
        }
        counts
    }

    /// A key made through the key service, as an operator of tenant TENANT would; retried while
    /// the key service answers 503 (Redis failing over), never longer than `within`.
    async fn create_key(&self, within: Duration) -> (String, String) {
        let started = Instant::now();
        loop {
            let a = self
                .ks
                .call(
                    "create-key",
                    &Who::user(TENANT, "ops"),
                    &json!({"kind": "KEY_KIND_SECRET"}).to_string(),
                )
                .await;
            if a.status == 200 {
                return (
                    a.body["secret"].as_str().unwrap().to_owned(),
                    a.body["key"]["id"].as_str().unwrap().to_owned(),
                );
            }
            assert!(
                a.status == 503 && started.elapsed() < within,
                "the key service could not create a key within {within:?}: {} {}",
                a.status,
                a.text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn revoke_key(&self, id: &str) {
        let a = self
            .ks
            .call(
                "revoke-key",
                &Who::user(TENANT, "ops"),
                &json!({"id": id}).to_string(),
            )
            .await;
        assert_eq!(a.status, 200, "revoke-key: {}", a.text);
    }

    /// Redis errors the engines met so far, both replicas: limiter calls answered by the
    /// failure mode, key lookups that failed.
    async fn redis_errors(&self) -> f64 {
        let mut n = 0.0;
        for s in [&self.a, &self.b] {
            n += self
                .metric(
                    s,
                    "gybc_authz_rate_limit_fallbacks_total",
                    &[("mode", "local")],
                )
                .await;
            for kind in ["unavailable", "breaker_open"] {
                n += self
                    .metric(
                        s,
                        "gybc_authz_backend_errors_total",
                        &[("backend", "key_store"), ("kind", kind)],
                    )
                    .await;
            }
        }
        n
    }

    /// Times each replica's circuit breaker opened so far.
    async fn breaker_opens(&self) -> [f64; 2] {
        let mut n = [0.0; 2];
        for (i, s) in [&self.a, &self.b].into_iter().enumerate() {
            n[i] = self
                .metric(
                    s,
                    "gybc_authz_redis_breaker_transitions_total",
                    &[("to", "open")],
                )
                .await;
        }
        n
    }

    /// A metric of one replica's engine, as its operator scrapes it (`Stack::metric` sends its
    /// probe request through `send`, which counts upstream hits and cannot share them with load).
    async fn metric(&self, s: &Stack, name: &str, labels: &[(&str, &str)]) -> f64 {
        match s.mode {
            Mode::Sidecar => scrape(&s.env).await.get(name, labels),
            Mode::Module => {
                // A request through the filter copies the engine's counts to Envoy's stats.
                hit(&self.http, &s.envoy.url("/__gybc_test/stats-probe"), "").await;
                s.envoy.stats().await.get(&format!("envoy_{name}"), labels)
            }
        }
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

/// What one failover showed, printed for BENCHMARKS.md.
struct Figures {
    setup: &'static str,
    mode: Mode,
    promotion: Duration,
    longest: Vec<(Kind, Duration, usize)>,
    exact_after: Duration,
    new_key: Duration,
    revocation: Duration,
    graceful_longest: Duration,
    /// How often each replica's breaker opened between the kill and the rejoin.
    breaker_opens: [f64; 2],
    /// How long each part of the test took: set-up, the crash until the rejoin, the rejoin, the
    /// graceful failover.
    phases: [Duration; 4],
}

impl Figures {
    fn print(&self) {
        let longest = self
            .longest
            .iter()
            .map(|(k, d, n)| format!("{k:?} {} ms ({n} answers)", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "FAILOVER {} {:?}: promotion {} ms after the kill; longest non-2xx run: {longest}; \
             fleet limit exact {} ms after the promotion; new key on both replicas in {} ms; \
             revocation on both in {} ms; breaker opened {:?} times; graceful failover: \
             longest non-2xx run {} ms; phases (set-up, crash, rejoin, graceful) {:?}",
            self.setup,
            self.mode,
            self.promotion.as_millis(),
            self.exact_after.as_millis(),
            self.new_key.as_millis(),
            self.revocation.as_millis(),
            self.breaker_opens,
            self.graceful_longest.as_millis(),
            self.phases,
        );
    }
}

/// The checks after a crash and its promotion, common to both setups: from the promotion, fresh
/// keys at limit N until one is exact (how long that took); at the promotion plus
/// [`BACK_WITHIN`], a new key, a revocation, and the limit once more.
async fn after_promotion(
    f: &Fleet,
    promoted: Instant,
    exact_keys: &mut impl Iterator<Item = String>,
) -> (Duration, Duration, Duration) {
    let exact_after = loop {
        let key = exact_keys.next().expect("enough keys at the limit");
        let started = Instant::now();
        if f.fleet_limit(&key).await == (N, N, 0) {
            break started - promoted;
        }
        assert!(
            started < promoted + BACK_WITHIN,
            "the fleet limit is not exact {BACK_WITHIN:?} after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep_until((promoted + BACK_WITHIN).into()).await;
    // The key service follows the new primary: the key is made at once, and both replicas find it.
    let (secret, id) = f.create_key(Duration::from_millis(500)).await;
    let new_key = f
        .on_both("a new key after the failover", &secret, 200, PROPAGATION)
        .await;
    // Cached on both now: only the event can refuse it within the second.
    let revoked = Instant::now();
    f.revoke_key(&id).await;
    let revocation = f
        .on_both("a revocation after the failover", &secret, 401, PROPAGATION)
        .await
        .max(revoked.elapsed());
    let key = exact_keys.next().expect("enough keys at the limit");
    assert_eq!(
        f.fleet_limit(&key).await,
        (N, N, 0),
        "the fleet limit, N of N"
    );
    (exact_after, new_key, revocation)
}

/// The answers of the crash phase, as the issue states them.
fn check_crash(series: &[Series], from: Instant, to: Instant, promoted: Instant) {
    for s in series {
        let samples: Vec<Sample> = window(s, from, to).copied().collect();
        assert!(
            samples.len() > 10,
            "{:?} on {}: too few samples",
            s.kind,
            s.replica
        );
        match s.kind {
            Kind::Cached => {
                let bad: Vec<u16> = samples
                    .iter()
                    .map(|x| x.status)
                    .filter(|&c| c != 200)
                    .collect();
                assert!(bad.is_empty(), "the cached key on {}: {bad:?}", s.replica);
            }
            Kind::Limited => {
                let bad: Vec<u16> = samples
                    .iter()
                    .map(|x| x.status)
                    .filter(|c| ![200, 429].contains(c))
                    .collect();
                assert!(bad.is_empty(), "the limited key on {}: {bad:?}", s.replica);
            }
            Kind::Uncached => {
                for x in &samples {
                    assert!(
                        x.status == 200 || (x.status == 503 && x.retry_after),
                        "the uncached key on {}: {} (retry-after {})",
                        s.replica,
                        x.status,
                        x.retry_after
                    );
                }
                let first_ok = samples
                    .iter()
                    .position(|x| x.status == 200)
                    .unwrap_or_else(|| panic!("the uncached key never worked on {}", s.replica));
                assert!(
                    samples[first_ok].at < promoted + BACK_WITHIN,
                    "the uncached key worked on {} only {:?} after the promotion",
                    s.replica,
                    samples[first_ok].at.saturating_duration_since(promoted)
                );
                let after: Vec<u16> = samples[first_ok..]
                    .iter()
                    .map(|x| x.status)
                    .filter(|&c| c != 200)
                    .collect();
                assert!(
                    after.is_empty(),
                    "the uncached key on {} failed again after it worked (a breaker that flaps): {after:?}",
                    s.replica
                );
            }
        }
    }
}

/// No error at all in `[from, to)`: 200 for the cached and uncached keys, 200 or 429 for the
/// limited one.
fn check_no_error(what: &str, series: &[Series], from: Instant, to: Instant) -> Duration {
    let mut longest = Duration::ZERO;
    for s in series {
        let samples: Vec<Sample> = window(s, from, to).copied().collect();
        assert!(samples.len() > 5, "{what}: too few samples");
        let allowed: &[u16] = match s.kind {
            Kind::Limited => &[200, 429],
            _ => &[200],
        };
        let bad: Vec<u16> = samples
            .iter()
            .map(|x| x.status)
            .filter(|c| !allowed.contains(c))
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: {:?} on {}: {bad:?}",
            s.kind,
            s.replica
        );
        if s.kind != Kind::Limited {
            longest = longest.max(longest_non_2xx(&samples).0);
        }
    }
    longest
}

/// The longest non-2xx run per kind over both replicas in `[from, to)`.
fn longest_runs(series: &[Series], from: Instant, to: Instant) -> Vec<(Kind, Duration, usize)> {
    // The limited key is answered 429 by design; its figure is the time until the limit is exact.
    [Kind::Cached, Kind::Uncached]
        .into_iter()
        .map(|kind| {
            let (d, n) = series
                .iter()
                .filter(|s| s.kind == kind)
                .map(|s| longest_non_2xx(&window(s, from, to).copied().collect::<Vec<_>>()))
                .max()
                .unwrap_or_default();
            (kind, d, n)
        })
        .collect()
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if blocking(&mut done) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === the two setups ===

/// What a Redis setup that fails over has to do for the test; the test itself is
/// [`failover_under_load`]. Every method may block (a `redis-cli`, a process start): the
/// driver calls them through [`blocking`], where an async helper is run with `block_on`.
trait Setup: Send {
    const NAME: &'static str;
    /// The uncached key: one that lives on the primary that dies, where that matters.
    fn uncached(&self, base: &KeyRecord) -> (String, KeyRecord);
    /// Writes the records as the key service would, on every node before the primary dies.
    fn seed(&self, records: &[KeyRecord]);
    /// The daemon's (and the key service's) `redis:` section.
    fn redis_yaml(&self) -> String;
    fn kill_primary(&mut self);
    fn promoted(&self) -> bool;
    /// Starts the old primary again, and waits until it is a replica in sync.
    fn rejoin(&mut self);
    /// Starts a graceful failover back to the old primary.
    fn graceful_failover(&mut self);
    fn graceful_done(&self) -> bool;
}

/// A primary (node 0), its replica (node 1) and three sentinels.
struct Sentinels(SentinelSet);

impl Setup for Sentinels {
    const NAME: &'static str = "sentinel";

    fn uncached(&self, base: &KeyRecord) -> (String, KeyRecord) {
        record(base, "key_uncached", None)
    }

    fn seed(&self, records: &[KeyRecord]) {
        tokio::runtime::Handle::current().block_on(seed(&self.0.nodes[0].url(), records));
        self.0.nodes[0].cli(&["WAIT", "1", "5000"]);
    }

    fn redis_yaml(&self) -> String {
        format!(
            "redis: {{ sentinel: {{ master_name: {MASTER_NAME}, urls: [{}] }}, timeout_ms: 200, connect_timeout_ms: 300 }}",
            yaml_list(&self.0.urls())
        )
    }

    fn kill_primary(&mut self) {
        self.0.nodes[0].kill();
    }

    fn promoted(&self) -> bool {
        self.0.primary_port() == Some(self.0.nodes[1].port)
    }

    /// Started as it was, a primary with nothing in it: the sentinels make it a replica.
    fn rejoin(&mut self) {
        self.0.nodes[0].restart();
        self.0.wait_replica_synced(0, Duration::from_secs(30));
    }

    fn graceful_failover(&mut self) {
        let out = self.0.sentinels[0].cli(&["SENTINEL", "FAILOVER", MASTER_NAME]);
        assert_eq!(out, "OK", "SENTINEL FAILOVER: {out}");
    }

    /// Back on node 0, and node 1 reconfigured as its replica (when the sentinels reconfigure
    /// the old primary, they drop its clients: that moment is inside the graceful window).
    fn graceful_done(&self) -> bool {
        self.0.primary_port() == Some(self.0.nodes[0].port)
            && self.0.nodes[1]
                .cli(&["INFO", "replication"])
                .contains("master_link_status:up")
    }
}

/// 3 primaries and 3 replicas; `victim` is the primary that dies: the owner of the cached key's
/// limiter slot, and the first seed address.
struct Cluster {
    cluster: RedisCluster,
    urls: Vec<String>,
    hot: u16,
    victim: usize,
    /// Another primary, alive throughout: it is asked who owns the hot slot.
    other: usize,
    /// The victim's replica, promoted.
    promoted: Option<usize>,
}

impl Cluster {
    fn start() -> Self {
        let cluster = RedisCluster::start_with_replicas(3, 1, 1000);
        let hot = cluster.slot(&Names::new("gybc").rate_limit("key_impersonator"));
        let victim = cluster.primary_of(hot, 0).expect("a primary owns the slot");
        let other = (0..cluster.nodes.len())
            .find(|&i| i != victim && cluster.role(i).0 == "master")
            .unwrap();
        let mut urls = cluster.urls();
        urls.swap(0, victim);
        Self {
            cluster,
            urls,
            hot,
            victim,
            other,
            promoted: None,
        }
    }
}

impl Setup for Cluster {
    const NAME: &'static str = "cluster";

    /// A key whose record lives on the victim too.
    fn uncached(&self, base: &KeyRecord) -> (String, KeyRecord) {
        let names = Names::new("gybc");
        loop {
            let (key, r) = record(base, "key_uncached", None);
            let slot = self.cluster.slot(&names.key(&r.hash));
            if self.cluster.primary_of(slot, self.other) == Some(self.victim) {
                return (key, r);
            }
        }
    }

    fn seed(&self, records: &[KeyRecord]) {
        tokio::runtime::Handle::current().block_on(seed_cluster(&self.urls, records));
        for i in 0..self.cluster.nodes.len() {
            if self.cluster.role(i).0 == "master" {
                self.cluster.nodes[i].cli(&["WAIT", "1", "5000"]);
            }
        }
    }

    fn redis_yaml(&self) -> String {
        format!(
            "redis: {{ urls: [{}], cluster: true, timeout_ms: 200, connect_timeout_ms: 300 }}",
            yaml_list(&self.urls)
        )
    }

    fn kill_primary(&mut self) {
        self.cluster.nodes[self.victim].kill();
    }

    fn promoted(&self) -> bool {
        self.cluster
            .primary_of(self.hot, self.other)
            .is_some_and(|p| p != self.victim)
    }

    /// Started with its nodes.conf: it learns its slots are served elsewhere and follows.
    fn rejoin(&mut self) {
        self.promoted = self.cluster.primary_of(self.hot, self.other);
        self.cluster.nodes[self.victim].restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cluster.role(self.victim) != ("slave".into(), true) {
            assert!(
                Instant::now() < deadline,
                "the old primary did not rejoin as a replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn graceful_failover(&mut self) {
        let out = self.cluster.nodes[self.victim].cli(&["CLUSTER", "FAILOVER"]);
        assert_eq!(out, "OK", "CLUSTER FAILOVER: {out}");
    }

    fn graceful_done(&self) -> bool {
        self.cluster.primary_of(self.hot, self.other) == Some(self.victim)
            && self.promoted.is_some_and(|p| self.cluster.role(p).1)
    }
}

/// The whole test, for either setup: load, SIGKILL of the primary, the checks after the
/// promotion, the old primary's rejoin, a graceful failover, and the figures.
async fn failover_under_load<S: Setup>(mode: Mode, start: fn() -> S) {
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let mut setup = blocking(start);
    let keys = TestKeys::generate();
    let records = keys.records();
    let base = records.iter().find(|r| r.id == "key_impersonator").unwrap();
    let (uncached, uncached_record) = blocking(|| setup.uncached(base));
    let limit: RateLimit = format!("{N}/60s").parse().unwrap();
    let (exact, mut seeded): (Vec<String>, Vec<KeyRecord>) = (0..EXACT_KEYS)
        .map(|i| record(base, &format!("key_exact_{i}"), Some(limit)))
        .unzip();
    seeded.extend(records.iter().cloned());
    seeded.push(uncached_record);
    // Everything on the replicas before the primary dies.
    blocking(|| setup.seed(&seeded));

    let f = Fleet::start(mode, &keys, &setup.redis_yaml()).await;
    let cached = keys.impersonator.clone();
    f.on_both("the cached key", &cached, 200, Duration::from_secs(5))
        .await;
    let load = Load::start(
        &f.urls(),
        &[
            (Kind::Cached, cached.clone()),
            (Kind::Limited, keys.limited.clone()),
        ],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let opens_before = f.breaker_opens().await;
    let killed = Instant::now();
    blocking(|| setup.kill_primary());
    // The uncached key is first asked for once the primary is gone.
    let load_uncached = Load::start(&f.urls(), &[(Kind::Uncached, uncached.clone())]);
    let promoted = wait_for("the promotion", Duration::from_secs(30), || {
        setup.promoted()
    })
    .await;
    let mut exact_keys = exact.into_iter();
    let (exact_after, new_key, revocation) = after_promotion(&f, promoted, &mut exact_keys).await;
    failover_counted(&f).await;
    usage_written_again(&f).await;
    let breaker_opens = breaker_did_not_flap(&f, opens_before).await;

    // The old primary, back: it rejoins as a replica. No error meanwhile.
    let rejoin = Instant::now();
    blocking(|| setup.rejoin());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A graceful failover back to it: no error at all.
    let errors_before = f.redis_errors().await;
    let graceful = Instant::now();
    blocking(|| setup.graceful_failover());
    wait_for("the graceful failover", Duration::from_secs(30), || {
        setup.graceful_done()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let end = Instant::now();
    let mut series = load.stop().await;
    series.extend(load_uncached.stop().await);

    check_crash(&series, killed, rejoin, promoted);
    check_no_error("the old primary rejoining", &series, rejoin, graceful);
    let graceful_longest = check_no_error("a graceful failover", &series, graceful, end);
    no_redis_error(&f, errors_before).await;
    // The key service and the events follow the graceful failover too.
    let (secret, id) = f.create_key(Duration::ZERO).await;
    let after = "after the graceful failover";
    f.on_both(&format!("a new key {after}"), &secret, 200, PROPAGATION)
        .await;
    f.revoke_key(&id).await;
    f.on_both(&format!("a revocation {after}"), &secret, 401, PROPAGATION)
        .await;

    Figures {
        setup: S::NAME,
        mode,
        promotion: promoted - killed,
        longest: longest_runs(&series, killed, rejoin),
        exact_after,
        new_key,
        revocation,
        graceful_longest,
        breaker_opens,
        phases: [
            killed - started,
            rejoin - killed,
            graceful - rejoin,
            end - graceful,
        ],
    }
    .print();
    f.stop().await;
}

async fn a_sentinel_failover_under_load(mode: Mode) {
    failover_under_load(mode, || Sentinels(SentinelSet::start())).await
}

async fn a_cluster_failover_under_load(mode: Mode) {
    failover_under_load(mode, Cluster::start).await
}

/// Both setups in both modes, on a runtime with threads to spare: the engines, the load and the
/// test's own blocking `redis-cli` calls share it.
macro_rules! both_modes_threaded {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sidecar() {
                super::$test(super::Mode::Sidecar).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn module() {
                super::$test(super::Mode::Module).await
            }
        }
    )*};
}

both_modes_threaded!(
    a_sentinel_failover_under_load,
    a_cluster_failover_under_load
);

/// Not one Redis error since `before` (`Fleet::redis_errors`): a graceful failover costs nothing,
/// not even a limiter call answered by the failure mode.
async fn no_redis_error(f: &Fleet, before: f64) {
    let now = f.redis_errors().await;
    assert_eq!(now - before, 0.0, "Redis errors during a graceful failover");
}

/// Each replica's breaker opened at most twice in the failover (once when the primary died, and
/// at most once more if its first commands after the promotion still failed): it must not open
/// and close again and again while the shard has no primary. How often it did.
async fn breaker_did_not_flap(f: &Fleet, before: [f64; 2]) -> [f64; 2] {
    let now = f.breaker_opens().await;
    let opens = [now[0] - before[0], now[1] - before[1]];
    for (replica, n) in ["a", "b"].into_iter().zip(opens) {
        assert!(
            n <= 2.0,
            "replica {replica}'s breaker opened {n} times in one failover"
        );
    }
    opens
}

/// Both replicas write their usage counts to the new primary: a flush succeeds after this point.
async fn usage_written_again(f: &Fleet) {
    for s in [&f.a, &f.b] {
        let ok = [("result", "ok")];
        let before = f.metric(s, "gybc_authz_usage_flushes_total", &ok).await;
        wait_until(
            "a usage flush after the failover",
            Duration::from_secs(5),
            async || f.metric(s, "gybc_authz_usage_flushes_total", &ok).await > before,
        )
        .await;
    }
}

/// Both replicas counted the failover (`redis_reconnects_total{reason="failover"}`).
async fn failover_counted(f: &Fleet) {
    for s in [&f.a, &f.b] {
        wait_until(
            "the failover is counted",
            Duration::from_secs(5),
            async || {
                f.metric(
                    s,
                    "gybc_authz_redis_reconnects_total",
                    &[("reason", "failover")],
                )
                .await
                    >= 1.0
            },
        )
        .await;
    }
}

#[test]
fn the_longest_run_of_non_2xx_answers_is_measured_from_its_first_to_the_next_2xx() {
    let t0 = Instant::now();
    let at = |ms: u64, status: u16| Sample {
        at: t0 + Duration::from_millis(ms),
        status,
        retry_after: false,
    };
    let samples = [
        at(0, 200),
        at(10, 503),
        at(20, 503),
        at(30, 200),
        at(40, 503),
        at(50, 503),
        at(60, 503),
        at(90, 200),
    ];
    assert_eq!(longest_non_2xx(&samples), (Duration::from_millis(50), 3));
    assert_eq!(longest_non_2xx(&samples[..2]), (Duration::ZERO, 1));
    assert_eq!(longest_non_2xx(&[]), (Duration::ZERO, 0));
}
