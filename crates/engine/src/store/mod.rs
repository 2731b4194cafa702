//! API key records and where they come from: the `KeyStore` trait (an I/O seam), the file store,
//! and the cache that sits in front of any store.

pub mod admin;
mod cached;
mod file;
pub mod redis;

use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use cached::{CacheOutcome, CachedStore};
pub use file::{FileStore, KeyFile, KeyFileEntry, KeyFileError, parse_entries};
pub use redis::RedisStore;

use crate::authn::apikey::{KeyHash, KeyKind};
use crate::ratelimit::RateLimit;

/// Everything known about one API key. Never holds the key itself, only its hash.
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

impl KeyRecord {
    /// Usable at `now` (Unix seconds): active and not expired.
    pub fn is_usable(&self, now: u64) -> bool {
        self.status == KeyStatus::Active && self.expires_at.is_none_or(|exp| now < exp)
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Why a store could not answer. "Not found" is not an error: it is `Ok(None)`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(String),
}

/// A source of key records, looked up by key hash.
pub trait KeyStore: Send + Sync {
    fn lookup<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> BoxFuture<'a, Result<Option<Arc<KeyRecord>>, StoreError>>;
}

/// No store configured: every key is unknown.
pub struct NoStore;

impl KeyStore for NoStore {
    fn lookup<'a>(
        &'a self,
        _: &'a KeyHash,
    ) -> BoxFuture<'a, Result<Option<Arc<KeyRecord>>, StoreError>> {
        Box::pin(async { Ok(None) })
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
