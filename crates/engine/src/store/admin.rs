//! Key changes against the configured store, the one implementation behind `gybc-authz keys …`
//! and the key service (`gybc-authz key-service`), so the two can never disagree: create, find,
//! list a tenant's keys a page at a time, update, rotate, revoke, and idempotent retries of a
//! create or rotate, and a key's usage per hour (Redis only). The stores: the key file, rewritten atomically under a lock
//! (`admin/file.rs`), or Redis, written as docs/key-store.md says: record, indexes, then the
//! event (`admin/redis.rs`). A create (and a change that makes a key active again) may be bounded
//! by the most active keys a tenant may hold (`Bound`): counted under the file's lock, or by a
//! Lua script on the tenant's ledger in Redis, so concurrent creates never pass the bound.

mod file;
mod memory;
mod redis;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::authn::apikey::{ApiKey, KeyHash, KeyKind, random_base62};
use crate::config::{Config, DEFAULT_USAGE_RETENTION_DAYS, KeyStoreConfig};
use crate::proto::v1::KeyEventType;
use crate::ratelimit::RateLimit;
use crate::store::{KeyRecord, KeyStatus};
use crate::usage::read::hours_covering;
use crate::usage::{Bucket, Counts, HOUR_SECS};

pub use self::memory::MemoryAdmin;
pub use self::redis::RedisAdmin;

/// Why a key command failed; each maps to an exit code (and, in the key service, a status).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no key with id `{0}`")]
    NotFound(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The same `Idempotency-Key` is being used by a request still in progress.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The same `Idempotency-Key` came with a different request.
    #[error("the Idempotency-Key was already used for a different request")]
    IdempotencyMismatch,
    #[error("key store unreachable: {0}")]
    Unavailable(String),
    #[error("cannot write the key store: {0}")]
    Write(String),
    #[error("no key store configured: set key_store.type to file or redis")]
    NoStore,
    /// The tenant holds the most active keys it may (`key_service.max_active_keys_per_tenant`).
    #[error("the tenant holds {0} active keys, the most it may; revoke one first")]
    KeyLimit(u32),
    /// Usage is summed over the fleet in Redis; with a key file none is kept.
    #[error(
        "usage per key is read from Redis (key_store.type: redis); with a key file no usage is kept"
    )]
    NoUsage,
}

impl AdminError {
    /// sysexits-style codes, so scripts can tell the cases apart.
    pub fn exit_code(&self) -> u8 {
        match self {
            AdminError::NotFound(_) => 3,
            AdminError::Invalid(_) | AdminError::IdempotencyMismatch | AdminError::KeyLimit(_) => {
                65
            }
            AdminError::NoStore | AdminError::NoUsage => 64,
            AdminError::Unavailable(_) => 69,
            AdminError::Write(_) => 74,
            AdminError::Conflict(_) => 75,
        }
    }
}

/// What a new key gets.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub tenant: String,
    pub kind: KeyKind,
    pub scopes: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub expires_at: Option<u64>,
    pub name: Option<String>,
    pub allowed_origins: Vec<String>,
    pub jwt_provider: Option<String>,
    pub identity_platform_tenant: Option<String>,
}

/// A created key: the secret, shown once, and its record.
pub struct Created {
    pub key: String,
    pub record: KeyRecord,
}

/// The answer to a create or rotate: a new key with its secret, or, for a retry with the same
/// `Idempotency-Key`, the key the first request made. The secret is never kept, so a replay has
/// none: a caller that lost the first answer rotates the key.
pub enum Minted {
    New(Created),
    Replayed(KeyRecord),
}

impl Minted {
    pub fn record(&self) -> &KeyRecord {
        match self {
            Minted::New(c) => &c.record,
            Minted::Replayed(r) => r,
        }
    }

    /// The secret, on the first answer only.
    pub fn secret(&self) -> Option<&str> {
        match self {
            Minted::New(c) => Some(&c.key),
            Minted::Replayed(_) => None,
        }
    }
}

/// Whose keys a call may touch: the operator (the `keys` CLI) every tenant's; a key-service
/// caller its own tenant's only, and another tenant's key is "not found", exactly as a missing one.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    All,
    Tenant(&'a str),
}

impl Scope<'_> {
    fn allows(&self, r: &KeyRecord) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => r.tenant == *t,
        }
    }

    fn tenant(&self) -> &str {
        match self {
            Scope::All => "",
            Scope::Tenant(t) => t,
        }
    }
}

/// How many active keys (neither revoked nor expired) a tenant may hold after a create, or after
/// a change that makes a key active again. `None`: no bound (the operator's `keys` CLI). Either
/// way the Redis ledger of active keys is kept, so a bounded create counts every key.
pub type Bound = Option<u32>;

/// What an update changes; `None` leaves a field as it is. Never the tenant or the kind.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub name: Option<Option<String>>,
    pub scopes: Option<Vec<String>>,
    pub rate_limit: Option<Option<RateLimit>>,
    pub allowed_origins: Option<Vec<String>>,
    pub expires_at: Option<Option<u64>>,
}

impl Changes {
    fn apply(&self, r: &mut KeyRecord) -> Result<(), AdminError> {
        if r.status != KeyStatus::Active {
            return Err(AdminError::Invalid(format!(
                "key `{}` is revoked and cannot change",
                r.id
            )));
        }
        if r.kind == KeyKind::Secret && self.allowed_origins.as_ref().is_some_and(|o| !o.is_empty())
        {
            return Err(AdminError::Invalid(
                "allowed origins are for publishable keys".into(),
            ));
        }
        if let Some(v) = &self.name {
            r.name = v.clone();
        }
        if let Some(v) = &self.scopes {
            r.scopes = v.clone();
        }
        if let Some(v) = self.rate_limit {
            r.rate_limit = v;
        }
        if let Some(v) = &self.allowed_origins {
            r.allowed_origins = v.clone();
        }
        if let Some(v) = self.expires_at {
            r.expires_at = v;
        }
        Ok(())
    }
}

/// A key's state as people see it; the data path refuses all but `Active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    /// Past its expiry, e.g. a rotated key after its grace period.
    Expired,
    Revoked,
}

pub fn state(r: &KeyRecord, now: u64) -> KeyState {
    match (r.status, r.expires_at) {
        (KeyStatus::Revoked, _) => KeyState::Revoked,
        (KeyStatus::Active, Some(t)) if t <= now => KeyState::Expired,
        (KeyStatus::Active, _) => KeyState::Active,
    }
}

/// Which keys a list shows; `None` = any.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListFilter {
    pub kind: Option<KeyKind>,
    pub state: Option<KeyState>,
}

impl ListFilter {
    fn matches(&self, r: &KeyRecord, now: u64) -> bool {
        self.kind.is_none_or(|k| k == r.kind) && self.state.is_none_or(|s| s == state(r, now))
    }
}

/// A key's decisions over a range of whole hours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub id: String,
    /// Unix seconds: the first hour's start, and the end of the last hour (excluded).
    pub start: u64,
    pub end: u64,
    /// Hours with at least one decision, oldest first.
    pub buckets: Vec<Bucket>,
    pub total: Counts,
}

/// Where a page ends: lists run newest first, by creation time and then id, both descending, so
/// the next page starts after this key. Its text form is the key service's opaque page token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: u64,
    pub id: String,
}

impl Cursor {
    fn of(r: &KeyRecord) -> Self {
        Cursor {
            created_at: r.created_at.unwrap_or(0),
            id: r.id.clone(),
        }
    }

    /// Opaque to callers: hex, so it needs no escaping in JSON or a URL.
    pub fn encode(&self) -> String {
        hex::encode(format!("{}:{}", self.created_at, self.id))
    }

    pub fn decode(token: &str) -> Option<Self> {
        let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
        let (t, id) = text.split_once(':')?;
        if id.is_empty() {
            return None;
        }
        Some(Cursor {
            created_at: t.parse().ok()?,
            id: id.to_owned(),
        })
    }

    /// True when `r` comes after this cursor in list order (newest first).
    fn before(&self, r: &KeyRecord) -> bool {
        (r.created_at.unwrap_or(0), r.id.as_str()) < (self.created_at, self.id.as_str())
    }
}

/// One page of a list: the keys, and where the next page starts (`None`: this was the last).
pub struct Page {
    pub records: Vec<KeyRecord>,
    pub next: Option<Cursor>,
}

/// Keys a list looks at before it answers with a short page (and a cursor to go on from), so a
/// filter that matches little cannot make one request read a whole large tenant.
pub const LIST_SCAN_LIMIT: usize = 1000;

/// An `Idempotency-Key` and what it came with: a retry with the same key and the same request gets
/// the first answer's key; the same key with another request is refused.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The caller's `Idempotency-Key` value.
    pub key: String,
    /// A digest of the request (any stable encoding): tells a retry from a reuse.
    pub fingerprint: [u8; 32],
}

/// How long a finished create or rotate is remembered for its retries.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;
/// How long a request in progress holds its `Idempotency-Key` (a crashed writer frees it then).
pub const IDEMPOTENCY_PENDING_SECS: u64 = 60;

/// What the store remembers of one idempotent request: never the secret, only the digest of the
/// request and the ids of the keys it made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct IdemEntry {
    fingerprint: String,
    /// Unset while the request is in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    /// A rotate: the key it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replaced_id: Option<String>,
    /// Unix seconds.
    expires_at: u64,
}

/// What the store said when a request claimed its `Idempotency-Key`.
enum Claim {
    /// First use: the request goes ahead and finishes (or releases) the claim.
    New,
    /// Done before: answer with these keys.
    Done(IdemEntry),
}

pub enum AdminStore {
    File(PathBuf),
    Redis(Box<RedisAdmin>),
    /// Dev mode: in memory, behind the dev data path's store.
    Memory(Box<MemoryAdmin>),
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AdminStore {
    /// The store the config names; Redis must answer now (the `keys` commands fail fast).
    pub async fn from_config(cfg: &Config) -> Result<Self, AdminError> {
        let store = Self::open(cfg).await?;
        if let AdminStore::Redis(r) = &store
            && !r.ping().await
        {
            let asked = cfg.redis.as_ref().map(|r| match &r.sentinel {
                Some(s) => format!(
                    "the primary `{}` of the sentinels {}",
                    s.master_name,
                    s.urls.join(", ")
                ),
                None => r.urls.join(", "),
            });
            return Err(AdminError::Unavailable(format!(
                "no answer from {}",
                asked.unwrap_or_default()
            )));
        }
        Ok(store)
    }

    /// The store the config names without asking Redis anything yet: the key service starts while
    /// Redis is down, and is not ready until it answers (`reachable`).
    pub async fn open(cfg: &Config) -> Result<Self, AdminError> {
        match &cfg.key_store {
            KeyStoreConfig::File { path, .. } => Ok(AdminStore::File(path.clone())),
            KeyStoreConfig::Redis => {
                let r = cfg.redis.as_ref().ok_or(AdminError::NoStore)?;
                let admin = RedisAdmin::open(r).await?;
                Ok(AdminStore::Redis(Box::new(
                    admin.with_usage_retention_days(cfg.usage.retention_days),
                )))
            }
            KeyStoreConfig::None => Err(AdminError::NoStore),
        }
    }

    /// Whether a change could be made now: Redis answers a PING; the key file can be read (or does
    /// not exist yet, and its directory can be read); memory always.
    pub async fn reachable(&self) -> bool {
        match self {
            AdminStore::Redis(r) => r.ping().await,
            AdminStore::File(path) => match std::fs::metadata(path) {
                Ok(m) => m.is_file() && std::fs::File::open(path).is_ok(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                    std::fs::read_dir(dir.unwrap_or(std::path::Path::new("."))).is_ok()
                }
                Err(_) => false,
            },
            AdminStore::Memory(_) => true,
        }
    }

    /// Every record of a store read whole (the key file, or memory); Redis is never read whole
    /// but by the CLI's `list`.
    fn read_local(&self) -> Result<Vec<KeyRecord>, AdminError> {
        match self {
            AdminStore::File(path) => file::read(path),
            AdminStore::Memory(m) => Ok(m.read()),
            AdminStore::Redis(_) => Ok(Vec::new()),
        }
    }

    /// Every key of every tenant, by tenant and id (the operator's view).
    pub async fn list(&self) -> Result<Vec<KeyRecord>, AdminError> {
        let mut all = match self {
            AdminStore::File(path) => file::read(path)?,
            AdminStore::Redis(r) => r.all().await?,
            AdminStore::Memory(_) => self.read_local()?,
        };
        all.sort_by(|a, b| {
            (a.tenant.as_str(), a.id.as_str()).cmp(&(b.tenant.as_str(), b.id.as_str()))
        });
        Ok(all)
    }

    /// One page of a tenant's keys, newest first, from `after` on.
    pub async fn list_page(
        &self,
        tenant: &str,
        filter: ListFilter,
        page_size: usize,
        after: Option<&Cursor>,
    ) -> Result<Page, AdminError> {
        let now = now_secs();
        match self {
            AdminStore::Redis(r) => r.list_page(tenant, filter, page_size, after, now).await,
            AdminStore::File(_) | AdminStore::Memory(_) => {
                let mut mine: Vec<KeyRecord> = self
                    .read_local()?
                    .into_iter()
                    .filter(|r| r.tenant == tenant)
                    .collect();
                mine.sort_by(|a, b| Cursor::of(b).cmp_key().cmp(&Cursor::of(a).cmp_key()));
                let rest = mine
                    .into_iter()
                    .filter(|r| after.is_none_or(|c| c.before(r)));
                Ok(page_of(rest, filter, page_size, now))
            }
        }
    }

    /// The key with this id, if the scope may see it.
    pub async fn find(&self, scope: Scope<'_>, id: &str) -> Result<KeyRecord, AdminError> {
        let found = match self {
            AdminStore::File(path) => file::read(path)?.into_iter().find(|r| r.id == id),
            AdminStore::Memory(_) => self.read_local()?.into_iter().find(|r| r.id == id),
            AdminStore::Redis(r) => r.find(id, matches!(scope, Scope::All)).await?,
        };
        found
            .filter(|r| scope.allows(r))
            .ok_or_else(|| AdminError::NotFound(id.to_owned()))
    }

    /// A key's decisions per hour over `[start, end)` (Unix seconds, widened to whole hours),
    /// summed over every replica, if the scope may see the key.
    pub async fn usage(
        &self,
        scope: Scope<'_>,
        id: &str,
        start: u64,
        end: u64,
    ) -> Result<KeyUsage, AdminError> {
        let r = self.find(scope, id).await?;
        let AdminStore::Redis(redis) = self else {
            return Err(AdminError::NoUsage);
        };
        let hours = hours_covering(start, end);
        let buckets = redis.usage(&r.id, hours.clone()).await?;
        let mut total = Counts::default();
        for b in &buckets {
            total.add(b.counts);
        }
        Ok(KeyUsage {
            id: r.id,
            start: hours.start * HOUR_SECS,
            end: hours.end * HOUR_SECS,
            buckets,
            total,
        })
    }

    /// How far back usage is kept (`usage.retention_days`): the longest range worth reading.
    pub fn usage_retention_secs(&self) -> u64 {
        let days = match self {
            AdminStore::Redis(r) => r.usage_retention_days(),
            AdminStore::File(_) | AdminStore::Memory(_) => DEFAULT_USAGE_RETENTION_DAYS,
        };
        u64::from(days) * 86_400
    }

    pub async fn get(&self, id: &str) -> Result<KeyRecord, AdminError> {
        self.find(Scope::All, id).await
    }

    /// A new key, unbounded (the operator's `keys create`).
    pub async fn create(&self, new: NewKey) -> Result<Created, AdminError> {
        self.create_bounded(new, None, None).await
    }

    /// A new key, refused with `KeyLimit` if its tenant holds `bound` active keys already, not
    /// counting `replacing` (the key a rotation replaces: a tenant at its bound can still rotate,
    /// and holds one key over it only while a grace period runs).
    async fn create_bounded(
        &self,
        new: NewKey,
        bound: Bound,
        replacing: Option<&str>,
    ) -> Result<Created, AdminError> {
        if new.tenant.trim().is_empty() || new.tenant.contains(char::is_control) {
            return Err(AdminError::Invalid(
                "--tenant must be a non-empty string".into(),
            ));
        }
        if new.kind == KeyKind::Secret
            && (!new.allowed_origins.is_empty()
                || new.jwt_provider.is_some()
                || new.identity_platform_tenant.is_some())
        {
            return Err(AdminError::Invalid(
                "--allowed-origin, --jwt-provider and --identity-platform-tenant are for publishable keys".into(),
            ));
        }
        let key = ApiKey::generate(new.kind);
        let record = KeyRecord {
            id: format!("key_{}", random_base62(16)),
            hash: KeyHash::of(&key),
            kind: new.kind,
            tenant: new.tenant,
            scopes: new.scopes,
            rate_limit: new.rate_limit,
            status: KeyStatus::Active,
            expires_at: new.expires_at,
            name: new.name,
            created_at: Some(now_secs()),
            allowed_origins: new.allowed_origins,
            jwt_provider: new.jwt_provider,
            identity_platform_tenant: new.identity_platform_tenant,
        };
        let now = now_secs();
        // Under the lock: counted and written at once, so no concurrent create passes the bound.
        let push = |records: &mut Vec<KeyRecord>| {
            if let Some(max) = bound
                && active_in(records, &record.tenant, replacing, now) >= max as usize
            {
                return Err(AdminError::KeyLimit(max));
            }
            records.push(record.clone());
            Ok(())
        };
        match self {
            AdminStore::File(path) => file::update(path, push)?,
            AdminStore::Redis(r) => r.insert(&record, bound, replacing, now).await?,
            AdminStore::Memory(m) => m.update(push)?,
        }
        Ok(Created { key, record })
    }

    /// A create that a retry with the same `Idempotency-Key` answers with the same key.
    pub async fn create_once(
        &self,
        new: NewKey,
        idem: Option<&Idempotency>,
        bound: Bound,
    ) -> Result<Minted, AdminError> {
        let scope = Scope::Tenant(&new.tenant);
        let Some(idem) = idem else {
            return Ok(Minted::New(self.create_bounded(new, bound, None).await?));
        };
        let slot = idem_slot(scope, "create", idem);
        match self.claim(&slot, idem).await? {
            Claim::Done(e) => {
                let id = e.key_id.unwrap_or_default();
                Ok(Minted::Replayed(self.find(scope, &id).await?))
            }
            Claim::New => match self.create_bounded(new, bound, None).await {
                Ok(c) => {
                    self.finish(&slot, idem, &c.record.id, None).await?;
                    Ok(Minted::New(c))
                }
                Err(e) => {
                    self.release(&slot).await;
                    Err(e)
                }
            },
        }
    }

    pub async fn revoke(&self, id: &str) -> Result<KeyRecord, AdminError> {
        self.revoke_in(Scope::All, id).await
    }

    /// Revokes a key; revoking a revoked key changes nothing and answers the same.
    pub async fn revoke_in(&self, scope: Scope<'_>, id: &str) -> Result<KeyRecord, AdminError> {
        self.change(scope, id, KeyEventType::Revoked, None, |r| {
            r.status = KeyStatus::Revoked;
            Ok(())
        })
        .await
    }

    /// Changes a key; one that is expired and would be active again counts against `bound`.
    pub async fn update(
        &self,
        scope: Scope<'_>,
        id: &str,
        changes: &Changes,
        bound: Bound,
    ) -> Result<KeyRecord, AdminError> {
        self.change(scope, id, KeyEventType::Updated, bound, |r| {
            changes.apply(r)
        })
        .await
    }

    /// A new key with the same metadata; the old one keeps working for `grace`, then expires.
    pub async fn rotate(
        &self,
        id: &str,
        grace: Duration,
    ) -> Result<(Created, KeyRecord), AdminError> {
        match self.rotate_in(Scope::All, id, grace, None, None).await? {
            (Minted::New(c), old) => Ok((c, old)),
            (Minted::Replayed(_), _) => unreachable!("no idempotency key, no replay"),
        }
    }

    /// `rotate` for a scope, with an optional `Idempotency-Key`.
    pub async fn rotate_in(
        &self,
        scope: Scope<'_>,
        id: &str,
        grace: Duration,
        idem: Option<&Idempotency>,
        bound: Bound,
    ) -> Result<(Minted, KeyRecord), AdminError> {
        let Some(idem) = idem else {
            return self.rotate_now(scope, id, grace, bound).await;
        };
        let slot = idem_slot(scope, &format!("rotate:{id}"), idem);
        match self.claim(&slot, idem).await? {
            Claim::Done(e) => {
                let new = self.find(scope, e.key_id.as_deref().unwrap_or("")).await?;
                let old = self
                    .find(scope, e.replaced_id.as_deref().unwrap_or(id))
                    .await?;
                Ok((Minted::Replayed(new), old))
            }
            Claim::New => match self.rotate_now(scope, id, grace, bound).await {
                Ok((new, old)) => {
                    self.finish(&slot, idem, &new.record().id, Some(&old.id))
                        .await?;
                    Ok((new, old))
                }
                Err(e) => {
                    self.release(&slot).await;
                    Err(e)
                }
            },
        }
    }

    async fn rotate_now(
        &self,
        scope: Scope<'_>,
        id: &str,
        grace: Duration,
        bound: Bound,
    ) -> Result<(Minted, KeyRecord), AdminError> {
        let old = self.find(scope, id).await?;
        if old.status != KeyStatus::Active {
            return Err(AdminError::Invalid(format!(
                "key `{id}` is revoked; create a new one instead"
            )));
        }
        let created = self
            .create_bounded(
                NewKey {
                    tenant: old.tenant.clone(),
                    kind: old.kind,
                    scopes: old.scopes.clone(),
                    rate_limit: old.rate_limit,
                    expires_at: old.expires_at,
                    name: old.name.clone(),
                    allowed_origins: old.allowed_origins.clone(),
                    jwt_provider: old.jwt_provider.clone(),
                    identity_platform_tenant: old.identity_platform_tenant.clone(),
                },
                bound,
                Some(id),
            )
            .await?;
        let until = now_secs() + grace.as_secs();
        let old = self
            .change(scope, id, KeyEventType::Updated, None, |r| {
                r.expires_at = Some(r.expires_at.map_or(until, |e| e.min(until)));
                Ok(())
            })
            .await?;
        Ok((Minted::New(created), old))
    }

    /// Read, change and write one record, so that no concurrent change is lost: under the file's
    /// lock, or as a compare-and-set on Redis; then the event, so every replica re-reads it. A
    /// change that makes an inactive key active again counts against `bound`.
    async fn change(
        &self,
        scope: Scope<'_>,
        id: &str,
        event: KeyEventType,
        bound: Bound,
        f: impl Fn(&mut KeyRecord) -> Result<(), AdminError>,
    ) -> Result<KeyRecord, AdminError> {
        let now = now_secs();
        match self {
            AdminStore::File(_) | AdminStore::Memory(_) => {
                let mut changed = None;
                let edit = |records: &mut Vec<KeyRecord>| {
                    let i = records
                        .iter()
                        .position(|r| r.id == id && scope.allows(r))
                        .ok_or_else(|| AdminError::NotFound(id.to_owned()))?;
                    let mut r = records[i].clone();
                    let was = state(&r, now);
                    f(&mut r)?;
                    if let Some(max) = bound
                        && was != KeyState::Active
                        && state(&r, now) == KeyState::Active
                        && active_in(records, &r.tenant, Some(id), now) >= max as usize
                    {
                        return Err(AdminError::KeyLimit(max));
                    }
                    changed = Some(r.clone());
                    records[i] = r;
                    Ok(())
                };
                match self {
                    AdminStore::Memory(m) => m.update(edit)?,
                    AdminStore::File(path) => file::update(path, edit)?,
                    AdminStore::Redis(_) => {}
                }
                changed.ok_or_else(|| AdminError::NotFound(id.to_owned()))
            }
            AdminStore::Redis(redis) => {
                redis
                    .change(id, matches!(scope, Scope::All), event, bound, now, |r| {
                        if !scope.allows(r) {
                            return Err(AdminError::NotFound(id.to_owned()));
                        }
                        f(r)
                    })
                    .await
            }
        }
    }

    // === idempotency ===

    async fn claim(&self, slot: &str, idem: &Idempotency) -> Result<Claim, AdminError> {
        let pending = IdemEntry {
            fingerprint: hex::encode(idem.fingerprint),
            key_id: None,
            replaced_id: None,
            expires_at: now_secs() + IDEMPOTENCY_PENDING_SECS,
        };
        let existing = match self {
            AdminStore::File(path) => file::claim(path, slot, &pending)?,
            AdminStore::Redis(r) => r.claim(slot, &pending).await?,
            AdminStore::Memory(m) => m.claim(slot, &pending),
        };
        match existing {
            None => Ok(Claim::New),
            Some(e) if e.fingerprint != pending.fingerprint => Err(AdminError::IdempotencyMismatch),
            Some(e) if e.key_id.is_none() => Err(AdminError::Conflict(
                "a request with this Idempotency-Key is still in progress; retry shortly".into(),
            )),
            Some(e) => Ok(Claim::Done(e)),
        }
    }

    async fn finish(
        &self,
        slot: &str,
        idem: &Idempotency,
        key_id: &str,
        replaced_id: Option<&str>,
    ) -> Result<(), AdminError> {
        let done = IdemEntry {
            fingerprint: hex::encode(idem.fingerprint),
            key_id: Some(key_id.to_owned()),
            replaced_id: replaced_id.map(str::to_owned),
            expires_at: now_secs() + IDEMPOTENCY_TTL_SECS,
        };
        match self {
            AdminStore::File(path) => file::put_idem(path, slot, Some(&done)),
            AdminStore::Redis(r) => r.put_idem(slot, Some(&done)).await,
            AdminStore::Memory(m) => {
                m.put_idem(slot, Some(&done));
                Ok(())
            }
        }
    }

    /// Frees a claim whose request failed, so a retry can go ahead. Best effort: a claim left
    /// behind expires after `IDEMPOTENCY_PENDING_SECS`.
    async fn release(&self, slot: &str) {
        let _ = match self {
            AdminStore::File(path) => file::put_idem(path, slot, None),
            AdminStore::Redis(r) => r.put_idem(slot, None).await,
            AdminStore::Memory(m) => {
                m.put_idem(slot, None);
                Ok(())
            }
        };
    }
}

impl Cursor {
    fn cmp_key(&self) -> (u64, &str) {
        (self.created_at, self.id.as_str())
    }
}

/// The tenant's active keys among `records`, not counting `except`.
fn active_in(records: &[KeyRecord], tenant: &str, except: Option<&str>, now: u64) -> usize {
    records
        .iter()
        .filter(|r| {
            r.tenant == tenant && Some(r.id.as_str()) != except && state(r, now) == KeyState::Active
        })
        .count()
}

/// Up to `page_size` matching keys from `records` (already in list order), looking at no more
/// than `LIST_SCAN_LIMIT`; the cursor names the last key looked at when more may follow.
fn page_of(
    records: impl Iterator<Item = KeyRecord>,
    filter: ListFilter,
    page_size: usize,
    now: u64,
) -> Page {
    let mut out = Vec::new();
    let mut last = None;
    let mut records = records.peekable();
    let mut looked = 0;
    for r in records.by_ref() {
        looked += 1;
        let cursor = Cursor::of(&r);
        if filter.matches(&r, now) {
            out.push(r);
        }
        last = Some(cursor);
        if out.len() == page_size || looked == LIST_SCAN_LIMIT {
            break;
        }
    }
    let more = records.peek().is_some();
    Page {
        records: out,
        next: last.filter(|_| more),
    }
}

/// Where a request's idempotency record lives: a digest of the tenant, the action and the
/// caller's key, so neither the key nor the tenant appears in a store's names.
fn idem_slot(scope: Scope<'_>, action: &str, idem: &Idempotency) -> String {
    let mut h = Sha256::new();
    for part in [scope.tenant(), action, idem.key.as_str()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, created: u64) -> KeyRecord {
        let mut r = KeyRecord::for_test(id, KeyKind::Secret, "t");
        r.created_at = Some(created);
        r
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor {
            created_at: 17,
            id: "key_a:b".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in [
            "",
            "zz",
            &hex::encode("17"),
            &hex::encode("x:key"),
            &hex::encode("5:"),
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn pages_run_newest_first_and_resume_after_the_cursor() {
        let mut all = vec![rec("a", 1), rec("b", 3), rec("c", 3), rec("d", 2)];
        all.sort_by(|a, b| Cursor::of(b).cmp_key().cmp(&Cursor::of(a).cmp_key()));
        let ids = |p: &Page| p.records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        let p1 = page_of(all.clone().into_iter(), ListFilter::default(), 2, 0);
        assert_eq!(ids(&p1), ["c", "b"]);
        let c = p1.next.unwrap();
        let p2 = page_of(
            all.clone().into_iter().filter(|r| c.before(r)),
            ListFilter::default(),
            2,
            0,
        );
        assert_eq!(ids(&p2), ["d", "a"]);
        assert!(p2.next.is_none(), "the last page has no cursor");
    }

    #[test]
    fn filters_and_states() {
        let mut revoked = rec("r", 1);
        revoked.status = KeyStatus::Revoked;
        let mut expired = rec("e", 1);
        expired.expires_at = Some(10);
        let active = rec("a", 1);
        assert_eq!(state(&revoked, 20), KeyState::Revoked);
        assert_eq!(state(&expired, 20), KeyState::Expired);
        assert_eq!(state(&expired, 9), KeyState::Active);
        assert_eq!(state(&active, 20), KeyState::Active);
        let only_expired = ListFilter {
            kind: Some(KeyKind::Secret),
            state: Some(KeyState::Expired),
        };
        assert!(only_expired.matches(&expired, 20));
        assert!(!only_expired.matches(&active, 20));
        let publishable = ListFilter {
            kind: Some(KeyKind::Publishable),
            state: None,
        };
        assert!(!publishable.matches(&active, 20));
    }

    #[test]
    fn changes_refuse_revoked_keys_and_origins_on_secret_keys() {
        let mut r = rec("a", 1);
        let origins = Changes {
            allowed_origins: Some(vec!["https://a".into()]),
            ..Default::default()
        };
        assert!(origins.apply(&mut r).is_err());
        let rename = Changes {
            name: Some(Some("n".into())),
            rate_limit: Some(Some("5/1s".parse().unwrap())),
            ..Default::default()
        };
        rename.apply(&mut r).unwrap();
        assert_eq!(r.name.as_deref(), Some("n"));
        assert_eq!(r.rate_limit.unwrap().requests, 5);
        r.status = KeyStatus::Revoked;
        assert!(rename.apply(&mut r).is_err());
    }

    #[test]
    fn idempotency_slots_depend_on_tenant_action_and_key() {
        let idem = |k: &str| Idempotency {
            key: k.into(),
            fingerprint: [0; 32],
        };
        let a = idem_slot(Scope::Tenant("t1"), "create", &idem("k"));
        assert_eq!(a, idem_slot(Scope::Tenant("t1"), "create", &idem("k")));
        assert_ne!(a, idem_slot(Scope::Tenant("t2"), "create", &idem("k")));
        assert_ne!(a, idem_slot(Scope::Tenant("t1"), "rotate:x", &idem("k")));
        assert_ne!(a, idem_slot(Scope::Tenant("t1"), "create", &idem("k2")));
        assert!(!a.contains("t1"));
    }
}
