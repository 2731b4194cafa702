//! Events: each call emits the log line and the metric of one thing that happened, so they cannot
//! drift. Fields are ids and bounded codes only: never a key, a token or an `Authorization` value.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::authn::jwt::TokenLookup;
use crate::config::{DecisionLevel, LogConfig};
use crate::decision::Decision;
use crate::metrics::Metrics;
use crate::request::RequestContext;
use crate::store::CacheOutcome;

/// Which dependency failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    KeyStore,
    Jwks,
    RateLimit,
}

impl Backend {
    fn as_str(self) -> &'static str {
        match self {
            Backend::KeyStore => "key_store",
            Backend::Jwks => "jwks",
            Backend::RateLimit => "rate_limit",
        }
    }
}

/// The events sink every component reports to.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    allow_level: DecisionLevel,
    deny_level: DecisionLevel,
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
            redis_state: AtomicI64::new(-1),
        }
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
        macro_rules! emit {
            ($lvl:ident) => {
                tracing::$lvl!(
                    target: "gybc_authz::decision",
                    request_id = ctx.request_id.as_deref().unwrap_or(""),
                    http_method = %ctx.method,
                    outcome = decision.outcome(),
                    reason = reason.map_or("ok", |r| r.as_str()),
                    detail = detail.unwrap_or(""),
                    auth_method = who.0.map_or("", |m| m.as_str()),
                    tenant = who.1.unwrap_or(""),
                    key_id = who.2.unwrap_or(""),
                    latency_us = latency.as_micros() as u64,
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

    /// A key lookup answered by the cache (or not).
    pub fn key_lookup(&self, outcome: CacheOutcome, found: bool) {
        let (cache, result) = match (outcome, found) {
            (CacheOutcome::Hit, true) => ("keys", "hit"),
            (CacheOutcome::Hit, false) => ("negative_keys", "hit"),
            (CacheOutcome::Stale, _) => ("keys", "stale"),
            (CacheOutcome::Miss, _) => ("keys", "miss"),
        };
        self.metrics.cache_request(cache, result);
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

    /// Redis could not count a request; `counted_locally` tells which failure mode answered.
    pub fn rate_limit_fallback(
        &self,
        counted_locally: bool,
        kind: &'static str,
        error: &dyn std::fmt::Display,
    ) {
        self.metrics
            .backend_error(Backend::RateLimit.as_str(), kind);
        if counted_locally {
            self.metrics.rate_limit_fallback("local");
            tracing::warn!(kind, error = %error, "Redis rate limiter unavailable; counting on this replica.");
        } else {
            self.metrics.rate_limit_fallback("denied");
            tracing::warn!(kind, error = %error, "Redis rate limiter unavailable; failing closed.");
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

    /// A check panicked and its door answered 503 instead; the door's runtime printed the panic.
    pub fn panicked(&self) {
        self.metrics.panics.inc();
        tracing::error!("A check panicked; it was answered 503 unavailable.");
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
