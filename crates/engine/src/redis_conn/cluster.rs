//! A Redis Cluster's side of the connection: its layout read from `CLUSTER SLOTS` (which node is
//! the primary of which slots, and their replicas), a probe that every shard has a primary
//! taking commands, and the record of primaries that changed (a failover, reported once). The
//! `redis` crate's cluster connection follows a failover on its own (it reroutes and reads the
//! slots again); what it does not tell is whether every shard answers, or that a primary changed.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, RedisResult, Value};

use crate::event::RedisReconnect;
use crate::observe::Observer;

/// One range of slots: its primary and its replicas, as `host:port`, with the primary's node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub start: u16,
    pub end: u16,
    pub primary: String,
    pub primary_id: String,
    pub replicas: Vec<String>,
}

/// Every node once, primaries first: the nodes a subscription may use.
pub fn nodes(shards: &[Shard]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let primaries = shards.iter().map(|s| &s.primary);
    let replicas = shards.iter().flat_map(|s| &s.replicas);
    primaries
        .chain(replicas)
        .filter(|n| seen.insert(n.as_str()))
        .cloned()
        .collect()
}

/// The slot ranges of a `CLUSTER SLOTS` answer; malformed entries are skipped.
pub fn parse_slots(value: Value) -> Vec<Shard> {
    let Value::Array(ranges) = value else {
        return Vec::new();
    };
    let node = |v: &Value| -> Option<(String, String)> {
        let Value::Array(parts) = v else { return None };
        let host = match parts.first()? {
            Value::BulkString(h) => String::from_utf8_lossy(h).into_owned(),
            Value::SimpleString(h) => h.clone(),
            _ => return None,
        };
        let Value::Int(port) = parts.get(1)? else {
            return None;
        };
        let id = match parts.get(2) {
            Some(Value::BulkString(id)) => String::from_utf8_lossy(id).into_owned(),
            _ => String::new(),
        };
        Some((format!("{host}:{port}"), id))
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end))) = (parts.first(), parts.get(1))
            else {
                return None;
            };
            let (primary, primary_id) = node(parts.get(2)?)?;
            Some(Shard {
                start: u16::try_from(*start).ok()?,
                end: u16::try_from(*end).ok()?,
                primary,
                primary_id,
                replicas: parts[3..].iter().filter_map(node).map(|(a, _)| a).collect(),
            })
        })
        .collect()
}

/// The cluster's layout: `CLUSTER SLOTS` from any node that answers.
pub async fn slots(conn: &mut ClusterConnection) -> RedisResult<Vec<Shard>> {
    let value: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let shards = parse_slots(value);
    if shards.is_empty() {
        return Err(RedisError::from((
            redis::ErrorKind::Client,
            "CLUSTER SLOTS named no slots",
        )));
    }
    Ok(shards)
}

/// Whether every shard has a primary taking commands, as the data path reaches it: a read of a
/// key in one of each primary's slots, routed the way a lookup is, must be answered. A node that
/// does not own the slot answers `MOVED` to the owner, and a replica too (it is not in `READONLY`
/// mode), so the read fails until the shard's replica is promoted, and passes once the client
/// reaches the new primary. A PING or a `ROLE` would not tell: the client sends a command it
/// cannot route to any node it is connected to, and any primary answers those.
pub async fn probe(conn: &mut ClusterConnection, prefix: &str) -> RedisResult<Vec<Shard>> {
    let shards = slots(conn).await?;
    let mut seen = BTreeSet::new();
    let reads = shards
        .iter()
        .filter(|s| seen.insert(s.primary.as_str()))
        .map(|s| {
            let mut conn = conn.clone();
            let key = probe_key(prefix, s.start, s.end);
            async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
            }
        });
    for read in futures_util::future::join_all(reads).await {
        read?;
    }
    Ok(shards)
}

/// A key name whose slot is in `start..=end`: `<prefix>:probe:{<n>}` for the first `n` that fits.
pub fn probe_key(prefix: &str, start: u16, end: u16) -> String {
    (0u32..)
        .map(|n| format!("{prefix}:probe:{{{n}}}"))
        .find(|k| (start..=end).contains(&slot(k.as_bytes())))
        .expect("every slot is some n's")
}

/// A key's cluster slot: CRC16 (XMODEM) of its hash tag (what is between the first `{` and the
/// next `}`, when not empty) or of the whole name, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16_xmodem(tagged.unwrap_or(key)) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The layout last read, to tell when a shard's primary changed.
#[derive(Default)]
pub struct Layout {
    shards: Mutex<Vec<Shard>>,
}

impl Layout {
    /// Records a newly read layout; each primary replaced since the last one is reported once,
    /// as a failover (a range that moved between existing primaries, a resharding, is not).
    pub fn update(&self, now: Vec<Shard>, observer: &Observer) {
        let before = std::mem::replace(&mut *self.shards.lock().expect("layout"), now.clone());
        let still_primary: BTreeSet<&str> = now.iter().map(|s| s.primary_id.as_str()).collect();
        let mut reported = BTreeSet::new();
        for old in &before {
            if still_primary.contains(old.primary_id.as_str()) {
                continue;
            }
            if let Some(new) = now
                .iter()
                .find(|s| s.start <= old.start && old.start <= s.end)
                && reported.insert((old.primary.clone(), new.primary.clone()))
            {
                observer.redis_reconnected(
                    RedisReconnect::Failover,
                    Some(&old.primary),
                    &new.primary,
                );
            }
        }
    }

    /// Every node of the last layout read (empty before the first).
    pub fn nodes(&self) -> Vec<String> {
        nodes(&self.shards.lock().expect("layout"))
    }
}

/// The cluster connection, once the slot map could be read: a cluster that is down at start
/// delays readiness, not the process.
pub async fn connect(client: ClusterClient) -> ClusterConnection {
    let mut delay = Duration::from_millis(200);
    loop {
        match client.get_async_connection().await {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(error = %e, "Redis Cluster not reachable yet; retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64, id: &str) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(id.as_bytes().to_vec()),
        ])
    }

    fn range(start: i64, end: i64, nodes: Vec<Value>) -> Value {
        let mut v = vec![Value::Int(start), Value::Int(end)];
        v.extend(nodes);
        Value::Array(v)
    }

    #[test]
    fn slots_are_computed_as_redis_does() {
        // CLUSTER KEYSLOT's answers, and the CRC16 check value.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"somekey"), 11058);
        assert_eq!(slot(b"user:{foo}:x"), slot(b"foo"), "the hash tag decides");
        assert_eq!(
            slot(b"{}foo"),
            crc16_xmodem(b"{}foo") % 16384,
            "an empty tag: the whole name"
        );
        for (start, end) in [(0, 5460), (16383, 16383), (7000, 7000)] {
            let key = probe_key("gybc", start, end);
            assert!((start..=end).contains(&slot(key.as_bytes())), "{key}");
        }
    }

    #[test]
    fn slots_are_read_with_their_primary_and_replicas() {
        let v = Value::Array(vec![
            range(
                0,
                5460,
                vec![node("10.0.0.1", 7000, "a"), node("10.0.0.4", 7003, "d")],
            ),
            range(5461, 16383, vec![node("10.0.0.2", 7001, "b")]),
            Value::Int(3),
        ]);
        let shards = parse_slots(v);
        assert_eq!(shards.len(), 2, "the malformed entry is skipped");
        assert_eq!(shards[0].primary, "10.0.0.1:7000");
        assert_eq!(shards[0].replicas, ["10.0.0.4:7003"]);
        assert_eq!((shards[1].start, shards[1].end), (5461, 16383));
        assert_eq!(
            nodes(&shards),
            ["10.0.0.1:7000", "10.0.0.2:7001", "10.0.0.4:7003"]
        );
    }

    #[test]
    fn a_replaced_primary_is_reported_once_a_resharding_not_at_all() {
        let observer = Observer::default();
        let layout = Layout::default();
        let shard = |start, end, primary: &str, id: &str| Shard {
            start,
            end,
            primary: primary.into(),
            primary_id: id.into(),
            replicas: Vec::new(),
        };
        let failovers = |o: &Observer| o.metrics.redis_reconnects_count("failover");
        layout.update(
            vec![
                shard(0, 99, "a:1", "a"),
                shard(100, 199, "b:1", "b"),
                shard(200, 299, "a:1", "a"),
            ],
            &observer,
        );
        assert_eq!(failovers(&observer), 0, "the first layout is no change");
        // Slots moved from a to b: both are still primaries.
        layout.update(
            vec![shard(0, 149, "a:1", "a"), shard(150, 299, "b:1", "b")],
            &observer,
        );
        assert_eq!(failovers(&observer), 0);
        // a died; its replica c took over both of its ranges: one failover.
        layout.update(
            vec![shard(0, 149, "c:1", "c"), shard(150, 299, "b:1", "b")],
            &observer,
        );
        assert_eq!(failovers(&observer), 1);
        assert_eq!(layout.nodes(), ["c:1", "b:1"]);
    }
}
