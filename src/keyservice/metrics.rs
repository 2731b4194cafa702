//! The key service's metrics, in one struct on its own registry (the key service is a process of
//! its own), served as Prometheus text on its admin port's `/metrics`. Label values are the API's
//! method names and the error codes of its answers, both fixed sets: never a tenant, a caller or
//! a key id.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

const NAMESPACE: &str = "gybc_authz";

/// Request latency buckets: 1 ms to 10 s (a store write is a few Redis round trips; a timeout is
/// `key_service.request_timeout_ms`, at most 60 s, and lands in `+Inf`).
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `method` label of a request whose path names no method.
pub const UNKNOWN_METHOD: &str = "unknown";

/// Every outcome a request may have: `ok`, or the `code` of its error answer.
pub const OUTCOMES: [&str; 12] = [
    "ok",
    "invalid_argument",
    "unauthenticated",
    "permission_denied",
    "not_found",
    "failed_precondition",
    "aborted",
    "resource_exhausted",
    "unimplemented",
    "unavailable",
    "deadline_exceeded",
    "internal",
];

/// Kinds of key-store failure a request met.
pub const STORE_ERRORS: [&str; 2] = ["unavailable", "write"];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    store_errors: IntCounterVec,
    /// 1 while the last readiness check reached the key store.
    pub store_up: IntGauge,
}

impl Metrics {
    /// Every series of every method exists from the start, so rates and ratios work at once.
    pub fn new(methods: &[&'static str]) -> Self {
        let registry = Registry::new_custom(Some(NAMESPACE.into()), None).expect("valid namespace");
        let requests = IntCounterVec::new(
            Opts::new(
                "key_service_requests_total",
                "Key service requests by method (the path's last segment, or unknown) and outcome (ok, or the error's code).",
            ),
            &["method", "outcome"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "key_service_request_duration_seconds",
                "Time to answer one key service request, by method.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "key_service_store_errors_total",
                "Key store failures the key service's requests met, by kind (unavailable: not reached or timed out; write: refused the write).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let store_up = IntGauge::new(
            "key_service_store_up",
            "1 while the key service's last readiness check (every second) reached the key store, else 0.",
        )
        .expect("valid metric");
        let own: [Box<dyn prometheus::core::Collector>; 4] = [
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(store_errors.clone()),
            Box::new(store_up.clone()),
        ];
        for c in own
            .into_iter()
            .chain(gybc_authz_engine::metrics::process_collectors())
        {
            registry.register(c).expect("unique metric");
        }
        for m in methods.iter().copied().chain([UNKNOWN_METHOD]) {
            requests.with_label_values(&[m, "ok"]);
            duration.with_label_values(&[m]);
        }
        for kind in STORE_ERRORS {
            store_errors.with_label_values(&[kind]);
        }
        Self {
            registry,
            requests,
            duration,
            store_errors,
            store_up,
        }
    }

    /// One answered request: its method, outcome (`ok` or a code from `OUTCOMES`) and time.
    pub fn request(&self, method: &'static str, outcome: &'static str, seconds: f64) {
        self.requests.with_label_values(&[method, outcome]).inc();
        self.duration.with_label_values(&[method]).observe(seconds);
    }

    /// A key-store failure; `kind` from `STORE_ERRORS`.
    pub fn store_error(&self, kind: &'static str) {
        self.store_errors.with_label_values(&[kind]).inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_series_from_the_start_and_counts_move() {
        let m = Metrics::new(&["create-key", "list-keys"]);
        let text = m.render();
        for family in [
            "gybc_authz_key_service_requests_total",
            "gybc_authz_key_service_request_duration_seconds",
            "gybc_authz_key_service_store_errors_total",
            "gybc_authz_key_service_store_up",
            "gybc_authz_build_info",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family}: {text}"
            );
        }
        m.request("create-key", "invalid_argument", 0.003);
        m.store_error("write");
        let text = m.render();
        assert!(text.contains(
            r#"gybc_authz_key_service_requests_total{method="create-key",outcome="invalid_argument"} 1"#
        ));
        assert!(text.contains(r#"gybc_authz_key_service_store_errors_total{kind="write"} 1"#));
        assert!(text.contains(
            r#"gybc_authz_key_service_request_duration_seconds_count{method="create-key"} 1"#
        ));
    }
}
