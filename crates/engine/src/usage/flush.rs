//! Writing the counts off the request path. With Redis: one pipeline per flush of Lua scripts,
//! each adding a group of keys' counts to their hourly hashes (`HINCRBY`, `EXPIREAT` at the
//! hour's end plus the retention) once only: a group carries a marker name that the script sets
//! with `NX`, so a retry of a group whose first attempt timed out but was applied after all (a
//! stalled Redis) adds nothing twice. What cannot be written is held for the next flush, up to
//! `usage.max_held_entries` (a 40-byte slot each in a hash table); what is finally
//! given up is counted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::read::usage_name;
use super::{Entry, HOUR_SECS, Tally};
use crate::authn::apikey::random_base62;
use crate::config::UsageConfig;
use crate::event::{RedisFailure, UsageDrop};
use crate::observe::Observer;
use crate::redis_conn::Redis;

/// Adds one group's counts, once: nothing if its marker is set already (an earlier attempt
/// was applied). KEYS[1] the marker, KEYS[2..] the hourly hashes; ARGV[1] the marker's TTL, then
/// per hash its EXPIREAT and the allowed, rate_limited and denied increments.
const FLUSH_LUA: &str = r"if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local fields = {'allowed', 'rate_limited', 'denied'}
for i = 2, #KEYS do
  local a = 2 + (i - 2) * 4
  for f = 1, 3 do
    local n = tonumber(ARGV[a + f])
    if n > 0 then
      redis.call('HINCRBY', KEYS[i], fields[f], n)
    end
  end
  redis.call('EXPIREAT', KEYS[i], ARGV[a])
end
return 1";

/// (key, hour) entries per script: a script runs alone in Redis, so each stays short.
const GROUP_ENTRIES: usize = 500;
/// Scripts per pipeline: one round trip within `redis.timeout_ms` even for a large flush.
const PIPELINE_GROUPS: usize = 20;
/// Scripts in flight at once in a Redis Cluster, where each key's group is its own command.
const CLUSTER_IN_FLIGHT: usize = 32;
/// How long a marker outlives its group's first attempt.
pub const MARKER_TTL_SECS: u64 = 3600;
/// A group whose attempt may have been applied is retried for at most this long, well within
/// its marker's life; then it is given up and counted (`expired`).
const IN_DOUBT_MAX: Duration = Duration::from_secs(MARKER_TTL_SECS / 2);

pub struct Flush {
    to: ToRedis,
    retention_secs: u64,
    max_held: usize,
}

/// Counts by (key, Unix hour).
type ByHour = HashMap<(Arc<str>, u32), Tally>;

struct ToRedis {
    redis: Redis,
    prefix: String,
    /// A Redis Cluster: a script may touch one slot only, so each key is its own group.
    cluster: bool,
    /// Names this replica's markers apart from every other replica's.
    replica: String,
    next_group: AtomicU64,
    held: Mutex<Held>,
}

/// Counts not yet in Redis.
#[derive(Default)]
struct Held {
    /// Never sent (or refused unsent by the open breaker): merged with new counts freely.
    unsent: ByHour,
    /// Sent, with no answer: retried as they are, under their markers.
    in_doubt: VecDeque<Group>,
    in_doubt_entries: usize,
}

struct Group {
    marker: String,
    entries: Vec<Entry>,
    /// The first attempt that may have reached Redis.
    sent_at: Option<Instant>,
}

impl Held {
    fn entries(&self) -> usize {
        self.unsent.len() + self.in_doubt_entries
    }
}

/// Adds `taken` into `into`, holding at most `max` entries; returns the decisions that did not
/// fit.
fn merge(into: &mut ByHour, taken: Vec<Entry>, max: usize, others: usize) -> u64 {
    let mut dropped = 0;
    for (key, hour, counts) in taken {
        let held = into.len() + others;
        match into.get_mut(&(key.clone(), hour)) {
            Some(c) => dropped += c.add(counts),
            None if held < max => {
                into.insert((key, hour), counts);
            }
            None => dropped += counts.total(),
        }
    }
    dropped
}

impl Flush {
    pub fn new(cfg: &UsageConfig, (redis, prefix, cluster): (Redis, String, bool)) -> Self {
        Self {
            to: ToRedis {
                redis,
                prefix,
                cluster,
                replica: random_base62(12),
                next_group: AtomicU64::new(0),
                held: Mutex::default(),
            },
            retention_secs: u64::from(cfg.retention_days) * 86_400,
            max_held: cfg.max_held_entries,
        }
    }

    pub async fn held_entries(&self) -> usize {
        self.to.held.lock().await.entries()
    }

    /// Writes `taken` (and whatever is held from before).
    pub async fn run(&self, taken: Vec<Entry>, observer: &Observer) {
        self.to.run(taken, self, observer).await
    }
}

impl ToRedis {
    async fn run(&self, taken: Vec<Entry>, flush: &Flush, observer: &Observer) {
        let mut held = self.held.lock().await;
        let others = held.in_doubt_entries;
        let dropped = merge(&mut held.unsent, taken, flush.max_held, others);
        if dropped > 0 {
            observer.usage_dropped(UsageDrop::HeldFull, dropped);
        }
        // Retrying a group past its marker's life could count it twice: give it up instead.
        let mut expired = 0;
        while let Some(g) = held.in_doubt.front() {
            if g.sent_at.is_none_or(|t| t.elapsed() < IN_DOUBT_MAX) {
                break;
            }
            let g = held.in_doubt.pop_front().expect("a front");
            held.in_doubt_entries -= g.entries.len();
            expired += g.entries.iter().map(|e| e.2.total()).sum::<u64>();
        }
        if expired > 0 {
            observer.usage_dropped(UsageDrop::Expired, expired);
        }

        let mut groups: Vec<Group> = held.in_doubt.drain(..).collect();
        held.in_doubt_entries = 0;
        groups.extend(self.groups(std::mem::take(&mut held.unsent)));
        if groups.is_empty() {
            return;
        }
        let results = self.send(&groups, flush.retention_secs).await;
        let (mut written, mut failure) = (0, None);
        for (mut g, result) in groups.into_iter().zip(results) {
            match result {
                Ok(()) => written += g.entries.len(),
                // Not sent: the counts are merged with the next ones.
                Err(RedisFailure::BreakerOpen) if g.sent_at.is_none() => {
                    for (key, hour, counts) in g.entries {
                        // Taken out of `unsent` above, so no entry is there to overflow.
                        let lost = held.unsent.entry((key, hour)).or_default().add(counts);
                        debug_assert_eq!(lost, 0);
                    }
                    failure.get_or_insert(RedisFailure::BreakerOpen);
                }
                Err(f) => {
                    g.sent_at.get_or_insert_with(Instant::now);
                    held.in_doubt_entries += g.entries.len();
                    held.in_doubt.push_back(g);
                    failure = Some(f);
                }
            }
        }
        match failure {
            None => observer.usage_flushed(written),
            Some(f) => observer.usage_flush_failed(written, held.entries(), &f),
        }
    }

    /// New groups of the never-sent counts, each with its own marker; a key's hours stay
    /// together (in a cluster they are the group, sharing the key's slot).
    fn groups(&self, unsent: ByHour) -> Vec<Group> {
        let mut entries: Vec<Entry> = unsent.into_iter().map(|((k, h), c)| (k, h, c)).collect();
        entries.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let mut groups: Vec<Group> = Vec::new();
        for e in entries {
            let start_new = match groups.last() {
                None => true,
                Some(g) if self.cluster => g.entries[0].0 != e.0,
                Some(g) => g.entries.len() >= GROUP_ENTRIES,
            };
            if start_new {
                let n = self.next_group.fetch_add(1, Ordering::Relaxed);
                groups.push(Group {
                    // The first key's hash tag: the marker shares its slot.
                    marker: format!(
                        "{}:usage:{{{}}}:flush:{}:{n}",
                        self.prefix, e.0, self.replica
                    ),
                    entries: Vec::new(),
                    sent_at: None,
                });
            }
            groups.last_mut().expect("pushed above").entries.push(e);
        }
        groups
    }

    async fn send_one(&self, cmd: redis::Cmd) -> Result<(), RedisFailure> {
        self.redis
            .run(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
            .await
            .map(drop)
    }

    fn command(&self, g: &Group, retention_secs: u64) -> redis::Cmd {
        let mut c = redis::cmd("EVAL");
        c.arg(FLUSH_LUA).arg(1 + g.entries.len()).arg(&g.marker);
        for (key, hour, _) in &g.entries {
            c.arg(usage_name(&self.prefix, key, u64::from(*hour)));
        }
        c.arg(MARKER_TTL_SECS);
        for (_, hour, counts) in &g.entries {
            c.arg((u64::from(*hour) + 1) * HOUR_SECS + retention_secs)
                .arg(counts.allowed)
                .arg(counts.rate_limited)
                .arg(counts.denied);
        }
        c
    }

    /// Each group's result, in order: pipelines on one Redis, one command per group in a
    /// cluster (a pipeline there must stay in one slot).
    async fn send(&self, groups: &[Group], retention_secs: u64) -> Vec<Result<(), RedisFailure>> {
        if self.cluster {
            let mut out = Vec::with_capacity(groups.len());
            for chunk in groups.chunks(CLUSTER_IN_FLIGHT) {
                let sends = chunk
                    .iter()
                    .map(|g| self.send_one(self.command(g, retention_secs)));
                out.extend(futures_util::future::join_all(sends).await);
            }
            return out;
        }
        let mut out = Vec::with_capacity(groups.len());
        for chunk in groups.chunks(PIPELINE_GROUPS) {
            let mut pipe = redis::pipe();
            for g in chunk {
                pipe.add_command(self.command(g, retention_secs));
            }
            let result = self
                .redis
                .run(|mut conn| async move { pipe.query_async::<Vec<i64>>(&mut conn).await })
                .await
                .map(drop);
            out.extend(std::iter::repeat_n(result, chunk.len()));
        }
        out
    }
}
