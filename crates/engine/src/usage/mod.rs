//! Usage per key: how many decisions each known key got in each hour, by outcome (allowed,
//! rate_limited, denied), so the platform can bill and support customers per key. Counted in
//! memory on the request path (one short lock on one of a few shards, no allocation for a key
//! already counted this interval) and written off it by `flush`: with Redis, into hourly hashes
//! every replica adds to (the layout is docs/key-store.md's); without, into this replica's
//! memory. `read` gives the hourly series back from Redis.
//!
//! Only decisions about a key whose record was found and usable count: the ones whose decision
//! names a key id (allows, 429s, and refusals after the key was identified). Unknown, malformed,
//! revoked and expired keys never take space here, whatever a flood sends.

mod flush;
pub mod read;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use foldhash::fast::RandomState;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::UsageConfig;
use crate::decision::{Decision, Reason};
use crate::event::UsageDrop;
use crate::observe::Observer;
use crate::redis_conn::Redis;

pub use flush::Flush;
pub use read::{Bucket, hour_name, usage_name};

/// Shards of the live counts: enough that concurrent decisions rarely meet on one lock.
const SHARDS: usize = 16;
/// Seconds in one bucket.
pub const HOUR_SECS: u64 = 3600;

/// What happened to one request of a known key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    RateLimited,
    /// Refused for any other reason once the key was identified: a scope, method, origin,
    /// impersonation or tenant rule, a publishable key's user token, or a 503 of a fail-closed
    /// limiter.
    Denied,
}

impl Outcome {
    /// The decision's outcome and the key it was about, when a known key was identified.
    fn of(decision: &Decision) -> Option<(KeyRef<'_>, Outcome)> {
        match decision {
            Decision::Allow(g) => g
                .identity
                .as_ref()
                .and_then(|i| i.key_id.as_ref())
                .map(|k| (KeyRef::Shared(k), Outcome::Allowed)),
            Decision::Deny(d) => d.who.as_deref().and_then(|w| w.key_id.as_deref()).map(|k| {
                let outcome = if d.reason == Reason::RateLimited {
                    Outcome::RateLimited
                } else {
                    Outcome::Denied
                };
                (KeyRef::Borrowed(k), outcome)
            }),
        }
    }
}

/// A key id as the decision holds it: an allow shares the key record's, a denial has a copy.
enum KeyRef<'a> {
    Shared(&'a Arc<str>),
    Borrowed(&'a str),
}

impl KeyRef<'_> {
    fn as_str(&self) -> &str {
        match self {
            KeyRef::Shared(k) => k,
            KeyRef::Borrowed(k) => k,
        }
    }

    /// Only for a key not counted yet this interval: an allow's id is shared, not copied.
    fn to_arc(&self) -> Arc<str> {
        match self {
            KeyRef::Shared(k) => Arc::clone(k),
            KeyRef::Borrowed(k) => Arc::from(*k),
        }
    }
}

/// Decisions of one key in one hour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub allowed: u64,
    pub rate_limited: u64,
    pub denied: u64,
}

impl Counts {
    fn one(outcome: Outcome) -> Self {
        let mut c = Counts::default();
        c.add_one(outcome);
        c
    }

    fn add_one(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Allowed => self.allowed += 1,
            Outcome::RateLimited => self.rate_limited += 1,
            Outcome::Denied => self.denied += 1,
        }
    }

    pub fn add(&mut self, other: Counts) {
        self.allowed += other.allowed;
        self.rate_limited += other.rate_limited;
        self.denied += other.denied;
    }

    /// Decisions in all: what is lost when these counts are dropped.
    pub fn total(&self) -> u64 {
        self.allowed + self.rate_limited + self.denied
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }
}

/// One key's counts since the last flush: the current hour's, and (only across an hour
/// boundary within one interval) earlier hours'.
struct Slot {
    hour: u64,
    counts: Counts,
    earlier: Vec<(u64, Counts)>,
}

impl Slot {
    fn add(&mut self, hour: u64, outcome: Outcome) {
        if hour == self.hour {
            self.counts.add_one(outcome);
            return;
        }
        if let Some((_, c)) = self.earlier.iter_mut().find(|(h, _)| *h == hour) {
            c.add_one(outcome);
            return;
        }
        let before = std::mem::replace(&mut self.counts, Counts::one(outcome));
        self.earlier.push((self.hour, before));
        self.hour = hour;
    }
}

/// One shard of the live counts: each key counted since the last flush.
type Shard = Mutex<HashMap<Arc<str>, Slot, RandomState>>;

/// One (key, hour) entry taken from the live counts.
pub type Entry = (Arc<str>, u64, Counts);

/// The live counts and the flush behind them.
pub struct Usage {
    shards: Box<[Shard]>,
    pick: RandomState,
    clock: Arc<dyn Clock>,
    /// Distinct keys counted since the last flush, over every shard.
    keys: AtomicUsize,
    max_keys: usize,
    /// Decisions not counted since the last flush because `max_keys` was reached; reported
    /// (metric and log) by the flush, off the request path.
    refused: AtomicU64,
    flush: Flush,
    observer: Arc<Observer>,
}

impl Usage {
    /// Counting with its flush task (on the current runtime; the caller owns the handle), or
    /// `None` when `usage.enabled` is false. `redis`: the engine's Redis, if it has one; counts
    /// stay in this replica's memory otherwise.
    pub fn start(
        cfg: &UsageConfig,
        redis: Option<(Redis, String, bool)>,
        clock: Arc<dyn Clock>,
        observer: Arc<Observer>,
    ) -> Option<(Arc<Self>, JoinHandle<()>)> {
        if !cfg.enabled {
            return None;
        }
        let usage = Arc::new(Self::new(cfg, redis, clock, observer));
        let every = Duration::from_millis(cfg.flush_interval_ms);
        let weak = Arc::downgrade(&usage);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                // Held only while flushing, so a dropped engine ends the task within an interval.
                let Some(usage) = weak.upgrade() else { return };
                usage.flush_now().await;
            }
        });
        Some((usage, task))
    }

    fn new(
        cfg: &UsageConfig,
        redis: Option<(Redis, String, bool)>,
        clock: Arc<dyn Clock>,
        observer: Arc<Observer>,
    ) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            pick: RandomState::default(),
            clock,
            keys: AtomicUsize::new(0),
            max_keys: cfg.max_keys_per_interval,
            refused: AtomicU64::new(0),
            flush: Flush::new(cfg, redis),
            observer,
        }
    }

    /// Counts one decision, if it was about a known key. On the request path: a clock read and
    /// one shard's lock; an allocation only for the first decision of a key in an interval.
    pub fn count(&self, decision: &Decision) {
        let Some((key, outcome)) = Outcome::of(decision) else {
            return;
        };
        let hour = self.clock.now_secs() / HOUR_SECS;
        let id = key.as_str();
        let shard = &self.shards[self.pick.hash_one(id) as usize % SHARDS];
        let mut live = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = live.get_mut(id) {
            slot.add(hour, outcome);
            return;
        }
        if self.keys.fetch_add(1, Ordering::Relaxed) >= self.max_keys {
            self.keys.fetch_sub(1, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        live.insert(
            key.to_arc(),
            Slot {
                hour,
                counts: Counts::one(outcome),
                earlier: Vec::new(),
            },
        );
    }

    /// Takes every live count, leaving the shards empty: a key not seen since takes no space.
    fn take(&self) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.keys.load(Ordering::Relaxed));
        for shard in self.shards.iter() {
            let live = std::mem::take(&mut *shard.lock().unwrap_or_else(PoisonError::into_inner));
            self.keys.fetch_sub(live.len(), Ordering::Relaxed);
            for (key, slot) in live {
                for (hour, counts) in slot.earlier {
                    out.push((key.clone(), hour, counts));
                }
                out.push((key, slot.hour, slot.counts));
            }
        }
        out
    }

    /// Writes what was counted since the last flush (and what earlier flushes could not
    /// write). The flush task calls it every `usage.flush_interval_ms`; a host may call it
    /// once more on shutdown, and tests call it to avoid waiting.
    pub async fn flush_now(&self) {
        let refused = self.refused.swap(0, Ordering::Relaxed);
        if refused > 0 {
            self.observer.usage_dropped(UsageDrop::KeyCap, refused);
        }
        let now_hour = self.clock.now_secs() / HOUR_SECS;
        self.flush.run(self.take(), now_hour, &self.observer).await;
        let live = self.keys.load(Ordering::Relaxed);
        self.observer
            .usage_entries(live + self.flush.held_entries().await);
    }

    /// (key, hour) entries in memory: counted since the last flush, plus those held for a retry
    /// (or, without Redis, kept as this replica's record).
    pub async fn entries(&self) -> usize {
        self.keys.load(Ordering::Relaxed) + self.flush.held_entries().await
    }

    /// Without Redis: this replica's hourly counts of `key_id` in `hours` (Unix hour numbers),
    /// hours with no decision left out. `None` with Redis: read the fleet's with `read`.
    pub async fn local_series(
        &self,
        key_id: &str,
        hours: std::ops::Range<u64>,
    ) -> Option<Vec<Bucket>> {
        self.flush.local_series(key_id, hours).await
    }
}

#[cfg(test)]
mod tests;
