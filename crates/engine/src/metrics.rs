//! Every metric, in one struct on one registry, served as Prometheus text on `/metrics`. Label
//! values are bounded `&'static str`s from enums (and provider names from the config): never a
//! tenant, a user, a key id or a path.

/// The registry's data model, for hosts that copy series elsewhere (the Envoy module).
pub use prometheus::proto;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use std::sync::OnceLock;

use crate::decision::{AuthMethod, Reason};
use crate::event::{CacheOutcome, RedisReconnect, StoreKind, UsageDrop};

const NAMESPACE: &str = "gybc_authz";

/// Check latency buckets: 10 µs to 1 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];

/// `method` label of a decision: how the caller authenticated, or `none` when it did not get
/// that far.
pub const METHODS: [&str; 4] = ["jwt", "api_key", "publishable_key", "none"];

pub struct Metrics {
    registry: Registry,
    /// Every family registered, series or not, for hosts that must declare metrics up front.
    families: Vec<Family>,
    /// Resolved once: [method][0 = ok, 1.. = Reason::ALL], so a decision costs one atomic add.
    decision_handles: Vec<IntCounter>,
    pub check_duration: Histogram,
    cache_requests: IntCounterVec,
    key_lookups: IntCounterVec,
    /// Resolved on first use, per `StoreKind::ALL` index: [found, not_found, error].
    key_lookup_handles: [OnceLock<[IntCounter; 3]>; 4],
    /// The key cache's series, resolved when a key cache is built (only Redis has one):
    /// [keys/hit, keys/stale, keys/miss, negative_keys/hit].
    key_cache_handles: OnceLock<[IntCounter; 4]>,
    backend_errors: IntCounterVec,
    rate_limit_fallbacks: IntCounterVec,
    jwks_refreshes: IntCounterVec,
    jwks_keys: IntGaugeVec,
    pub redis_connected: IntGauge,
    pub redis_breaker_open: IntGauge,
    redis_breaker_transitions: IntCounterVec,
    redis_reconnects: IntCounterVec,
    /// Resolved once, in `Reason::ALL` order.
    decision_log_suppressed: Vec<IntCounter>,
    unknown_kid_fetches: IntCounterVec,
    route_config_errors: IntCounterVec,
    pub panics: IntCounter,
    trace_spans_exported: IntCounter,
    trace_spans_dropped: IntCounterVec,
    /// Resolved once, in `UsageDrop::ALL` order.
    usage_dropped: Vec<IntCounter>,
    usage_flushes: IntCounterVec,
    pub usage_entries: IntGauge,
    /// Resolved once: [deny, allow], what `policy.secret_key_from_browser` did.
    secret_key_from_browser: [IntCounter; 2],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Recording::new(
            Registry::new_custom(Some(NAMESPACE.into()), None).expect("valid namespace"),
        );
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let decisions = counter(
            "decisions_total",
            "Check decisions by authentication method, outcome (allow, deny) and reason (ok for allows).",
            &["method", "outcome", "reason"],
        );
        let cache_requests = counter(
            "cache_requests_total",
            "In-process cache lookups by cache (keys, negative_keys, jwt, rejected_jwt) and result (hit, stale, miss). The key cache series exist only where a key cache does: in front of Redis, not of an in-memory store.",
            &["cache", "result"],
        );
        let key_lookups = counter(
            "key_lookups_total",
            "API key lookups by the store configured (file, redis, memory, none) and result (found, not_found, error); for Redis, those the key cache answered included.",
            &["store", "result"],
        );
        let backend_errors = counter(
            "backend_errors_total",
            "Failures of a dependency by backend (key_store, jwks, rate_limit) and kind.",
            &["backend", "kind"],
        );
        let rate_limit_fallbacks = counter(
            "rate_limit_fallbacks_total",
            "Rate-limit decisions Redis could not make, by what answered instead (local, denied).",
            &["mode"],
        );
        let redis_breaker_transitions = counter(
            "redis_breaker_transitions_total",
            "Transitions of the Redis circuit breaker, by the state entered (open, closed).",
            &["to"],
        );
        let redis_reconnects = counter(
            "redis_reconnects_total",
            "Connections to Redis made again, by reason (failover: another node is the primary now; readonly: a node answered READONLY; connection_lost: the connection broke; subscription: the key-events subscription was made again and the key cache marked stale).",
            &["reason"],
        );
        let decision_log_suppressed = counter(
            "decision_log_suppressed_total",
            "Denial log lines left out by log.deny_lines_per_sec, by reason.",
            &["reason"],
        );
        let jwks_refreshes = counter(
            "jwks_refreshes_total",
            "Signing-key fetches by provider and result (success, failure).",
            &["provider", "result"],
        );
        let unknown_kid_fetches = counter(
            "jwks_unknown_kid_fetches_total",
            "Key fetches started because a token named an unknown kid, by provider.",
            &["provider"],
        );
        let route_config_errors = counter(
            "route_config_errors_total",
            "Checks refused because a route's gybc.* context_extensions are invalid, by setting key (from the Envoy config, at most 64 characters).",
            &["key"],
        );
        let trace_spans_dropped = counter(
            "trace_spans_dropped_total",
            "Decision spans lost before reaching the trace collector, by reason (queue_full: the export queue was full; export_failed: the collector refused or did not answer in time).",
            &["reason"],
        );
        let trace_spans_exported = IntCounter::new(
            "trace_spans_exported_total",
            "Decision spans the trace collector accepted.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(trace_spans_exported.clone()))
            .expect("unique metric");
        let usage_dropped = counter(
            "usage_dropped_total",
            "Decisions of known keys missing from the usage record, by reason (key_cap: over usage.max_keys_per_interval keys in an interval; held_full: over usage.max_held_entries held; expired: sent to Redis without an answer and retried as long as safe; no_redis: no Redis to write to, so nothing is held).",
            &["reason"],
        );
        let usage_flushes = counter(
            "usage_flushes_total",
            "Writes of the usage counts to Redis, by result (ok, failed: held for the next one).",
            &["result"],
        );
        let usage_entries = IntGauge::new(
            "usage_entries",
            "Usage (key, hour) entries in memory after the last flush: counted since, or held for a retry while Redis cannot be written (none without Redis).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(usage_entries.clone()))
            .expect("unique metric");
        let secret_key_from_browser = counter(
            "secret_key_from_browser_total",
            "Requests with a known secret (sk_) key and an Origin header (a secret shipped in a web page), by the policy.secret_key_from_browser action taken (deny: refused 403 secret_key_in_browser; allow: let through).",
            &["action"],
        );
        let panics = IntCounter::new(
            "panics_total",
            "Checks that panicked inside the engine and were answered 503 unavailable.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(panics.clone()))
            .expect("unique metric");
        let jwks_keys = IntGaugeVec::new(
            Opts::new("jwks_keys", "Signing keys held, by provider."),
            &["provider"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(jwks_keys.clone()))
            .expect("unique metric");
        let redis_connected = IntGauge::new(
            "redis_connected",
            "1 while the last Redis health check succeeded, else 0.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(redis_connected.clone()))
            .expect("unique metric");
        let redis_breaker_open = IntGauge::new(
            "redis_breaker_open",
            "1 while the Redis circuit breaker is open (Redis is not asked: uncached keys get 503, rate limits follow the failure mode), else 0.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(redis_breaker_open.clone()))
            .expect("unique metric");
        let check_duration = Histogram::with_opts(
            HistogramOpts::new(
                "check_duration_seconds",
                "Time to decide one Check, from request to response built.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(check_duration.clone()))
            .expect("unique metric");
        for c in process_collectors() {
            registry.register(c).expect("unique metric");
        }

        let mut decision_handles = Vec::with_capacity(METHODS.len() * (Reason::ALL.len() + 1));
        for method in METHODS {
            decision_handles.push(decisions.with_label_values(&[method, "allow", "ok"]));
            for r in Reason::ALL {
                decision_handles.push(decisions.with_label_values(&[method, "deny", r.as_str()]));
            }
        }
        let (registry, families) = registry.finish();
        let m = Self {
            registry,
            families,
            decision_handles,
            check_duration,
            cache_requests,
            key_lookups,
            key_lookup_handles: Default::default(),
            key_cache_handles: OnceLock::new(),
            backend_errors,
            rate_limit_fallbacks,
            jwks_refreshes,
            jwks_keys,
            redis_connected,
            redis_breaker_open,
            redis_breaker_transitions,
            redis_reconnects,
            decision_log_suppressed: Reason::ALL
                .iter()
                .map(|r| decision_log_suppressed.with_label_values(&[r.as_str()]))
                .collect(),
            unknown_kid_fetches,
            route_config_errors,
            panics,
            trace_spans_exported,
            trace_spans_dropped,
            usage_dropped: UsageDrop::ALL
                .iter()
                .map(|r| usage_dropped.with_label_values(&[r.as_str()]))
                .collect(),
            usage_flushes,
            usage_entries,
            secret_key_from_browser: ["deny", "allow"]
                .map(|a| secret_key_from_browser.with_label_values(&[a])),
        };
        // Every decision series exists from the start (above), so rates and ratios work at once.
        for (cache, result) in [("jwt", "hit"), ("jwt", "miss"), ("rejected_jwt", "hit")] {
            m.cache_requests.with_label_values(&[cache, result]);
        }
        for reason in ["queue_full", "export_failed"] {
            m.trace_spans_dropped.with_label_values(&[reason]);
        }
        for result in ["ok", "failed"] {
            m.usage_flushes.with_label_values(&[result]);
        }
        for mode in ["local", "denied"] {
            m.rate_limit_fallbacks.with_label_values(&[mode]);
        }
        for to in ["open", "closed"] {
            m.redis_breaker_transitions.with_label_values(&[to]);
        }
        for reason in RedisReconnect::ALL {
            m.redis_reconnects.with_label_values(&[reason.as_str()]);
        }
        for (backend, kind) in [
            ("key_store", "unavailable"),
            ("key_store", "refresh"),
            ("jwks", "fetch"),
            ("rate_limit", "error"),
            ("rate_limit", "timeout"),
            ("key_store", "breaker_open"),
            ("rate_limit", "breaker_open"),
        ] {
            m.backend_errors.with_label_values(&[backend, kind]);
        }
        m
    }

    /// Counts one decision; `reason` is `None` for an allow.
    pub fn decision(&self, method: Option<AuthMethod>, reason: Option<Reason>) {
        let m = match method {
            Some(AuthMethod::Jwt) => 0,
            Some(AuthMethod::ApiKey) => 1,
            Some(AuthMethod::PublishableKey) => 2,
            None => 3,
        };
        let r = reason.map_or(0, |r| {
            1 + Reason::ALL.iter().position(|x| *x == r).unwrap_or(0)
        });
        self.decision_handles[m * (Reason::ALL.len() + 1) + r].inc();
    }

    pub fn cache_request(&self, cache: &'static str, result: &'static str) {
        self.cache_requests
            .with_label_values(&[cache, result])
            .inc();
    }

    fn key_lookup_counters(&self, store: StoreKind) -> &[IntCounter; 3] {
        let i = StoreKind::ALL
            .iter()
            .position(|s| *s == store)
            .expect("StoreKind::ALL lists every store");
        self.key_lookup_handles[i].get_or_init(|| {
            ["found", "not_found", "error"]
                .map(|r| self.key_lookups.with_label_values(&[store.as_str(), r]))
        })
    }

    /// Creates the store's lookup series at zero, so rates work before the first lookup.
    pub fn register_key_store(&self, store: StoreKind) {
        self.key_lookup_counters(store);
    }

    /// One key lookup: `Some(found)`, or `None` when the store failed.
    pub fn key_lookup(&self, store: StoreKind, found: Option<bool>) {
        let c = self.key_lookup_counters(store);
        match found {
            Some(true) => c[0].inc(),
            Some(false) => c[1].inc(),
            None => c[2].inc(),
        }
    }

    fn key_cache_counters(&self) -> &[IntCounter; 4] {
        self.key_cache_handles.get_or_init(|| {
            [
                ("keys", "hit"),
                ("keys", "stale"),
                ("keys", "miss"),
                ("negative_keys", "hit"),
            ]
            .map(|(c, r)| self.cache_requests.with_label_values(&[c, r]))
        })
    }

    /// Creates the key cache's series at zero; only an engine with a key cache calls it, so an
    /// in-memory store's deployment shows no key cache at all rather than one that never moves.
    pub fn register_key_cache(&self) {
        self.key_cache_counters();
    }

    /// How the key cache answered a lookup that found (or did not find) a key.
    pub fn key_cache(&self, outcome: CacheOutcome, found: bool) {
        let c = self.key_cache_counters();
        match (outcome, found) {
            (CacheOutcome::Hit, true) => c[0].inc(),
            (CacheOutcome::Hit, false) => c[3].inc(),
            (CacheOutcome::Stale, _) => c[1].inc(),
            (CacheOutcome::Miss, _) => c[2].inc(),
        }
    }

    /// Creates a provider's series at zero, so its rates and alerts work before the first event.
    pub fn register_provider(&self, provider: &str) {
        for result in ["success", "failure"] {
            self.jwks_refreshes.with_label_values(&[provider, result]);
        }
        self.jwks_keys.with_label_values(&[provider]);
        self.unknown_kid_fetches.with_label_values(&[provider]);
    }

    pub fn backend_error(&self, backend: &'static str, kind: &'static str) {
        self.backend_errors
            .with_label_values(&[backend, kind])
            .inc();
    }

    pub fn rate_limit_fallback(&self, mode: &'static str) {
        self.rate_limit_fallbacks.with_label_values(&[mode]).inc();
    }

    /// The breaker entered `to` (`open` or `closed`).
    pub fn redis_breaker_transition(&self, to: &'static str) {
        self.redis_breaker_transitions
            .with_label_values(&[to])
            .inc();
        self.redis_breaker_open.set((to == "open") as i64);
    }

    /// Redis was connected to again, for `reason`.
    pub fn redis_reconnect(&self, reason: RedisReconnect) {
        self.redis_reconnects
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// How often Redis was connected to again for `reason` (tests).
    #[cfg(test)]
    pub fn redis_reconnects_count(&self, reason: &str) -> u64 {
        self.redis_reconnects.with_label_values(&[reason]).get()
    }

    /// One denial line of `reason` left out.
    pub fn decision_log_suppressed(&self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.decision_log_suppressed[i].inc();
        }
    }

    pub fn jwks_refresh(&self, provider: &str, result: &'static str) {
        self.jwks_refreshes
            .with_label_values(&[provider, result])
            .inc();
    }

    pub fn jwks_keys(&self, provider: &str, keys: usize) {
        self.jwks_keys
            .with_label_values(&[provider])
            .set(keys as i64);
    }

    pub fn unknown_kid_fetch(&self, provider: &str) {
        self.unknown_kid_fetches
            .with_label_values(&[provider])
            .inc();
    }

    pub fn route_config_error(&self, key: &str) {
        self.route_config_errors.with_label_values(&[key]).inc();
    }

    /// `decisions` of known keys lost before reaching the usage record.
    pub fn usage_dropped(&self, reason: UsageDrop, decisions: u64) {
        if let Some(i) = UsageDrop::ALL.iter().position(|r| *r == reason) {
            self.usage_dropped[i].inc_by(decisions);
        }
    }

    /// One write of the usage counts; `result` is `ok` or `failed`.
    pub fn usage_flush(&self, result: &'static str) {
        self.usage_flushes.with_label_values(&[result]).inc();
    }

    /// A known secret key sent by a browser: `refused` by the policy, or let through.
    pub fn secret_key_from_browser(&self, refused: bool) {
        self.secret_key_from_browser[usize::from(!refused)].inc();
    }

    /// Every family this registry holds, including those with no series yet.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Every series as it stands now (families without series are left out).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Spans lost on their way to the collector; `reason` is `queue_full` or `export_failed`.
    pub fn trace_spans_dropped(&self, reason: &'static str, spans: u64) {
        self.trace_spans_dropped
            .with_label_values(&[reason])
            .inc_by(spans);
    }

    pub fn trace_spans_exported(&self, spans: u64) {
        self.trace_spans_exported.inc_by(spans);
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("Prometheus text is UTF-8")
    }
}

/// `build_info` (always 1, its labels the version and git commit) and, on Linux, the process's
/// CPU, memory, file descriptors and threads: every process that serves metrics has them (the
/// daemon, Envoy with the module, the key service).
pub fn process_collectors() -> Vec<Box<dyn prometheus::core::Collector>> {
    let build_info = IntGaugeVec::new(
        Opts::new(
            "build_info",
            "Always 1; labels carry the version and git commit.",
        ),
        &["version", "git_commit"],
    )
    .expect("valid metric");
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GYBC_GIT_COMMIT")])
        .set(1);
    let mut out: Vec<Box<dyn prometheus::core::Collector>> = vec![Box::new(build_info)];
    #[cfg(target_os = "linux")]
    out.push(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ));
    out
}

/// One metric family as declared: full name and label names. A host that cannot add metrics
/// later (Envoy freezes its stats after config load) declares these first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub name: String,
    pub labels: Vec<String>,
}

/// A registry that remembers what was registered: `Registry` can only list families that
/// already have a series.
struct Recording {
    inner: Registry,
    families: std::cell::RefCell<Vec<Family>>,
}

impl Recording {
    fn new(inner: Registry) -> Self {
        Self {
            inner,
            families: Default::default(),
        }
    }

    fn register(&self, c: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        // The registry adds its namespace when it gathers; a declared name must match.
        let families = c.desc().into_iter().map(|d| Family {
            name: format!("{NAMESPACE}_{}", d.fq_name),
            labels: d.variable_labels.clone(),
        });
        self.families.borrow_mut().extend(families);
        self.inner.register(c)
    }

    fn finish(self) -> (Registry, Vec<Family>) {
        (self.inner, self.families.into_inner())
    }
}
