//! The fleet-wide limiter: GCRA state in Redis, updated by one Lua script per decision (one round
//! trip, atomic, on Redis's own clock so replicas agree). A key found over its limit is denied
//! locally until it may pass again, without asking Redis. When Redis cannot answer, or the
//! connection's circuit breaker is open, the configured failure mode decides at once: this
//! replica's local limiter, or 503.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use moka::sync::Cache;

use super::{
    LocalLimiter, RateLimit, RateLimitError, RateLimiter, RateStatus, gcra_params, gcra_status,
};
use crate::clock::Clock;
use crate::config::FailureMode;
use crate::event::RedisFailure;
use crate::observe::Observer;
use crate::otel::{ChildSpan, REDIS_RATE_LIMIT_SPAN};
use crate::redis_conn::Redis;

/// GCRA in microseconds (exact in Lua's doubles until the year 2255). Returns
/// `{allowed, tat_after_us, now_us}`; the key expires once its quota is fully back.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, tat, now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, new_tat, now}
"#;

pub struct RedisLimiter {
    redis: Redis,
    script: redis::Script,
    clock: Arc<dyn Clock>,
    failure_mode: FailureMode,
    fallback: Arc<LocalLimiter>,
    /// Keys known to be over their limit: the local time (ns) they may pass again, their TAT on
    /// Redis's clock, and Redis's clock minus ours (so local answers match Redis's headers).
    over: Cache<Arc<str>, (u64, u64, i128)>,
    observer: Arc<Observer>,
}

impl RedisLimiter {
    pub fn new(
        redis: Redis,
        clock: Arc<dyn Clock>,
        failure_mode: FailureMode,
        fallback: Arc<LocalLimiter>,
        max_keys: u64,
    ) -> Self {
        Self {
            redis,
            script: redis::Script::new(GCRA_LUA),
            clock,
            failure_mode,
            fallback,
            over: Cache::builder()
                .max_capacity(max_keys)
                .time_to_live(Duration::from_secs(86_400))
                .build(),
            observer: Arc::default(),
        }
    }

    /// Reports fallbacks to `observer`.
    pub fn with_observer(mut self, observer: Arc<Observer>) -> Self {
        self.observer = observer;
        self
    }

    async fn check_inner(
        &self,
        key_id: &str,
        limit: RateLimit,
    ) -> Result<RateStatus, RateLimitError> {
        let now = self.clock.now_nanos();
        if let Some((until, tat, skew)) = self.over.get(key_id) {
            if now < until {
                let redis_now = (now as i128 + skew).max(0) as u64;
                return Ok(gcra_status(false, tat, redis_now, limit));
            }
            self.over.invalidate(key_id);
        }
        let (interval, tolerance) = gcra_params(limit);
        let mut span = ChildSpan::client(REDIS_RATE_LIMIT_SPAN);
        span.set("db.system.name", "redis");
        let answer = self
            .redis
            .run(|mut conn| async move {
                let mut call = self.script.key(self.redis.names.rate_limit(key_id));
                call.arg(interval / 1_000).arg(tolerance / 1_000);
                call.invoke_async::<(u8, u64, u64)>(&mut conn).await
            })
            .await;
        match answer {
            Ok((allowed, tat_us, now_us)) => {
                // Redis's clock decides; headers are computed on it so every replica agrees.
                let (tat, redis_now) = (tat_us * 1_000, now_us * 1_000);
                let status = gcra_status(allowed == 1, tat, redis_now, limit);
                if allowed != 1 {
                    let wait = tat.saturating_sub(tolerance).saturating_sub(redis_now);
                    let skew = redis_now as i128 - now as i128;
                    self.over.insert(Arc::from(key_id), (now + wait, tat, skew));
                }
                Ok(status)
            }
            Err(failure) => {
                span.fail(failure.kind());
                self.fail(key_id, limit, failure)
            }
        }
    }

    fn fail(
        &self,
        key_id: &str,
        limit: RateLimit,
        failure: RedisFailure,
    ) -> Result<RateStatus, RateLimitError> {
        match self.failure_mode {
            FailureMode::FailOpen => {
                self.observer.rate_limit_fallback(true, &failure);
                Ok(self.fallback.check_now(key_id, limit))
            }
            FailureMode::FailClosed => {
                self.observer.rate_limit_fallback(false, &failure);
                Err(RateLimitError::Unavailable(failure.to_string()))
            }
        }
    }
}

impl RateLimiter for RedisLimiter {
    fn check<'a>(
        &'a self,
        key_id: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<RateStatus, RateLimitError>> {
        Box::pin(self.check_inner(key_id, limit))
    }
}
