//! In-memory GCRA limiter: exact per replica, O(1) state per key, bounded memory. A key may burst
//! up to its limit, then gets one request per `window / limit`; never the instant second burst a
//! fixed window allows at its edge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use moka::sync::Cache;

use super::{RateLimit, RateLimitError, RateLimiter, RateStatus, gcra_params, gcra_status};
use crate::clock::Clock;

/// GCRA keeps one number per key, the theoretical arrival time (TAT): the instant at which the
/// key's bucket would be empty again. A request at `now` is allowed while `TAT - now` stays within
/// the burst tolerance `window - interval`: a burst of at most `requests`, then a steady rate.
pub struct LocalLimiter {
    clock: Arc<dyn Clock>,
    // Least-recently used keys are dropped at the bound; a dropped key starts afresh, which only
    // ever errs towards allowing, and only for keys idle longer than the others.
    cells: Cache<Arc<str>, Arc<AtomicU64>>,
}

impl LocalLimiter {
    pub fn new(clock: Arc<dyn Clock>, max_keys: u64) -> Self {
        Self {
            clock,
            cells: Cache::builder()
                .max_capacity(max_keys)
                // A key idle for a day has a fully restored quota anyway (windows are at most 30 days,
                // but longer windows are rare; losing their state errs towards allowing).
                .time_to_idle(Duration::from_secs(86_400))
                .build(),
        }
    }

    /// The decision, synchronously: the local backend never waits on anything.
    pub fn check_now(&self, key_id: &str, limit: RateLimit) -> RateStatus {
        let cell = match self.cells.get(key_id) {
            Some(c) => c,
            None => self
                .cells
                .get_with(Arc::from(key_id), || Arc::new(AtomicU64::new(0))),
        };
        let now = self.clock.now_nanos();
        let (interval, tolerance) = gcra_params(limit);
        let mut current = cell.load(Ordering::Acquire);
        loop {
            let tat = current.max(now);
            if tat - now > tolerance {
                return gcra_status(false, tat, now, limit);
            }
            let new_tat = tat + interval;
            match cell.compare_exchange_weak(current, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return gcra_status(true, new_tat, now, limit),
                Err(actual) => current = actual,
            }
        }
    }
}

impl RateLimiter for LocalLimiter {
    fn check<'a>(
        &'a self,
        key_id: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, Result<RateStatus, RateLimitError>> {
        futures_util::future::ready(Ok(self.check_now(key_id, limit))).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn limiter(start_secs: u64) -> (Arc<ManualClock>, LocalLimiter) {
        let clock = Arc::new(ManualClock::at_secs(start_secs));
        (clock.clone(), LocalLimiter::new(clock, 1000))
    }

    fn lim(s: &str) -> RateLimit {
        s.parse().unwrap()
    }

    #[test]
    fn allows_exactly_the_limit_then_denies() {
        let (_, l) = limiter(1_000);
        for i in 0..10 {
            let s = l.check_now("k", lim("10/60s"));
            assert!(s.allowed, "request {i}");
            assert_eq!(s.remaining, 9 - i);
            assert_eq!(s.limit, 10);
        }
        let s = l.check_now("k", lim("10/60s"));
        assert!(!s.allowed);
        assert_eq!(s.remaining, 0);
        // One request's worth of quota (6 s) must drain before the next is allowed.
        assert_eq!(s.retry_after, Some(6));
        assert_eq!(s.reset_at, 1_060);
    }

    #[test]
    fn no_double_burst_at_a_window_edge() {
        let (clock, l) = limiter(1_000);
        // Spend the whole quota just before a fixed window's edge...
        clock.advance(Duration::from_millis(59_900));
        let allowed = (0..10)
            .filter(|_| l.check_now("k", lim("10/60s")).allowed)
            .count();
        assert_eq!(allowed, 10);
        // ...and just after it a fixed window would allow 10 more; GCRA allows none yet.
        clock.advance(Duration::from_millis(200));
        assert!(!l.check_now("k", lim("10/60s")).allowed);
        // After a full burst, quota returns one request per interval (6 s), not a window at once.
        clock.advance(Duration::from_secs(6));
        assert!(l.check_now("k", lim("10/60s")).allowed);
        assert!(!l.check_now("k", lim("10/60s")).allowed);
    }

    #[test]
    fn quota_restores_over_time_and_keys_are_independent() {
        let (clock, l) = limiter(5_000);
        for _ in 0..3 {
            assert!(l.check_now("a", lim("3/3s")).allowed);
        }
        assert!(!l.check_now("a", lim("3/3s")).allowed);
        assert!(
            l.check_now("b", lim("3/3s")).allowed,
            "another key has its own quota"
        );
        clock.advance(Duration::from_secs(3));
        let s = l.check_now("a", lim("3/3s"));
        assert!(s.allowed);
        assert_eq!(s.remaining, 2);
    }

    #[test]
    fn memory_is_bounded() {
        let clock = Arc::new(ManualClock::at_secs(1));
        let l = LocalLimiter::new(clock, 100);
        for i in 0..10_000 {
            l.check_now(&format!("key-{i}"), lim("5/1s"));
        }
        l.cells.run_pending_tasks();
        assert!(
            l.cells.entry_count() <= 100,
            "{} cells held",
            l.cells.entry_count()
        );
    }
}
