//! What the parts report to `observe`, as plain data: a token lookup's outcome, a key lookup's
//! store and cache outcome, why a key store or Redis gave no answer, which dependency failed,
//! why Redis was connected to again.
//! Defined here, below every part that reports them and below the observer, so that `observe`
//! and `metrics` import nothing they observe.

use std::time::Duration;

/// Which dependency failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    KeyStore,
    Jwks,
    RateLimit,
}

impl Backend {
    /// The `backend` label of `backend_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::KeyStore => "key_store",
            Backend::Jwks => "jwks",
            Backend::RateLimit => "rate_limit",
        }
    }
}

/// How `JwtVerifier::verify` was answered, for the cache metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLookup {
    /// A verified token, from the cache.
    Hit,
    /// A token refused recently, refused again from the cache.
    RejectedHit,
    /// Verified (or refused) afresh.
    Miss,
}

/// Which store answers lookups: the `store` label of `key_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// No store configured: every key is unknown.
    None,
    /// The key file.
    File,
    /// Keys built in memory (dev mode, tests).
    Memory,
    /// Redis (or a test's stand-in for a remote store), behind the key cache.
    Redis,
}

impl StoreKind {
    pub const ALL: [StoreKind; 4] = [
        StoreKind::None,
        StoreKind::File,
        StoreKind::Memory,
        StoreKind::Redis,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::None => "none",
            StoreKind::File => "file",
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
        }
    }
}

/// How a lookup through the key cache was answered, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Stale,
    Miss,
}

/// Why a store could not answer. "Not found" is not an error: it is `Ok(None)`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// Not asked: the Redis circuit breaker is open, so the answer is at once, not a timeout later.
    #[error("key store unavailable: Redis circuit breaker open")]
    BreakerOpen,
}

/// Why a command through `Redis::run` got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisFailure {
    /// Not sent: the breaker is open.
    #[error("Redis circuit breaker open")]
    BreakerOpen,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Error(String),
}

impl RedisFailure {
    /// A bounded code for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RedisFailure::BreakerOpen => "breaker_open",
            RedisFailure::Timeout(_) => "timeout",
            RedisFailure::Error(_) => "error",
        }
    }
}

/// Why the engine connected to Redis again: the `reason` label of `redis_reconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisReconnect {
    /// Another node is the primary now: the sentinels named a new one, or a cluster shard's
    /// replica took over.
    Failover,
    /// A node answered `READONLY` (a write reached a primary demoted to replica): connected again
    /// to whatever is the primary now.
    Readonly,
    /// The connection to the primary broke (a reset, a node that went away) and was made again.
    ConnectionLost,
    /// The key-events subscription was made again, on the same node or another one; the key
    /// cache was marked stale, as events may have been missed.
    Subscription,
}

impl RedisReconnect {
    pub const ALL: [RedisReconnect; 4] = [
        RedisReconnect::Failover,
        RedisReconnect::Readonly,
        RedisReconnect::ConnectionLost,
        RedisReconnect::Subscription,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RedisReconnect::Failover => "failover",
            RedisReconnect::Readonly => "readonly",
            RedisReconnect::ConnectionLost => "connection_lost",
            RedisReconnect::Subscription => "subscription",
        }
    }
}

/// Why counted decisions of a key were lost before reaching the usage record: the `reason` label
/// of `usage_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageDrop {
    /// Not counted: `usage.max_keys_per_interval` distinct keys were counted in the interval.
    KeyCap,
    /// Counted, but `usage.max_held_entries` were held already (Redis unwritable for long).
    HeldFull,
    /// Sent to Redis without an answer, and retried for as long as a retry cannot count twice.
    Expired,
    /// No Redis to write to (a key file without a Redis limiter): nothing is held.
    NoRedis,
}

impl UsageDrop {
    pub const ALL: [UsageDrop; 4] = [
        UsageDrop::KeyCap,
        UsageDrop::HeldFull,
        UsageDrop::Expired,
        UsageDrop::NoRedis,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UsageDrop::KeyCap => "key_cap",
            UsageDrop::HeldFull => "held_full",
            UsageDrop::Expired => "expired",
            UsageDrop::NoRedis => "no_redis",
        }
    }
}
