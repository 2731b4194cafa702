//! The Redis layout of usage per key, and reading it back: `<prefix>:usage:{<key id>}:<yyyymmddhh>`
//! is a hash of `allowed`, `rate_limited` and `denied` for one UTC hour, which every replica adds
//! to, so one read is the fleet's sum. The braces keep a key's hours in one cluster slot, so a
//! range is one pipeline.

use std::ops::Range;
use std::time::{Duration, UNIX_EPOCH};

use super::{Counts, HOUR_SECS};
use crate::event::RedisFailure;
use crate::redis_conn::Redis;

/// One hour of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Unix seconds at the start of the hour.
    pub hour_start: u64,
    pub counts: Counts,
}

/// `yyyymmddhh` (UTC) of a Unix hour number (Unix seconds / 3600): readable in `redis-cli`.
pub fn hour_name(hour: u64) -> String {
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(hour * HOUR_SECS))
        .to_string();
    // 2026-06-01T09:00:00Z
    format!("{}{}{}{}", &t[0..4], &t[5..7], &t[8..10], &t[11..13])
}

/// `<prefix>:usage:{<key id>}:<yyyymmddhh>`.
pub fn usage_name(prefix: &str, key_id: &str, hour: u64) -> String {
    format!("{prefix}:usage:{{{key_id}}}:{}", hour_name(hour))
}

/// The hours needed to cover `[from, to)` (Unix seconds): from `from`'s hour up to the hour
/// `to` falls in, or ends on.
pub fn hours_covering(from: u64, to: u64) -> Range<u64> {
    from / HOUR_SECS..to.div_ceil(HOUR_SECS)
}

/// The fleet's counts of `key_id` for each Unix hour in `hours`, hours with no decision left
/// out. One pipeline, through the connection's timeout and circuit breaker.
pub async fn read(
    redis: &Redis,
    prefix: &str,
    key_id: &str,
    hours: Range<u64>,
) -> Result<Vec<Bucket>, RedisFailure> {
    if hours.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for hour in hours.clone() {
        pipe.cmd("HMGET")
            .arg(usage_name(prefix, key_id, hour))
            .arg("allowed")
            .arg("rate_limited")
            .arg("denied");
    }
    type Row = (Option<u64>, Option<u64>, Option<u64>);
    let rows: Vec<Row> = redis
        .run(|mut conn| async move { pipe.query_async(&mut conn).await })
        .await?;
    Ok(hours
        .zip(rows)
        .map(|(hour, (a, r, d))| Bucket {
            hour_start: hour * HOUR_SECS,
            counts: Counts {
                allowed: a.unwrap_or(0),
                rate_limited: r.unwrap_or(0),
                denied: d.unwrap_or(0),
            },
        })
        .filter(|b| !b.counts.is_empty())
        .collect())
}
