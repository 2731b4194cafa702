//! Rate limiting per API key: the limit type, the backend trait, and the answer every backend gives.

mod local;
mod redis;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Deserializer};

pub use local::LocalLimiter;
pub use redis::RedisLimiter;

/// `requests` per `window`, written `100/60s`, `10/1s`, `1000/1h`, `5000/1d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    pub requests: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate limit `{0}`: expected <requests>/<window> like 100/60s, 1000/1h (units s, m, h, d)"
)]
pub struct RateLimitParseError(pub String);

impl FromStr for RateLimit {
    type Err = RateLimitParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RateLimitParseError(s.to_owned());
        let (n, w) = s.trim().split_once('/').ok_or_else(bad)?;
        let requests: u32 = n.trim().parse().map_err(|_| bad())?;
        let w = w.trim();
        let split = w.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (count, unit) = w.split_at(split);
        let count: u64 = if count.is_empty() {
            1
        } else {
            count.parse().map_err(|_| bad())?
        };
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        let secs = count.checked_mul(unit_secs).ok_or_else(bad)?;
        if requests == 0 || secs == 0 || secs > 30 * 86_400 {
            return Err(bad());
        }
        Ok(RateLimit {
            requests,
            window: Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.requests, self.window.as_secs())
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a backend answers for one request: enough for every `X-RateLimit-*` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStatus {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Unix time (seconds) when the key's full quota is available again.
    pub reset_at: u64,
    /// Seconds from now until `reset_at` (for the IETF draft's relative `reset`).
    pub reset_after: u64,
    /// Seconds until the next request would be allowed; set on denial.
    pub retry_after: Option<u64>,
    /// The window, for the IETF `RateLimit-Policy` field.
    pub window_secs: u64,
}

const NANOS: u64 = 1_000_000_000;

/// GCRA parameters in nanoseconds: one request's share of the window, and the burst tolerance.
pub(crate) fn gcra_params(limit: RateLimit) -> (u64, u64) {
    let window = limit.window.as_nanos() as u64;
    let interval = (window / limit.requests as u64).max(1);
    (interval, window.saturating_sub(interval))
}

/// The headers' view of one GCRA decision, from the theoretical arrival time after it (allowed:
/// the new TAT; denied: the unchanged one) and the time it was made. Every backend answers
/// through here, so replicas and backends report identical numbers for identical state.
pub(crate) fn gcra_status(allowed: bool, tat: u64, now: u64, limit: RateLimit) -> RateStatus {
    let (interval, tolerance) = gcra_params(limit);
    let tat = tat.max(now);
    let ceil = |n: u64| n.div_ceil(NANOS);
    if allowed {
        let used = (tat - now).div_ceil(interval);
        RateStatus {
            allowed: true,
            limit: limit.requests,
            remaining: (limit.requests as u64).saturating_sub(used) as u32,
            reset_at: ceil(tat),
            reset_after: ceil(tat - now),
            retry_after: None,
            window_secs: limit.window.as_secs(),
        }
    } else {
        let allowed_at = tat.saturating_sub(tolerance).max(now);
        RateStatus {
            allowed: false,
            limit: limit.requests,
            remaining: 0,
            reset_at: ceil(tat),
            reset_after: ceil(tat - now),
            retry_after: Some(ceil(allowed_at - now).max(1)),
            window_secs: limit.window.as_secs(),
        }
    }
}

/// Why a backend could not answer (the Redis backend has these; the local one never fails).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate-limit backend unavailable: {0}")]
    Unavailable(String),
}

/// A rate-limit backend: counts one request for `key_id` against `limit`.
pub trait RateLimiter: Send + Sync {
    fn check<'a>(
        &'a self,
        key_id: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<RateStatus, RateLimitError>>;

    /// The same count, for a backend that never waits: answered here, without boxing a future
    /// per request. `None`: use `check`.
    fn check_in_memory(&self, _key_id: &str, _limit: RateLimit) -> Option<RateStatus> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_limits() {
        let l: RateLimit = "100/60s".parse().unwrap();
        assert_eq!(l.requests, 100);
        assert_eq!(l.window, Duration::from_secs(60));
        assert_eq!("10/m".parse::<RateLimit>().unwrap().window.as_secs(), 60);
        assert_eq!(
            "1000/1h".parse::<RateLimit>().unwrap().window.as_secs(),
            3600
        );
        assert_eq!(
            "5/2d".parse::<RateLimit>().unwrap().window.as_secs(),
            172_800
        );
        assert_eq!(l.to_string(), "100/60s");
        for bad in [
            "",
            "100",
            "0/60s",
            "100/0s",
            "100/60",
            "x/60s",
            "100/60x",
            "-1/60s",
            "100/99999d",
        ] {
            assert!(
                bad.parse::<RateLimit>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }
}
