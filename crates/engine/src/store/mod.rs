//! API key records and where they come from: the full `KeyRecord` (what the key file and Redis
//! hold, what people read), the compact `Key` the engine looks up, the `KeyStore` trait (the I/O
//! seam of a remote store), the file store (an in-memory table), and `Keys`, the one way the
//! engine looks a key up: straight from memory, or through the cache in front of Redis.

pub mod admin;
mod cached;
mod file;
mod key;
pub mod redis;

use std::ops::Deref;
use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use crate::event::{CacheOutcome, StoreError, StoreKind};
pub use cached::CachedStore;
pub use file::{FileStore, KeyFile, KeyFileEntry, KeyFileError, Table, parse_entries, parse_file};
pub use key::{Interner, Key, KeyData, Publishable, Scopes};
pub use redis::RedisStore;

use crate::authn::apikey::{KeyHash, KeyKind};
use crate::ratelimit::RateLimit;

/// Everything known about one API key, as the key file and Redis hold it and as the key commands
/// show it. Never holds the key itself, only its hash. Decisions read the compact `Key` instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub hash: KeyHash,
    pub kind: KeyKind,
    pub tenant: String,
    pub scopes: Vec<String>,
    /// `None`: the configured default applies.
    pub rate_limit: Option<RateLimit>,
    pub status: KeyStatus,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<u64>,
    pub name: Option<String>,
    /// Unix seconds.
    pub created_at: Option<u64>,
    /// Publishable keys: browser origins allowed to use it (empty: any).
    pub allowed_origins: Vec<String>,
    /// Publishable keys: the JWT provider that signs its users' tokens (default provider if unset).
    pub jwt_provider: Option<String>,
    /// Publishable keys: the Identity Platform tenant (`firebase.tenant`) its users must belong to.
    pub identity_platform_tenant: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    #[default]
    Active,
    Revoked,
}

/// A remote source of keys, looked up by key hash: the seam the cache wraps (Redis; tests' failing
/// and counting stores).
pub trait KeyStore: Send + Sync {
    fn lookup<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>>;
}

/// A key a lookup found: in the key file's table, shared with it (the table holds its keys and
/// their ids in a few large blocks, so no key has a pointer of its own to hand out), or a record
/// of its own (the Redis cache's). Reads as the `KeyData` either way; `id` reads the id.
#[derive(Clone)]
pub enum Found {
    InTable(Arc<Table>, u32),
    Own(Arc<Key>),
}

impl Found {
    /// The key as a record of its own: a copy, for a caller that keeps it (tests' stores).
    pub fn into_arc(self) -> Arc<Key> {
        match self {
            Found::InTable(t, at) => Arc::new(Key::from_parts(t.key(at).clone(), t.id(at).into())),
            Found::Own(k) => k,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Found::InTable(t, at) => t.id(*at),
            Found::Own(k) => k.id(),
        }
    }

    /// The id to keep past the lookup (a decision's), without a copy: the table's ids are not
    /// allocations of their own, so one from the table is held as the table and its position.
    pub fn key_id(&self) -> KeyId {
        match self {
            Found::InTable(t, at) => KeyId(IdRepr::InTable(t.clone(), *at)),
            Found::Own(k) => KeyId(IdRepr::Shared(k.id().clone())),
        }
    }
}

/// A key's id as a decision holds it: shared with where the key lives (the key file's table, or
/// a record of its own), never copied per request. Reads as a `str`.
#[derive(Clone)]
pub struct KeyId(IdRepr);

#[derive(Clone)]
enum IdRepr {
    Shared(Arc<str>),
    InTable(Arc<Table>, u32),
}

impl KeyId {
    /// The id in an allocation of its own (a copy only of one from the table).
    pub fn to_arc(&self) -> Arc<str> {
        match &self.0 {
            IdRepr::Shared(s) => s.clone(),
            IdRepr::InTable(t, at) => t.id(*at).into(),
        }
    }
}

impl Deref for KeyId {
    type Target = str;

    fn deref(&self) -> &str {
        match &self.0 {
            IdRepr::Shared(s) => s,
            IdRepr::InTable(t, at) => t.id(*at),
        }
    }
}

impl From<Arc<str>> for KeyId {
    fn from(id: Arc<str>) -> Self {
        KeyId(IdRepr::Shared(id))
    }
}

impl From<&str> for KeyId {
    fn from(id: &str) -> Self {
        KeyId(IdRepr::Shared(id.into()))
    }
}

impl PartialEq for KeyId {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for KeyId {}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        str::fmt(self, f)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        str::fmt(self, f)
    }
}

impl Deref for Found {
    type Target = KeyData;

    fn deref(&self) -> &KeyData {
        match self {
            Found::InTable(t, at) => t.key(*at),
            Found::Own(k) => k,
        }
    }
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("id", &self.id())
            .field("key", &**self)
            .finish()
    }
}

/// How the engine looks keys up. An in-memory store is its own index and is asked directly: a
/// cache in front of it would hold a second copy of what it already holds, and answer slower. Only
/// a remote store has the cache in front.
#[derive(Clone)]
pub enum Keys {
    None,
    Memory(Arc<FileStore>),
    Cached(Arc<CachedStore>),
}

impl Keys {
    pub fn kind(&self) -> StoreKind {
        match self {
            Keys::None => StoreKind::None,
            Keys::Memory(s) => s.kind(),
            Keys::Cached(_) => StoreKind::Redis,
        }
    }

    /// The key with this hash, and how the cache answered when there is one.
    pub async fn lookup_traced(
        &self,
        hash: &KeyHash,
    ) -> Result<(Option<Found>, Option<CacheOutcome>), StoreError> {
        match self {
            Keys::None => Ok((None, None)),
            Keys::Memory(s) => Ok((s.get(hash), None)),
            Keys::Cached(c) => c
                .lookup_traced(hash)
                .await
                .map(|(k, o)| (k.map(Found::Own), Some(o))),
        }
    }

    pub async fn lookup(&self, hash: &KeyHash) -> Result<Option<Found>, StoreError> {
        self.lookup_traced(hash).await.map(|(k, _)| k)
    }

    /// Entries the key cache holds; `None` where there is no cache.
    pub fn cached_entries(&self) -> Option<u64> {
        match self {
            Keys::Cached(c) => Some(c.entry_count()),
            Keys::None | Keys::Memory(_) => None,
        }
    }
}

#[cfg(test)]
impl KeyRecord {
    pub fn for_test(id: &str, kind: KeyKind, tenant: &str) -> Self {
        KeyRecord {
            id: id.into(),
            hash: KeyHash::of(id),
            kind,
            tenant: tenant.into(),
            scopes: vec![],
            rate_limit: None,
            status: KeyStatus::Active,
            expires_at: None,
            name: None,
            created_at: None,
            allowed_origins: vec![],
            jwt_provider: None,
            identity_platform_tenant: None,
        }
    }
}
