//! `key_cache`: the in-process cache in front of the Redis key store.

use serde::Deserialize;

/// Key cache bounds and lifetimes.
pub const DEFAULT_KEY_CACHE_ENTRIES: u64 = 100_000;
pub const DEFAULT_KEY_CACHE_TTL_SECS: u64 = 10;
pub const DEFAULT_KEY_CACHE_NEGATIVE_TTL_SECS: u64 = 5;
pub const DEFAULT_KEY_CACHE_MAX_STALE_SECS: u64 = 300;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyCacheConfig {
    /// Most key lookups (positive and negative) held. Default 100000.
    pub max_entries: u64,
    /// A found key is fresh this long; after it, it is served while a refresh runs. Default 10.
    pub ttl_secs: u64,
    /// An unknown key is remembered this long. Default 5.
    pub negative_ttl_secs: u64,
    /// A found key is never served older than this, even when the store is down. Default 300.
    pub max_stale_secs: u64,
}

impl Default for KeyCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_KEY_CACHE_ENTRIES,
            ttl_secs: DEFAULT_KEY_CACHE_TTL_SECS,
            negative_ttl_secs: DEFAULT_KEY_CACHE_NEGATIVE_TTL_SECS,
            max_stale_secs: DEFAULT_KEY_CACHE_MAX_STALE_SECS,
        }
    }
}

impl KeyCacheConfig {
    /// Every problem of the section, each against its field under `key_cache.`.
    pub(super) fn validate(&self, err: &mut dyn FnMut(String, String)) {
        let c = self;
        if c.max_entries == 0 {
            err("key_cache.max_entries".into(), "must be at least 1".into());
        }
        if c.ttl_secs == 0 {
            err("key_cache.ttl_secs".into(), "must be at least 1".into());
        }
        if c.negative_ttl_secs == 0 {
            err(
                "key_cache.negative_ttl_secs".into(),
                "must be at least 1".into(),
            );
        }
        if c.max_stale_secs < c.ttl_secs {
            err(
                "key_cache.max_stale_secs".into(),
                "must be at least key_cache.ttl_secs".into(),
            );
        }
    }
}
