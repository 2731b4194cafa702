//! In-memory GCRA limiter: exact per replica, O(1) state per key, bounded memory. A key may burst
//! up to its limit, then gets one request per `window / limit`; never the instant second burst a
//! fixed window allows at its edge.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use foldhash::fast::RandomState;
use futures_util::future::{BoxFuture, FutureExt};

use super::{RateLimit, RateLimitError, RateLimiter, RateStatus, gcra_params, gcra_status};
use crate::clock::Clock;

/// GCRA keeps one number per key, the theoretical arrival time (TAT): the instant at which the
/// key's bucket would be empty again. A request at `now` is allowed while `TAT - now` stays within
/// the burst tolerance `window - interval`: a burst of at most `requests`, then a steady rate.
///
/// The state is 16 bytes per key in plain hash tables (a cache entry with its bookkeeping costs
/// about 400): with a key file of 100,000 keys every key may hold a cell, and the pod pays for
/// each. A cell whose TAT has passed carries nothing (the key's quota is fully back), so at the
/// bound those go first; only when every held key is still limited are arbitrary ones dropped,
/// which starts them afresh and so only ever errs towards allowing.
pub struct LocalLimiter {
    clock: Arc<dyn Clock>,
    shards: Box<[Mutex<Cells>]>,
    per_shard: usize,
    /// Seeded per process. Key ids come from the key store, not from clients, so a fast hash
    /// (foldhash, not SipHash) is enough to spread them.
    hasher: RandomState,
}

/// TATs (ns) by the 64-bit hash of the key id, not the id itself: that halves a cell, and two of
/// 100,000 ids share one with a chance of about 3 in 10¹⁰ (they would share a quota).
type Cells = HashMap<u64, u64, BuildHasherDefault<Prehashed>>;

/// The table's keys are SipHash outputs already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Shards of the table, so concurrent checks of different keys rarely wait on one lock.
const SHARDS: usize = 16;

impl LocalLimiter {
    pub fn new(clock: Arc<dyn Clock>, max_keys: u64) -> Self {
        // Small bounds (tests) in one shard, so the bound is exact.
        let shards = if max_keys >= 1024 { SHARDS } else { 1 };
        Self {
            clock,
            // Tables grow with use: an idle daemon holds none of it.
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            per_shard: (max_keys as usize / shards).max(1),
            hasher: RandomState::default(),
        }
    }

    /// The decision, synchronously: the local backend never waits on anything.
    pub fn check_now(&self, key_id: &str, limit: RateLimit) -> RateStatus {
        let h = self.hasher.hash_one(key_id);
        // The top bits pick the shard; the table indexes by the low bits, which stay spread.
        let shard = &self.shards[(h >> 58) as usize % self.shards.len()];
        let now = self.clock.now_nanos();
        let (interval, tolerance) = gcra_params(limit);
        let mut cells = shard.lock().expect("limiter shard lock");
        let tat = cells.get(&h).map_or(now, |t| (*t).max(now));
        if tat - now > tolerance {
            return gcra_status(false, tat, now, limit);
        }
        let new_tat = tat + interval;
        if cells.len() >= self.per_shard && !cells.contains_key(&h) {
            make_room(&mut cells, now, self.per_shard);
        }
        cells.insert(h, new_tat);
        gcra_status(true, new_tat, now, limit)
    }

    /// Keys holding state.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("limiter shard lock").len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frees room in a full shard: keys whose quota is fully back first, then, if that is not an
/// eighth of the shard, arbitrary keys down to seven eighths, so the next sweep is that many
/// insertions away.
fn make_room(cells: &mut Cells, now: u64, bound: usize) {
    cells.retain(|_, tat| *tat > now);
    let target = bound - bound / 8;
    if cells.len() > target {
        let drop: Vec<u64> = cells.keys().take(cells.len() - target).copied().collect();
        for h in drop {
            cells.remove(&h);
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

    fn check_in_memory(&self, key_id: &str, limit: RateLimit) -> Option<RateStatus> {
        Some(self.check_now(key_id, limit))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
        for max in [100, 10_000] {
            let clock = Arc::new(ManualClock::at_secs(1));
            let l = LocalLimiter::new(clock, max);
            for i in 0..10 * max {
                l.check_now(&format!("key-{i}"), lim("5/1s"));
                assert!(l.len() <= max as usize, "{} cells held", l.len());
            }
        }
    }

    #[test]
    fn at_the_bound_keys_with_their_quota_back_go_first() {
        let (clock, l) = limiter(1_000);
        // 999 keys used once, long ago: their quota is back.
        for i in 0..999 {
            l.check_now(&format!("idle-{i}"), lim("5/1s"));
        }
        clock.advance(Duration::from_secs(10));
        // One key spends its quota; then the table fills up past the bound.
        for _ in 0..5 {
            assert!(l.check_now("busy", lim("5/60s")).allowed);
        }
        for i in 0..500 {
            l.check_now(&format!("new-{i}"), lim("5/1s"));
        }
        assert!(l.len() <= 1000);
        assert!(
            !l.check_now("busy", lim("5/60s")).allowed,
            "the busy key's state was kept"
        );
    }
}
