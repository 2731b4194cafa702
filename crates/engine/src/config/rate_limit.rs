//! `rate_limit`: the default limit, the limiter's bounds, and where counting happens.

use serde::Deserialize;

use crate::ratelimit::RateLimit;

/// Rate limit for keys whose metadata names none.
pub const DEFAULT_RATE_LIMIT: &str = "100/60s";
/// Keys whose rate-limit state is held in memory at once (least recently used are dropped).
pub const DEFAULT_RATE_LIMIT_MAX_KEYS: u64 = 100_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Limit for keys whose metadata names none, `<requests>/<window>` (`100/60s`, `1000/1h`).
    pub default: RateLimit,
    /// Keys whose limiter state is held at once. Default 100000.
    pub max_keys: u64,
    /// Also send the IETF draft `RateLimit` and `RateLimit-Policy` fields. Default false.
    pub ietf_headers: bool,
    /// `local` (per replica, default) or `redis` (one limit across the fleet; section `redis`).
    pub backend: RateLimitBackend,
    /// With `backend: redis`, what happens while Redis cannot answer: `fail_open` (default) counts
    /// against this replica's local limiter; `fail_closed` answers 503 `unavailable`.
    pub failure_mode: FailureMode,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    #[default]
    FailOpen,
    FailClosed,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            default: DEFAULT_RATE_LIMIT.parse().expect("valid default"),
            max_keys: DEFAULT_RATE_LIMIT_MAX_KEYS,
            ietf_headers: false,
            backend: RateLimitBackend::Local,
            failure_mode: FailureMode::FailOpen,
        }
    }
}

impl RateLimitConfig {
    /// Every problem of the section, each against its field under `rate_limit.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        if self.max_keys == 0 {
            err("rate_limit.max_keys".into(), "must be at least 1".into());
        }
    }
}
