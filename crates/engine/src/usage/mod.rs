//! Usage per key: how many decisions each known key got in each hour, by outcome (allowed,
//! rate_limited, denied), so the platform can bill and support customers per key. Counted in
//! memory on the request path (one short lock on one of a few shards, no allocation for a key
//! already counted this interval) and written off it by `flush` into Redis's hourly hashes, which
//! every replica adds to (the layout is docs/key-store.md's). `read` gives the hourly series back.
//!
//! Only decisions about a key whose record was found and usable count: the ones whose decision
//! names a key id (allows, 429s, and refusals after the key was identified). Unknown, malformed,
//! revoked and expired keys never take space here, whatever a flood sends.
//!
//! Without Redis there is nowhere to add a replica's counts up and nothing that could read them,
//! so nothing is held: each such decision is only counted as dropped (`no_redis`), one atomic
//! addition on the request path and no memory at all.

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
use crate::store::KeyId;

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
    Shared(&'a KeyId),
    Borrowed(&'a str),
}

impl KeyRef<'_> {
    fn as_str(&self) -> &str {
        match self {
            KeyRef::Shared(k) => k,
            KeyRef::Borrowed(k) => k,
        }
    }

    /// Only for a key not counted yet this interval: an allow's id is shared, not copied (but
    /// for one held in the key file's table; usage over a key file holds nothing).
    fn to_arc(&self) -> Arc<str> {
        match self {
            KeyRef::Shared(k) => k.to_arc(),
            KeyRef::Borrowed(k) => Arc::from(*k),
        }
    }
}

/// Decisions of one key in one hour, as read back from Redis: the fleet's sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub allowed: u64,
    pub rate_limited: u64,
    pub denied: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.allowed += other.allowed;
        self.rate_limited += other.rate_limited;
        self.denied += other.denied;
    }

    /// Decisions in all.
    pub fn total(&self) -> u64 {
        self.allowed + self.rate_limited + self.denied
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }
}

/// Decisions of one key in one hour on this replica, not yet in Redis: 12 bytes, not `Counts`'
/// 24. One replica's decisions for one key within one hour stay far below 2³² (that would be 1.2
/// million a second for the whole hour); should a sum reach it all the same, what does not fit is
/// returned to be counted as dropped, never wrapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub allowed: u32,
    pub rate_limited: u32,
    pub denied: u32,
}

impl Tally {
    fn one(outcome: Outcome) -> Self {
        let mut t = Tally::default();
        t.add_one(outcome);
        t
    }

    /// Within one flush interval (at most a minute) a counter cannot reach 2³², so this
    /// saturating addition never saturates in practice; it only keeps the request path free of
    /// a branch that could panic.
    fn add_one(&mut self, outcome: Outcome) {
        let c = match outcome {
            Outcome::Allowed => &mut self.allowed,
            Outcome::RateLimited => &mut self.rate_limited,
            Outcome::Denied => &mut self.denied,
        };
        *c = c.saturating_add(1);
    }

    /// Adds `other`; returns the decisions that did not fit (0 unless a counter would pass 2³²).
    #[must_use]
    pub fn add(&mut self, other: Tally) -> u64 {
        let mut lost = 0;
        for (c, o) in [
            (&mut self.allowed, other.allowed),
            (&mut self.rate_limited, other.rate_limited),
            (&mut self.denied, other.denied),
        ] {
            let sum = u64::from(*c) + u64::from(o);
            *c = u32::try_from(sum).unwrap_or(u32::MAX);
            lost += sum - u64::from(*c);
        }
        lost
    }

    /// Decisions in all: what is lost when these counts are dropped.
    pub fn total(&self) -> u64 {
        u64::from(self.allowed) + u64::from(self.rate_limited) + u64::from(self.denied)
    }

    pub fn counts(&self) -> Counts {
        Counts {
            allowed: self.allowed.into(),
            rate_limited: self.rate_limited.into(),
            denied: self.denied.into(),
        }
    }
}

/// One key's counts since the last flush, for its latest hour.
struct Slot {
    /// Unix hour number (Unix seconds / 3600): fits 32 bits for the next 490,000 years.
    hour: u32,
    tally: Tally,
}

/// One shard of the live counts: each key counted since the last flush, at 32 bytes a slot
/// (the id shared with the key record, the hour, the tally); the rare earlier hour of a key
/// whose decisions crossed an hour within one interval waits beside them.
#[derive(Default)]
struct Live {
    slots: HashMap<Arc<str>, Slot, RandomState>,
    earlier: Vec<Entry>,
}

/// One (key, Unix hour, tally) entry taken from the live counts: 32 bytes.
pub type Entry = (Arc<str>, u32, Tally);

/// The live counts and the flush behind them.
pub struct Usage {
    shards: Box<[Mutex<Live>]>,
    pick: RandomState,
    clock: Arc<dyn Clock>,
    /// Distinct keys counted since the last flush, over every shard.
    keys: AtomicUsize,
    max_keys: usize,
    /// Decisions not counted since the last flush because `max_keys` was reached, or (without
    /// Redis) because nothing is kept; reported (metric and log) by the flush, off the request
    /// path.
    refused: AtomicU64,
    /// Where the counts go; `None`: no Redis, nothing is held.
    flush: Option<Flush>,
    observer: Arc<Observer>,
}

impl Usage {
    /// Counting with its flush task (on the current runtime; the caller owns the handle), or
    /// `None` when `usage.enabled` is false. `redis`: the engine's Redis, if it has one; without
    /// it nothing is held and every decision of a known key is counted as dropped (`no_redis`).
    pub fn start(
        cfg: &UsageConfig,
        redis: Option<(Redis, String, bool)>,
        clock: Arc<dyn Clock>,
        observer: Arc<Observer>,
    ) -> Option<(Arc<Self>, JoinHandle<()>)> {
        if !cfg.enabled {
            return None;
        }
        if redis.is_none() {
            tracing::info!(
                "No Redis: usage per key is not recorded; decisions of known keys are counted in gybc_authz_usage_dropped_total{{reason=\"no_redis\"}}."
            );
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
            flush: redis.map(|r| Flush::new(cfg, r)),
            observer,
        }
    }

    /// Counts one decision, if it was about a known key. On the request path: a clock read and
    /// one shard's lock; an allocation only for the first decision of a key in an interval (and
    /// only for a denial: an allow shares the record's id). Without Redis, one atomic addition.
    pub fn count(&self, decision: &Decision) {
        let Some((key, outcome)) = Outcome::of(decision) else {
            return;
        };
        if self.flush.is_none() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Unix hours fit 32 bits until the year 490,000.
        let hour = (self.clock.now_secs() / HOUR_SECS) as u32;
        let id = key.as_str();
        let shard = &self.shards[self.pick.hash_one(id) as usize % SHARDS];
        let mut live = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let live = &mut *live;
        if let Some(slot) = live.slots.get_mut(id) {
            if slot.hour == hour {
                slot.tally.add_one(outcome);
            } else {
                earlier_hour(&mut live.earlier, &key, slot, hour, outcome);
            }
            return;
        }
        if self.keys.fetch_add(1, Ordering::Relaxed) >= self.max_keys {
            self.keys.fetch_sub(1, Ordering::Relaxed);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        live.slots.insert(
            key.to_arc(),
            Slot {
                hour,
                tally: Tally::one(outcome),
            },
        );
    }

    /// Takes every live count, leaving the shards empty (their tables freed): a key not seen
    /// since takes no space.
    fn take(&self) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.keys.load(Ordering::Relaxed));
        for shard in self.shards.iter() {
            let live = std::mem::take(&mut *shard.lock().unwrap_or_else(PoisonError::into_inner));
            self.keys.fetch_sub(live.slots.len(), Ordering::Relaxed);
            out.extend(live.earlier);
            out.extend(live.slots.into_iter().map(|(k, s)| (k, s.hour, s.tally)));
        }
        out
    }

    /// Writes what was counted since the last flush (and what earlier flushes could not
    /// write). The flush task calls it every `usage.flush_interval_ms`; a host may call it
    /// once more on shutdown, and tests call it to avoid waiting.
    pub async fn flush_now(&self) {
        let refused = self.refused.swap(0, Ordering::Relaxed);
        let Some(flush) = &self.flush else {
            if refused > 0 {
                self.observer.usage_dropped(UsageDrop::NoRedis, refused);
            }
            return;
        };
        if refused > 0 {
            self.observer.usage_dropped(UsageDrop::KeyCap, refused);
        }
        flush.run(self.take(), &self.observer).await;
        self.observer.usage_entries(self.entries().await);
    }

    /// (key, hour) entries in memory: counted since the last flush, plus those held for a retry.
    /// At most `usage.max_keys_per_interval` (and a key's earlier hour across an hour's end) plus
    /// `usage.max_held_entries`; none without Redis.
    pub async fn entries(&self) -> usize {
        let earlier: usize = self
            .shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .earlier
                    .len()
            })
            .sum();
        let held = match &self.flush {
            Some(f) => f.held_entries().await,
            None => 0,
        };
        self.keys.load(Ordering::Relaxed) + earlier + held
    }
}

/// A decision whose hour is not the slot's: a new hour moves the slot's tally to the shard's
/// earlier list and starts afresh; an earlier one (a thread that read the clock just before the
/// hour turned, and took the lock just after) adds to its entry there.
fn earlier_hour(
    earlier: &mut Vec<Entry>,
    key: &KeyRef<'_>,
    slot: &mut Slot,
    hour: u32,
    outcome: Outcome,
) {
    if hour > slot.hour {
        let before = std::mem::replace(&mut slot.tally, Tally::one(outcome));
        earlier.push((key.to_arc(), slot.hour, before));
        slot.hour = hour;
        return;
    }
    let id = key.as_str();
    match earlier
        .iter_mut()
        .find(|(k, h, _)| *h == hour && &**k == id)
    {
        Some((_, _, t)) => t.add_one(outcome),
        None => earlier.push((key.to_arc(), hour, Tally::one(outcome))),
    }
}

#[cfg(test)]
mod tests;
