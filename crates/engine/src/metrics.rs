//! Every metric, in one struct on one registry, served as Prometheus text on `/metrics`. Label
//! values are bounded `&'static str`s from enums (and provider names from the config): never a
//! tenant, a user, a key id or a path.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::decision::{AuthMethod, Reason};

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
    /// Resolved once: [method][0 = ok, 1.. = Reason::ALL], so a decision costs one atomic add.
    decision_handles: Vec<IntCounter>,
    pub check_duration: Histogram,
    cache_requests: IntCounterVec,
    backend_errors: IntCounterVec,
    rate_limit_fallbacks: IntCounterVec,
    jwks_refreshes: IntCounterVec,
    jwks_keys: IntGaugeVec,
    pub redis_connected: IntGauge,
    unknown_kid_fetches: IntCounterVec,
    route_config_errors: IntCounterVec,
    pub panics: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some(NAMESPACE.into()), None).expect("valid namespace");
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
            "In-process cache lookups by cache (keys, negative_keys, jwt, rejected_jwt) and result (hit, stale, miss).",
            &["cache", "result"],
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
        let build_info = IntGaugeVec::new(
            Opts::new(
                "build_info",
                "Always 1; labels carry the version and git commit.",
            ),
            &["version", "git_commit"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GYBC_GIT_COMMIT")])
            .set(1);
        #[cfg(target_os = "linux")]
        {
            let _ = registry.register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        }

        let mut decision_handles = Vec::with_capacity(METHODS.len() * (Reason::ALL.len() + 1));
        for method in METHODS {
            decision_handles.push(decisions.with_label_values(&[method, "allow", "ok"]));
            for r in Reason::ALL {
                decision_handles.push(decisions.with_label_values(&[method, "deny", r.as_str()]));
            }
        }
        let m = Self {
            registry,
            decision_handles,
            check_duration,
            cache_requests,
            backend_errors,
            rate_limit_fallbacks,
            jwks_refreshes,
            jwks_keys,
            redis_connected,
            unknown_kid_fetches,
            route_config_errors,
            panics,
        };
        // Every decision series exists from the start (above), so rates and ratios work at once.
        for (cache, result) in [
            ("keys", "hit"),
            ("keys", "stale"),
            ("keys", "miss"),
            ("negative_keys", "hit"),
            ("jwt", "hit"),
            ("jwt", "miss"),
            ("rejected_jwt", "hit"),
        ] {
            m.cache_requests.with_label_values(&[cache, result]);
        }
        for mode in ["local", "denied"] {
            m.rate_limit_fallbacks.with_label_values(&[mode]);
        }
        for (backend, kind) in [
            ("key_store", "unavailable"),
            ("key_store", "refresh"),
            ("jwks", "fetch"),
            ("rate_limit", "error"),
            ("rate_limit", "timeout"),
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

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("Prometheus text is UTF-8")
    }
}
