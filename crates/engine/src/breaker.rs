//! A consecutive-failure circuit breaker: after a few failures in a row a dependency is not asked
//! at all until a background probe gets an answer, so a stalled dependency costs each caller
//! nothing instead of its timeout. Two atomics; how to probe belongs to the owner of the
//! connection (`redis_conn`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Leave to make one call, tied to the breaker's episode: a failure that started before the last
/// close (a request that timed out while a probe was succeeding) does not count against the
/// closed breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit(u64);

pub struct Breaker {
    /// Even while closed, odd while open; bumped by every transition, so it also names the
    /// episode a permit belongs to.
    epoch: AtomicU64,
    /// Failures in a row in the current closed episode.
    consecutive: AtomicU32,
    threshold: u32,
}

impl Breaker {
    /// Opens after `threshold` failures in a row (at least 1).
    pub fn new(threshold: u32) -> Self {
        Self {
            epoch: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            threshold: threshold.max(1),
        }
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    pub fn is_open(&self) -> bool {
        !self.epoch.load(Ordering::Acquire).is_multiple_of(2)
    }

    /// `None` while open: the caller answers without the dependency.
    pub fn permit(&self) -> Option<Permit> {
        let epoch = self.epoch.load(Ordering::Acquire);
        epoch.is_multiple_of(2).then_some(Permit(epoch))
    }

    /// A call made under `permit` was answered.
    pub fn succeeded(&self, permit: Permit) {
        // Read before writing: the common case (no failures) then never dirties the cache line.
        if self.consecutive.load(Ordering::Relaxed) != 0
            && self.epoch.load(Ordering::Acquire) == permit.0
        {
            self.consecutive.store(0, Ordering::Release);
        }
    }

    /// A call made under `permit` timed out or failed. True when this failure opened the
    /// breaker: exactly one caller sees it, and starts the probe.
    pub fn failed(&self, permit: Permit) -> bool {
        if self.epoch.load(Ordering::Acquire) != permit.0 {
            return false;
        }
        let n = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        n >= self.threshold
            && self
                .epoch
                .compare_exchange(permit.0, permit.0 + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// A probe was answered: closes the breaker. True if it was open.
    ///
    /// The new episode starts on probation: until a call succeeds, one failure opens the breaker
    /// again. A probe proves the dependency answers, not that every call will; if the first ones
    /// fail anyway, waiting for `threshold` of them would make each premature close cost
    /// `threshold` timeouts.
    pub fn close(&self) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        if epoch.is_multiple_of(2) {
            return false;
        }
        // Set before the new episode begins: no permit of it can exist yet.
        self.consecutive
            .store(self.threshold - 1, Ordering::Release);
        self.epoch
            .compare_exchange(epoch, epoch + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Waits between probes: `first`, doubling, at most `max`, so a dependency that stays down is
/// asked less and less often while one that comes back is noticed within `max`.
pub fn probe_delays(first: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    std::iter::successors(Some(first.min(max)), move |d| Some((*d * 2).min(max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_of_failures_in_a_row() {
        let b = Breaker::new(3);
        let p = b.permit().unwrap();
        assert!(!b.failed(p));
        assert!(!b.failed(p));
        // A success in between starts the count again.
        b.succeeded(p);
        assert!(!b.failed(p));
        assert!(!b.failed(p));
        assert!(!b.is_open());
        assert!(b.failed(p), "the third failure in a row opens it");
        assert!(b.is_open());
        assert_eq!(b.permit(), None, "no calls while open");
        assert!(!b.failed(p), "later failures do not open it a second time");
    }

    #[test]
    fn only_one_of_many_concurrent_failures_opens_it() {
        let b = std::sync::Arc::new(Breaker::new(2));
        let p = b.permit().unwrap();
        let openers: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let b = b.clone();
                    s.spawn(move || (0..100).filter(|_| b.failed(p)).count())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(openers, 1);
        assert!(b.is_open());
    }

    #[test]
    fn a_probe_closes_it_and_failures_from_before_do_not_count() {
        let b = Breaker::new(2);
        let before = b.permit().unwrap();
        b.failed(before);
        assert!(b.failed(before));
        assert!(b.close());
        assert!(!b.close(), "closing a closed breaker is no transition");
        let now = b.permit().expect("closed again");
        assert_ne!(now, before);
        // Requests that were in flight when it opened fail late: the new episode ignores them.
        for _ in 0..5 {
            assert!(!b.failed(before));
        }
        assert!(!b.is_open());
        // Once a call of the new episode succeeded, the count starts again at zero.
        b.succeeded(now);
        assert!(!b.failed(now), "the count started again at zero");
        assert!(b.failed(now));
    }

    #[test]
    fn after_a_close_the_first_failure_before_any_success_opens_it_again() {
        let b = Breaker::new(3);
        let p = b.permit().unwrap();
        for _ in 0..2 {
            assert!(!b.failed(p));
        }
        assert!(b.failed(p));
        assert!(b.close());
        let now = b.permit().unwrap();
        assert!(
            b.failed(now),
            "on probation: one failure, not three, before the dependency is spared again"
        );
        assert!(b.is_open());
        assert!(b.close());
        let later = b.permit().unwrap();
        b.succeeded(later);
        assert!(!b.failed(later));
        assert!(!b.failed(later));
        assert!(b.failed(later), "after a success, the threshold again");
    }

    #[test]
    fn probe_delays_double_up_to_the_maximum() {
        let ms = |v: u64| Duration::from_millis(v);
        let d: Vec<_> = probe_delays(ms(200), ms(500)).take(4).collect();
        assert_eq!(d, [ms(200), ms(400), ms(500), ms(500)]);
        let d: Vec<_> = probe_delays(ms(700), ms(500)).take(2).collect();
        assert_eq!(d, [ms(500), ms(500)]);
    }
}
