//! Redis as the key commands and the key service write it (docs/key-store.md): the record under
//! `<prefix>:key:<hex>`, then two indexes for people (`<prefix>:key-id:<id>` → the hash, and
//! the tenant's keys newest first in the sorted set `<prefix>:tenant-keys:<tenant>`), then the
//! event. A change is a compare-and-set on the record, so concurrent changes never undo each other
//! (an update racing a revoke cannot bring the key back). Idempotency records live under
//! `<prefix>:idempotency:<digest>` with a TTL: digests and key ids only, never a secret. A key's
//! usage is read from the hourly hashes the data path writes (`crate::usage::read`). The bound on
//! a tenant's active keys is the ledger's (`redis/ledger.rs`).

mod ledger;

use std::ops::Range;

use super::{AdminError, Bound, Cursor, IdemEntry, KeyState, ListFilter, Page, page_of, state};
use crate::authn::apikey::KeyHash;
use crate::config::{DEFAULT_USAGE_RETENTION_DAYS, RedisConfig};
use crate::proto::v1::KeyEventType;
use crate::redis_conn::Redis;
use crate::store::KeyRecord;
use crate::store::redis::{decode_record, encode_event, encode_record};
use crate::usage::Bucket;
use crate::usage::read::read;

/// Compare-and-set of one record: the write happens only if nobody changed it since it was read.
const CAS: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// How often a change retries when another change won the compare-and-set.
const CAS_ATTEMPTS: usize = 8;

pub struct RedisAdmin {
    redis: Redis,
    prefix: String,
    usage_retention_days: u32,
}

fn unavailable(e: redis::RedisError) -> AdminError {
    AdminError::Unavailable(e.to_string())
}

impl RedisAdmin {
    /// The clients, connecting in the background: no command is sent yet.
    pub async fn open(cfg: &RedisConfig) -> Result<Self, AdminError> {
        let redis = Redis::connect(cfg)
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
        Ok(Self {
            redis,
            prefix: cfg.key_prefix.clone(),
            usage_retention_days: DEFAULT_USAGE_RETENTION_DAYS,
        })
    }

    /// Whether Redis takes commands now (a cluster connection still being set up is waited for).
    pub(super) async fn ping(&self) -> bool {
        self.redis.check().await
    }

    /// How long the data path keeps usage (`usage.retention_days`).
    pub fn with_usage_retention_days(mut self, days: u32) -> Self {
        self.usage_retention_days = days;
        self
    }

    pub(super) fn usage_retention_days(&self) -> u32 {
        self.usage_retention_days
    }

    /// The fleet's hourly counts of a key (`<prefix>:usage:{<id>}:<yyyymmddhh>`).
    pub(super) async fn usage(
        &self,
        id: &str,
        hours: Range<u64>,
    ) -> Result<Vec<Bucket>, AdminError> {
        read(&self.redis, &self.prefix, id, hours)
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))
    }

    fn id_index(&self, id: &str) -> String {
        format!("{}:key-id:{id}", self.prefix)
    }

    fn tenant_index(&self, tenant: &str) -> String {
        format!("{}:tenant-keys:{tenant}", self.prefix)
    }

    fn idem_name(&self, slot: &str) -> String {
        format!("{}:idempotency:{slot}", self.prefix)
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, AdminError> {
        let mut conn = self.redis.conn.clone();
        cmd.query_async(&mut conn).await.map_err(unavailable)
    }

    /// A place in the tenant's ledger (refused over `bound`), the new record (refused if one with
    /// this hash exists), its indexes, then the event.
    pub(super) async fn insert(
        &self,
        r: &KeyRecord,
        bound: Bound,
        replacing: Option<&str>,
        now: u64,
    ) -> Result<(), AdminError> {
        let started = std::time::Instant::now();
        self.reserve(r, bound, replacing, now).await?;
        // A place held too long may be freed by a check as a create that died: write behind it
        // only while it is surely ours.
        let written = if started.elapsed() < ledger::write_within() {
            self.write_new(r).await
        } else {
            Err(AdminError::Unavailable(
                "the key store answered too slowly".into(),
            ))
        };
        if let Err(e) = written {
            self.settle(&r.tenant, &r.id, None).await;
            return Err(e);
        }
        self.index(r).await?;
        // Written only once the id index finds the record: a check of the ledger looks records up
        // by id, and drops an entry marked written whose record it cannot find.
        self.settle(&r.tenant, &r.id, Some(ledger::entry(r.expires_at, 0)))
            .await;
        self.publish(&r.hash, KeyEventType::Created).await
    }

    /// The record itself, refused if one with this hash exists.
    async fn write_new(&self, r: &KeyRecord) -> Result<(), AdminError> {
        let name = self.redis.names.key(&r.hash);
        let record = encode_record(r);
        let written: Option<String> = self
            .query(redis::cmd("SET").arg(&name).arg(&record).arg("NX"))
            .await?;
        if written.is_none() {
            // Sent again after a failover broke the connection before the answer, the first SET
            // may have been applied: then the record there is this one.
            let stored: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&name)).await?;
            if stored.as_deref() != Some(record.as_slice()) {
                return Err(AdminError::Write(
                    "a record with this hash exists already".into(),
                ));
            }
        }
        Ok(())
    }

    /// The id index and the tenant's list, both pointing at `r`.
    async fn index(&self, r: &KeyRecord) -> Result<(), AdminError> {
        let _: () = self
            .query(
                redis::cmd("SET")
                    .arg(self.id_index(&r.id))
                    .arg(r.hash.to_hex()),
            )
            .await?;
        let _: i64 = self
            .query(
                redis::cmd("ZADD")
                    .arg(self.tenant_index(&r.tenant))
                    .arg(r.created_at.unwrap_or(0))
                    .arg(&r.id),
            )
            .await?;
        Ok(())
    }

    /// After the write: a replica hearing the event reads the new record.
    async fn publish(&self, hash: &KeyHash, event: KeyEventType) -> Result<(), AdminError> {
        let _: i64 = self
            .query(
                redis::cmd("PUBLISH")
                    .arg(self.redis.names.events_channel())
                    .arg(encode_event(hash, event)),
            )
            .await?;
        Ok(())
    }

    /// The record and its stored bytes, found through the id index.
    async fn by_index(&self, id: &str) -> Result<Option<(KeyRecord, Vec<u8>)>, AdminError> {
        let hex: Option<String> = self.query(redis::cmd("GET").arg(self.id_index(id))).await?;
        let Some(hash) = hex.as_deref().and_then(KeyHash::parse) else {
            return Ok(None);
        };
        let bytes: Option<Vec<u8>> = self
            .query(redis::cmd("GET").arg(self.redis.names.key(&hash)))
            .await?;
        Ok(bytes.and_then(|b| {
            decode_record(&b, &hash)
                .ok()
                .filter(|r| r.id == id)
                .map(|r| (r, b))
        }))
    }

    /// The record with this id. `scan`: records written before the indexes existed are found by
    /// a full SCAN (the operator's CLI only; the key service never scans).
    pub(super) async fn find(&self, id: &str, scan: bool) -> Result<Option<KeyRecord>, AdminError> {
        if let Some((r, _)) = self.by_index(id).await? {
            return Ok(Some(r));
        }
        if !scan {
            return Ok(None);
        }
        Ok(self.all().await?.into_iter().find(|r| r.id == id))
    }

    /// Read, change, compare-and-set, publish; retried when another change came in between. A
    /// key active after the change is in the tenant's ledger before the write (one that was not
    /// active counts against `bound`), and as it is after.
    pub(super) async fn change(
        &self,
        id: &str,
        scan: bool,
        event: KeyEventType,
        bound: Bound,
        now: u64,
        f: impl Fn(&mut KeyRecord) -> Result<(), AdminError>,
    ) -> Result<KeyRecord, AdminError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut r, old) = match self.by_index(id).await? {
                Some(found) => found,
                None if scan => match self.all().await?.into_iter().find(|r| r.id == id) {
                    Some(r) => {
                        let b = encode_record(&r);
                        // The stored bytes may differ from a re-encoding: compare against them.
                        let stored: Option<Vec<u8>> = self
                            .query(redis::cmd("GET").arg(self.redis.names.key(&r.hash)))
                            .await?;
                        (r, stored.unwrap_or(b))
                    }
                    None => return Err(AdminError::NotFound(id.to_owned())),
                },
                None => return Err(AdminError::NotFound(id.to_owned())),
            };
            let (was_active, old_expiry) = (state(&r, now) == KeyState::Active, r.expires_at);
            f(&mut r)?;
            let active = state(&r, now) == KeyState::Active;
            if active {
                let wide = if was_active {
                    ledger::widest(old_expiry, r.expires_at)
                } else {
                    r.expires_at
                };
                let bound = if was_active { None } else { bound };
                self.widen(&r.tenant, id, wide, bound, now).await?;
            }
            let mut conn = self.redis.conn.clone();
            let set: i64 = redis::Script::new(CAS)
                .key(self.redis.names.key(&r.hash))
                .arg(old)
                .arg(encode_record(&r))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if set == 1 {
                self.settle(
                    &r.tenant,
                    id,
                    active.then(|| ledger::entry(r.expires_at, 0)),
                )
                .await;
                // Indexes a record written before they existed, so the key service finds it.
                self.index(&r).await?;
                self.publish(&r.hash, event).await?;
                return Ok(r);
            }
        }
        Err(AdminError::Conflict(format!(
            "key `{id}` is changing too often; retry"
        )))
    }

    /// One page of a tenant's keys from its sorted set: by creation time descending, and equal
    /// times by id descending (Redis's order for equal scores), resuming after `after`.
    pub(super) async fn list_page(
        &self,
        tenant: &str,
        filter: ListFilter,
        page_size: usize,
        after: Option<&Cursor>,
        now: u64,
    ) -> Result<Page, AdminError> {
        let index = self.tenant_index(tenant);
        let max = after.map_or("+inf".to_owned(), |c| c.created_at.to_string());
        let batch = (page_size + 1).clamp(16, 256);
        let mut offset = 0;
        let mut records = Vec::new();
        // Read until a page (plus one, to know whether more follow) or the scan limit is in hand.
        while records.len() <= super::LIST_SCAN_LIMIT {
            let ids: Vec<(String, u64)> = self
                .query(
                    redis::cmd("ZREVRANGEBYSCORE")
                        .arg(&index)
                        .arg(&max)
                        .arg("-inf")
                        .arg("WITHSCORES")
                        .arg("LIMIT")
                        .arg(offset)
                        .arg(batch),
                )
                .await?;
            if ids.is_empty() {
                break;
            }
            offset += ids.len();
            for (id, created) in ids {
                if after.is_some_and(|c| created == c.created_at && id >= c.id) {
                    continue;
                }
                // A stale index entry (its record deleted) or another tenant's record is skipped.
                if let Some((r, _)) = self.by_index(&id).await?
                    && r.tenant == tenant
                {
                    records.push(r);
                }
            }
            let matching = records.iter().filter(|r| filter.matches(r, now)).count();
            if matching > page_size {
                break;
            }
        }
        Ok(page_of(records.into_iter(), filter, page_size, now))
    }

    /// Every record: SCAN over each primary (every shard of a cluster, found through CLUSTER
    /// SLOTS; with Sentinel, the primary the sentinels name).
    pub(super) async fn all(&self) -> Result<Vec<KeyRecord>, AdminError> {
        let redis = &self.redis;
        let pattern = format!(
            "{}*",
            redis.names.key(&KeyHash([0; 32])).trim_end_matches('0')
        );
        let mut names = Vec::new();
        for client in redis.primaries().await.map_err(unavailable)? {
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .map_err(unavailable)?;
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut c)
                    .await
                    .map_err(unavailable)?;
                names.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            let Some(hash) = name.rsplit(':').next().and_then(KeyHash::parse) else {
                continue;
            };
            let bytes: Option<Vec<u8>> = self.query(redis::cmd("GET").arg(&name)).await?;
            if let Some(rec) = bytes.and_then(|b| decode_record(&b, &hash).ok()) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    // === idempotency ===

    /// Claims `slot` (SET NX with the pending TTL), or reads the record that holds it.
    pub(super) async fn claim(
        &self,
        slot: &str,
        pending: &IdemEntry,
    ) -> Result<Option<IdemEntry>, AdminError> {
        let name = self.idem_name(slot);
        let value = serde_json::to_string(pending).map_err(|e| AdminError::Write(e.to_string()))?;
        for _ in 0..CAS_ATTEMPTS {
            let set: Option<String> = self
                .query(
                    redis::cmd("SET")
                        .arg(&name)
                        .arg(&value)
                        .arg("NX")
                        .arg("EX")
                        .arg(super::IDEMPOTENCY_PENDING_SECS),
                )
                .await?;
            if set.is_some() {
                return Ok(None);
            }
            let held: Option<String> = self.query(redis::cmd("GET").arg(&name)).await?;
            // Gone between the two commands (expired or released): try to claim again.
            if let Some(held) = held {
                return serde_json::from_str(&held)
                    .map(Some)
                    .map_err(|e| AdminError::Invalid(format!("{name}: {e}")));
            }
        }
        Err(AdminError::Conflict(
            "the Idempotency-Key is contended; retry".into(),
        ))
    }

    /// Sets (`Some`, for `IDEMPOTENCY_TTL_SECS`) or frees (`None`) the record of `slot`.
    pub(super) async fn put_idem(
        &self,
        slot: &str,
        entry: Option<&IdemEntry>,
    ) -> Result<(), AdminError> {
        let name = self.idem_name(slot);
        match entry {
            Some(e) => {
                let value =
                    serde_json::to_string(e).map_err(|e| AdminError::Write(e.to_string()))?;
                self.query(
                    redis::cmd("SET")
                        .arg(&name)
                        .arg(value)
                        .arg("EX")
                        .arg(super::IDEMPOTENCY_TTL_SECS),
                )
                .await
            }
            None => {
                let _: i64 = self.query(redis::cmd("DEL").arg(&name)).await?;
                Ok(())
            }
        }
    }
}
