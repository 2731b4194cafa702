//! Events: each call emits the log line and the metric of one thing that happened, so they cannot
//! drift. Fields are ids and bounded codes only: never a key, a token or an `Authorization` value.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tracing::Level;

use crate::clock::{Clock, SystemClock};
use crate::config::{DecisionLevel, LogConfig, SecretKeyFromBrowser};
use crate::decision::{Decision, Reason};
use crate::event::{
    Backend, CacheOutcome, RedisFailure, RedisReconnect, StoreError, StoreKind, TokenLookup,
    UsageDrop,
};
use crate::metrics::Metrics;
use crate::request::RequestContext;

/// The events sink every component reports to.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    allow_level: DecisionLevel,
    deny_level: DecisionLevel,
    deny_lines: DenyLineBudget,
    /// Times the deny-line windows; the engine's clock, so tests step it.
    clock: Arc<dyn Clock>,
    redis_state: AtomicI64,
}

impl Default for Observer {
    fn default() -> Self {
        Self::new(Arc::new(Metrics::new()), &LogConfig::default())
    }
}

impl Observer {
    pub fn new(metrics: Arc<Metrics>, log: &LogConfig) -> Self {
        Self {
            metrics,
            allow_level: log.allow_level,
            deny_level: log.deny_level,
            deny_lines: DenyLineBudget::new(log.deny_lines_per_sec),
            clock: Arc::new(SystemClock),
            redis_state: AtomicI64::new(-1),
        }
    }

    /// Times the per-second budget of denial lines by `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// One Check decided: the decision counter, the latency histogram and the decision log line.
    pub fn decision(&self, ctx: &RequestContext, decision: &Decision, latency: Duration) {
        let (level, reason, detail, who) = match decision {
            Decision::Allow(g) => (
                self.allow_level,
                None,
                None,
                g.identity.as_ref().map_or((None, None, None), |i| {
                    (Some(i.method), i.tenant.as_deref(), i.key_id.as_deref())
                }),
            ),
            Decision::Deny(d) => (
                self.deny_level,
                Some(d.reason),
                d.detail,
                d.who.as_deref().map_or((None, None, None), |w| {
                    (Some(w.method), w.tenant.as_deref(), w.key_id.as_deref())
                }),
            ),
        };
        self.metrics.decision(who.0, reason);
        self.metrics.check_duration.observe(latency.as_secs_f64());
        let enabled = match level {
            DecisionLevel::Off => false,
            DecisionLevel::Debug => tracing::enabled!(target: DECISION_TARGET, Level::DEBUG),
            DecisionLevel::Info => tracing::enabled!(target: DECISION_TARGET, Level::INFO),
            DecisionLevel::Warn => tracing::enabled!(target: DECISION_TARGET, Level::WARN),
        };
        if !enabled {
            return;
        }
        // Only denials are budgeted: allows are the traffic itself, and their level says
        // whether to log them at all.
        let suppressed = match reason {
            None => None,
            Some(r) => match self.deny_lines.admit(r, self.clock.now_secs()) {
                Some(0) => None,
                Some(n) => Some(n),
                None => {
                    self.metrics.decision_log_suppressed(r);
                    return;
                }
            },
        };
        macro_rules! emit {
            ($lvl:ident) => {
                tracing::$lvl!(
                    target: DECISION_TARGET,
                    request_id = ctx.request_id.as_deref().unwrap_or(""),
                    http_method = %ctx.method,
                    outcome = decision.outcome(),
                    reason = reason.map_or("ok", |r| r.as_str()),
                    detail = detail.unwrap_or(""),
                    auth_method = who.0.map_or("", |m| m.as_str()),
                    tenant = who.1.unwrap_or(""),
                    key_id = who.2.unwrap_or(""),
                    latency_us = latency.as_micros() as u64,
                    suppressed,
                    "Decision."
                )
            };
        }
        match level {
            DecisionLevel::Off => {}
            DecisionLevel::Debug => emit!(debug),
            DecisionLevel::Info => emit!(info),
            DecisionLevel::Warn => emit!(warn),
        }
    }

    /// A key lookup answered, by the store directly or (`cache`) through the key cache.
    pub fn key_lookup(&self, store: StoreKind, cache: Option<CacheOutcome>, found: bool) {
        self.metrics.key_lookup(store, Some(found));
        if let Some(outcome) = cache {
            self.metrics.key_cache(outcome, found);
        }
    }

    /// A key lookup the store could not answer (its error is reported apart, as a backend error).
    pub fn key_lookup_failed(&self, store: StoreKind) {
        self.metrics.key_lookup(store, None);
    }

    /// A token verification answered by the cache (or not).
    pub fn token_lookup(&self, lookup: TokenLookup) {
        let (cache, result) = match lookup {
            TokenLookup::Hit => ("jwt", "hit"),
            TokenLookup::RejectedHit => ("rejected_jwt", "hit"),
            TokenLookup::Miss => ("jwt", "miss"),
        };
        self.metrics.cache_request(cache, result);
    }

    /// A dependency failed a request; `kind` is a bounded code.
    pub fn backend_error(
        &self,
        backend: Backend,
        kind: &'static str,
        error: &dyn std::fmt::Display,
    ) {
        self.metrics.backend_error(backend.as_str(), kind);
        tracing::warn!(backend = backend.as_str(), kind, error = %error, "Backend error.");
    }

    /// A key lookup failed; `kind` is a bounded code. While the breaker is open the failure is
    /// counted but not logged: the breaker logged once when it opened.
    pub fn key_store_error(&self, kind: &'static str, error: &StoreError) {
        match error {
            StoreError::BreakerOpen => self
                .metrics
                .backend_error(Backend::KeyStore.as_str(), "breaker_open"),
            e => self.backend_error(Backend::KeyStore, kind, e),
        }
    }

    /// Redis could not count a request; `counted_locally` tells which failure mode answered.
    /// While the breaker is open the fallback is counted but not logged.
    pub fn rate_limit_fallback(&self, counted_locally: bool, failure: &RedisFailure) {
        let kind = failure.kind();
        self.metrics
            .backend_error(Backend::RateLimit.as_str(), kind);
        self.metrics
            .rate_limit_fallback(if counted_locally { "local" } else { "denied" });
        match (failure, counted_locally) {
            (RedisFailure::BreakerOpen, _) => {}
            (_, true) => {
                tracing::warn!(kind, error = %failure, "Redis rate limiter unavailable; counting on this replica.")
            }
            (_, false) => {
                tracing::warn!(kind, error = %failure, "Redis rate limiter unavailable; failing closed.")
            }
        }
    }

    /// `failures` Redis timeouts or errors in a row, the last of `kind`: the replica stops
    /// waiting on Redis until a probe is answered.
    pub fn redis_breaker_opened(
        &self,
        failures: u32,
        kind: &'static str,
        error: &dyn std::fmt::Display,
    ) {
        self.metrics.redis_breaker_transition("open");
        tracing::warn!(
            failures,
            kind,
            error = %error,
            "Redis circuit breaker open: Redis is not asked until a probe is answered; uncached keys get 503, rate limits follow the failure mode."
        );
    }

    /// A probe of the open breaker was answered: Redis is used again.
    pub fn redis_breaker_closed(&self, open_for: Duration, probes: u32) {
        self.metrics.redis_breaker_transition("closed");
        tracing::info!(
            open_ms = open_for.as_millis() as u64,
            probes,
            "Redis circuit breaker closed: Redis answered a probe."
        );
    }

    /// Redis was connected to again. A failover (`from` one primary `to` another) is one warning
    /// per primary replaced: what an operator looks for after an alert; the rest is routine.
    pub fn redis_reconnected(&self, reason: RedisReconnect, from: Option<&str>, to: &str) {
        self.metrics.redis_reconnect(reason);
        match reason {
            RedisReconnect::Failover => tracing::warn!(
                reason = reason.as_str(),
                from = from.unwrap_or("-"),
                to,
                "Redis failover seen: another node is the primary now; commands go to it."
            ),
            RedisReconnect::Subscription => tracing::info!(
                reason = reason.as_str(),
                node = to,
                "Subscribed to key events again; cached keys are marked stale, as events may have been missed."
            ),
            _ => tracing::info!(
                reason = reason.as_str(),
                node = to,
                "Connected to the Redis primary again."
            ),
        }
    }

    /// A provider's signing keys were fetched.
    pub fn jwks_loaded(&self, provider: &str, keys: usize) {
        self.metrics.jwks_refresh(provider, "success");
        self.metrics.jwks_keys(provider, keys);
        tracing::info!(provider, keys, "Signing keys loaded.");
    }

    /// A provider's key fetch failed; `held` keys keep serving.
    pub fn jwks_failed(&self, provider: &str, held: usize, error: &dyn std::fmt::Display) {
        self.metrics.jwks_refresh(provider, "failure");
        self.metrics.backend_error(Backend::Jwks.as_str(), "fetch");
        if held == 0 {
            tracing::error!(provider, error = %error, "No signing keys yet; tokens of this provider cannot be verified.");
        } else {
            tracing::warn!(provider, held, error = %error, "Key refresh failed; the last good keys keep serving.");
        }
    }

    /// A token named an unknown kid and a fetch was started for it.
    pub fn unknown_kid_fetch(&self, provider: &str) {
        self.metrics.unknown_kid_fetch(provider);
    }

    /// A route's `context_extensions` are wrong: the request is refused until the operator fixes
    /// the Envoy route.
    pub fn route_config_error(&self, e: &crate::route::RouteError) {
        self.metrics.route_config_error(&e.key);
        tracing::error!(key = %e.key, why = e.why, "Invalid per-route setting in Envoy's context_extensions; requests on this route are refused.");
    }

    /// A known secret key arrived from a browser (an `Origin` header) and `policy` applied. Only
    /// counted: a refusal has its decision line (`secret_key_in_browser`, with the key id), and
    /// an allowed one is traffic the operator chose to let through, which a line per request
    /// would flood the log with; the metric is what to alert on.
    pub fn secret_key_from_browser(&self, policy: SecretKeyFromBrowser) {
        self.metrics
            .secret_key_from_browser(policy == SecretKeyFromBrowser::Deny);
    }

    /// A check panicked and its door answered 503 instead; the door's runtime printed the panic.
    pub fn panicked(&self) {
        self.metrics.panics.inc();
        tracing::error!("A check panicked; it was answered 503 unavailable.");
    }

    /// The usage counts were written to Redis: `entries` (key, hour) hashes added to.
    pub fn usage_flushed(&self, entries: usize) {
        self.metrics.usage_flush("ok");
        tracing::debug!(entries, "Usage counts written.");
    }

    /// Writing the usage counts failed; `held` entries wait for the next flush. While the
    /// breaker is open the failure is counted but not logged: the breaker logged once.
    pub fn usage_flush_failed(&self, written: usize, held: usize, failure: &RedisFailure) {
        self.metrics.usage_flush("failed");
        if !matches!(failure, RedisFailure::BreakerOpen) {
            tracing::warn!(written, held, kind = failure.kind(), error = %failure, "Usage counts not written; held for the next flush.");
        }
    }

    /// `decisions` of known keys will never reach the usage record.
    pub fn usage_dropped(&self, reason: UsageDrop, decisions: u64) {
        self.metrics.usage_dropped(reason, decisions);
        // Without Redis nothing is ever recorded: said once at start, not every interval.
        if reason == UsageDrop::NoRedis {
            return;
        }
        tracing::warn!(
            reason = reason.as_str(),
            decisions,
            "Usage counts lost; they are counted in gybc_authz_usage_dropped_total."
        );
    }

    /// (key, hour) usage entries in memory after a flush.
    pub fn usage_entries(&self, entries: usize) {
        self.metrics.usage_entries.set(entries as i64);
    }

    /// Result of a Redis health check; logs only changes.
    pub fn redis_health(&self, up: bool) {
        self.metrics.redis_connected.set(up as i64);
        let before = self.redis_state.swap(up as i64, Ordering::Relaxed);
        if before != up as i64 {
            if up {
                tracing::info!("Redis reachable.");
            } else {
                tracing::error!(
                    "Redis unreachable: uncached keys get 503; rate limits follow the failure mode."
                );
            }
        }
    }
}

/// Target of the per-decision log line.
const DECISION_TARGET: &str = "gybc_authz::decision";

// === impl DenyLineBudget ===

/// At most `per_sec` denial lines per second for each reason, in fixed one-second windows. Two
/// atomics per reason and no lock, since a flood of denials is exactly when this runs hottest.
struct DenyLineBudget {
    per_sec: u32,
    /// Per reason, in `Reason::ALL` order: the window's second (low 32 bits of Unix seconds) in
    /// the high half, lines written in it in the low half.
    windows: [AtomicU64; Reason::ALL.len()],
    /// Per reason: lines left out since the last one written.
    held: [AtomicU64; Reason::ALL.len()],
}

impl DenyLineBudget {
    fn new(per_sec: u32) -> Self {
        Self {
            per_sec: per_sec.max(1),
            windows: std::array::from_fn(|_| AtomicU64::new(0)),
            held: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// `Some(n)`: write the line, reporting `n` lines left out before it. `None`: leave it out
    /// (it is counted, and reported on the next line written for `reason`).
    fn admit(&self, reason: Reason, now_secs: u64) -> Option<u64> {
        let i = Reason::ALL.iter().position(|r| *r == reason)?;
        let second = now_secs & 0xffff_ffff;
        let window = &self.windows[i];
        let mut current = window.load(Ordering::Relaxed);
        loop {
            let next = if current >> 32 != second {
                (second << 32) | 1
            } else if (current & 0xffff_ffff) < u64::from(self.per_sec) {
                current + 1
            } else {
                self.held[i].fetch_add(1, Ordering::Relaxed);
                return None;
            };
            match window.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        let held = &self.held[i];
        Some(if held.load(Ordering::Relaxed) == 0 {
            0
        } else {
            held.swap(0, Ordering::Relaxed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_lines_are_bounded_per_reason_per_second_and_the_rest_is_reported() {
        let budget = DenyLineBudget::new(3);
        let t = 1_700_000_000;
        let written: Vec<_> = (0..5)
            .map(|_| budget.admit(Reason::InvalidApiKey, t))
            .collect();
        assert_eq!(written, [Some(0), Some(0), Some(0), None, None]);
        // Another reason has its own budget.
        assert_eq!(budget.admit(Reason::MissingCredentials, t), Some(0));
        // The next second: the first line carries what was left out.
        assert_eq!(budget.admit(Reason::InvalidApiKey, t + 1), Some(2));
        assert_eq!(budget.admit(Reason::InvalidApiKey, t + 1), Some(0));
        // A quiet reason reports nothing.
        assert_eq!(budget.admit(Reason::MissingCredentials, t + 5), Some(0));
    }

    #[test]
    fn every_denial_is_either_written_or_counted_under_contention() {
        let budget = Arc::new(DenyLineBudget::new(100));
        let t = 42;
        let (written, reported): (usize, u64) = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let b = budget.clone();
                    s.spawn(move || {
                        let mut w = (0, 0);
                        for _ in 0..1_000 {
                            if let Some(n) = b.admit(Reason::RateLimited, t) {
                                w.0 += 1;
                                w.1 += n;
                            }
                        }
                        w
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        });
        assert_eq!(written, 100, "exactly the budget within one second");
        assert_eq!(reported, 0, "nothing reported before the window turns");
        assert_eq!(budget.admit(Reason::RateLimited, t + 1), Some(3_900));
    }

    #[test]
    fn the_observer_counts_what_it_leaves_out_and_reports_it_on_the_next_line() {
        use crate::clock::ManualClock;
        use crate::decision::Denial;

        let clock = Arc::new(ManualClock::at_secs(1_700_000_000));
        let log = LogConfig {
            deny_lines_per_sec: 2,
            ..LogConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let observer = Observer::new(metrics.clone(), &log).with_clock(clock.clone());
        let lines = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(Level::INFO)
            .with_writer(lines.clone())
            .finish();
        let ctx = RequestContext::default();
        let deny = Decision::Deny(Denial::new(Reason::InvalidApiKey));
        let allow = Decision::Allow(crate::decision::Grant {
            identity: None,
            rate: None,
        });
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..5 {
                observer.decision(&ctx, &deny, Duration::ZERO);
            }
            for _ in 0..5 {
                observer.decision(&ctx, &allow, Duration::ZERO);
            }
            clock.advance(Duration::from_secs(1));
            observer.decision(&ctx, &deny, Duration::ZERO);
        });
        let text = lines.text();
        let denials: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["fields"]["reason"] == "invalid_api_key")
            .collect();
        assert_eq!(denials.len(), 3, "{text}");
        assert!(denials[0]["fields"].get("suppressed").is_none());
        assert!(denials[1]["fields"].get("suppressed").is_none());
        assert_eq!(denials[2]["fields"]["suppressed"], 3);
        // Allows are not budgeted (and are below the info filter at their default level).
        let rendered = metrics.render();
        assert!(
            rendered
                .contains("gybc_authz_decision_log_suppressed_total{reason=\"invalid_api_key\"} 3"),
            "{rendered}"
        );
        // Every denial is still counted in decisions_total, logged or not.
        assert!(rendered.contains(
            "gybc_authz_decisions_total{method=\"none\",outcome=\"deny\",reason=\"invalid_api_key\"} 6"
        ));
    }

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Self;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }
}
