//! `KeyData`: a key as every pod holds it, for every lookup, in 72 bytes. Only what a decision
//! reads, with the values many keys repeat (the tenant and scope list, as one pair) shared through
//! an `Interner`. The id is not in it: the key file's table keeps its ids in one buffer a block
//! (`store::file`), and a key of its own (`Key`, the Redis cache's) keeps it beside its data.
//! What only people read (name, creation time) stays in the key file and Redis, and
//! the publishable-only fields sit behind one optional box. The `x-scopes` value is joined here,
//! once per distinct scope list, so an allow borrows it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::{KeyRecord, KeyStatus};
use crate::authn::apikey::{KeyHash, KeyKind};
use crate::ratelimit::RateLimit;

/// A key's scopes, shared by every key with the same list.
#[derive(Debug, PartialEq, Eq)]
pub struct Scopes {
    pub names: Box<[String]>,
    /// The `x-scopes` header value: the names joined by spaces.
    pub joined: Box<str>,
}

impl Scopes {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn contains(&self, scope: &str) -> bool {
        self.names.iter().any(|s| s == scope)
    }
}

/// What only a publishable key has; secret keys carry no box at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publishable {
    /// Browser origins allowed to use the key (empty: any).
    pub allowed_origins: Box<[String]>,
    /// The JWT provider that signs its users' tokens (the default provider if unset).
    pub jwt_provider: Option<Box<str>>,
    /// The Identity Platform tenant (`firebase.tenant`) its users must belong to.
    pub identity_platform_tenant: Option<Box<str>>,
}

/// The rate limit in 8 bytes rather than `Option<RateLimit>`'s 24: windows are whole seconds (at
/// most 30 days) and a limit is never 0 requests, so 0 means "the configured default".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PackedLimit {
    requests: u32,
    window_secs: u32,
}

/// Unix seconds of "never expires": `expires_at` as a plain `u32` is 4 bytes, an `Option<u64>`
/// 16. 32 bits of Unix seconds reach February 2106; a later expiry is held as that second.
const NEVER: u32 = u32::MAX;

/// The tenant and scope list of a key: one pointer in each key, shared by every key with both.
#[derive(Debug, PartialEq, Eq)]
struct Shared {
    tenant: Arc<str>,
    scopes: Arc<Scopes>,
}

/// What a decision reads of a key, but its id. Built from a `KeyRecord` by an `Interner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyData {
    hash: KeyHash,
    shared: Arc<Shared>,
    limit: PackedLimit,
    publishable: Option<Box<Publishable>>,
    expires_at: u32,
    /// Where the key file's table holds the id: bytes `id_at..id_at + id_len` of the buffer of
    /// the key's block. Unused (0) in a `Key`, which holds its id itself.
    pub(super) id_at: u32,
    pub(super) id_len: u32,
    kind: KeyKind,
    status: KeyStatus,
}

/// A key of its own, with its id: what a remote store's cache holds and hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    data: KeyData,
    id: Arc<str>,
}

impl Key {
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    pub(super) fn from_parts(data: KeyData, id: Arc<str>) -> Self {
        Self { data, id }
    }
}

impl std::ops::Deref for Key {
    type Target = KeyData;

    fn deref(&self) -> &KeyData {
        &self.data
    }
}

impl KeyData {
    pub fn hash(&self) -> &KeyHash {
        &self.hash
    }

    pub fn tenant(&self) -> &Arc<str> {
        &self.shared.tenant
    }

    pub fn scopes(&self) -> &Arc<Scopes> {
        &self.shared.scopes
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    pub fn status(&self) -> KeyStatus {
        self.status
    }

    /// `None`: the configured default applies.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        (self.limit.requests > 0).then(|| RateLimit {
            requests: self.limit.requests,
            window: Duration::from_secs(self.limit.window_secs.into()),
        })
    }

    /// Unix seconds after which the key is refused.
    pub fn expires_at(&self) -> Option<u64> {
        (self.expires_at != NEVER).then_some(self.expires_at.into())
    }

    /// Set for publishable keys that name origins, a provider or an Identity Platform tenant.
    pub fn publishable(&self) -> Option<&Publishable> {
        self.publishable.as_deref()
    }

    /// Usable at `now` (Unix seconds): active and not expired.
    pub fn is_usable(&self, now: u64) -> bool {
        let expires = if self.expires_at == NEVER {
            u64::MAX
        } else {
            u64::from(self.expires_at)
        };
        self.status == KeyStatus::Active && now < expires
    }
}

/// Shares equal tenants and scope lists between keys. A fleet's keys repeat a few tenants and a
/// handful of scope lists, so each distinct value is held once however many keys name it.
///
/// A long-lived interner (the Redis store's, whose keys come and go with the cache) forgets values
/// no key holds any more whenever it has doubled since it last looked, so it stays proportional
/// to what is cached.
#[derive(Debug)]
pub struct Interner {
    tenants: HashSet<Arc<str>>,
    scopes: HashMap<Box<[String]>, Arc<Scopes>>,
    /// The pairs, by the addresses of their (interned) tenant and scope list.
    pairs: HashMap<(usize, usize), Arc<Shared>>,
    sweep_at: usize,
}

/// Distinct values held before the first sweep for unused ones.
const FIRST_SWEEP: usize = 1024;

impl Default for Interner {
    fn default() -> Self {
        Self {
            tenants: HashSet::new(),
            scopes: HashMap::new(),
            pairs: HashMap::new(),
            sweep_at: FIRST_SWEEP,
        }
    }
}

impl Interner {
    pub fn tenant(&mut self, tenant: &str) -> Arc<str> {
        if let Some(t) = self.tenants.get(tenant) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(tenant);
        self.tenants.insert(t.clone());
        self.maybe_sweep();
        t
    }

    pub fn scopes(&mut self, names: &[String]) -> Arc<Scopes> {
        if let Some(s) = self.scopes.get(names) {
            return s.clone();
        }
        let s = Arc::new(Scopes {
            names: names.into(),
            joined: names.join(" ").into(),
        });
        self.scopes.insert(names.into(), s.clone());
        self.maybe_sweep();
        s
    }

    /// The shared pair of a tenant and a scope list, both interned.
    fn shared(&mut self, tenant: &str, scopes: &[String]) -> Arc<Shared> {
        let (tenant, scopes) = (self.tenant(tenant), self.scopes(scopes));
        let at = (
            Arc::as_ptr(&tenant).cast::<u8>() as usize,
            Arc::as_ptr(&scopes) as usize,
        );
        let pair = self
            .pairs
            .entry(at)
            .or_insert_with(|| Arc::new(Shared { tenant, scopes }))
            .clone();
        self.maybe_sweep();
        pair
    }

    /// Distinct tenants, scope lists and pairs of them held.
    pub fn len(&self) -> usize {
        self.tenants.len() + self.scopes.len() + self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn maybe_sweep(&mut self) {
        if self.len() < self.sweep_at {
            return;
        }
        // Held only here: no key uses the value any more. Pairs first: they hold the others.
        self.pairs.retain(|_, p| Arc::strong_count(p) > 1);
        self.tenants.retain(|t| Arc::strong_count(t) > 1);
        self.scopes.retain(|_, s| Arc::strong_count(s) > 1);
        self.sweep_at = (self.len() * 2).max(FIRST_SWEEP);
    }

    /// The compact form of `record`, sharing its tenant and scopes with earlier keys. Name and
    /// creation time are dropped: nothing on the request path reads them.
    pub fn key(&mut self, record: &KeyRecord) -> Key {
        Key {
            data: self.data(record),
            id: Arc::from(record.id.as_str()),
        }
    }

    /// `key` without its id, for a table that holds the id itself.
    pub fn data(&mut self, record: &KeyRecord) -> KeyData {
        let publishable = (!record.allowed_origins.is_empty()
            || record.jwt_provider.is_some()
            || record.identity_platform_tenant.is_some())
        .then(|| {
            Box::new(Publishable {
                allowed_origins: record.allowed_origins.as_slice().into(),
                jwt_provider: record.jwt_provider.as_deref().map(Box::from),
                identity_platform_tenant: record.identity_platform_tenant.as_deref().map(Box::from),
            })
        });
        KeyData {
            hash: record.hash,
            id_at: 0,
            id_len: 0,
            shared: self.shared(&record.tenant, &record.scopes),
            limit: record.rate_limit.map_or(
                PackedLimit {
                    requests: 0,
                    window_secs: 0,
                },
                |l| PackedLimit {
                    requests: l.requests,
                    // Parsed limits are whole seconds of at most 30 days; Redis stores a u32.
                    window_secs: u32::try_from(l.window.as_secs()).unwrap_or(u32::MAX),
                },
            ),
            expires_at: record
                .expires_at
                .map_or(NEVER, |t| u32::try_from(t).unwrap_or(NEVER - 1)),
            publishable,
            kind: record.kind,
            status: record.status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tenant: &str, scopes: &[&str]) -> KeyRecord {
        let mut r = KeyRecord::for_test(id, KeyKind::Secret, tenant);
        r.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        r
    }

    #[test]
    fn a_key_reads_as_its_record() {
        let mut i = Interner::default();
        let mut r = record("k1", "t1", &["a", "users:impersonate"]);
        r.rate_limit = Some("5/60s".parse().unwrap());
        r.expires_at = Some(2_000_000_000);
        r.status = KeyStatus::Revoked;
        let k = i.key(&r);
        assert_eq!(&**k.id(), "k1");
        assert_eq!(k.hash(), &r.hash);
        assert_eq!(&**k.tenant(), "t1");
        assert!(k.scopes().contains("users:impersonate"));
        assert_eq!(&*k.scopes().joined, "a users:impersonate");
        assert_eq!(k.rate_limit(), r.rate_limit);
        assert_eq!(k.expires_at(), Some(2_000_000_000));
        assert_eq!(k.status(), KeyStatus::Revoked);
        assert_eq!(k.kind(), KeyKind::Secret);
        assert!(k.publishable().is_none(), "a secret key carries no box");

        let plain = i.key(&record("k2", "t1", &[]));
        assert_eq!(plain.rate_limit(), None);
        assert_eq!(plain.expires_at(), None);
        assert!(plain.scopes().is_empty());
        assert_eq!(&*plain.scopes().joined, "");
    }

    #[test]
    fn expiry_and_status_decide_usability() {
        let mut i = Interner::default();
        let mut r = record("k", "t", &[]);
        assert!(i.key(&r).is_usable(u64::MAX - 1));
        r.expires_at = Some(100);
        assert!(i.key(&r).is_usable(99));
        assert!(!i.key(&r).is_usable(100));
        // Expiry at the epoch is an expired key, not a key that never expires.
        r.expires_at = Some(0);
        assert!(!i.key(&r).is_usable(0));
        // Past 2106 (32 bits of seconds): held as its last second, still an expiry.
        r.expires_at = Some(u64::from(u32::MAX) + 10);
        assert!(i.key(&r).is_usable(u64::from(u32::MAX) - 2));
        assert!(!i.key(&r).is_usable(u64::from(u32::MAX) - 1));
        r.expires_at = None;
        r.status = KeyStatus::Revoked;
        assert!(!i.key(&r).is_usable(0));
    }

    #[test]
    fn publishable_fields_ride_in_one_box() {
        let mut i = Interner::default();
        let mut r = KeyRecord::for_test("p", KeyKind::Publishable, "t");
        assert!(i.key(&r).publishable().is_none());
        r.allowed_origins = vec!["https://a".into()];
        r.identity_platform_tenant = Some("ip".into());
        let k = i.key(&r);
        let p = k.publishable().unwrap();
        assert_eq!(&*p.allowed_origins, ["https://a".to_owned()]);
        assert_eq!(p.jwt_provider, None);
        assert_eq!(p.identity_platform_tenant.as_deref(), Some("ip"));
    }

    #[test]
    fn equal_tenants_and_scope_lists_are_held_once() {
        let mut i = Interner::default();
        let a = i.key(&record("a", "tenant-1", &["x", "y"]));
        let b = i.key(&record("b", "tenant-1", &["x", "y"]));
        let c = i.key(&record("c", "tenant-2", &["x"]));
        assert!(Arc::ptr_eq(a.tenant(), b.tenant()));
        assert!(Arc::ptr_eq(a.scopes(), b.scopes()));
        assert!(!Arc::ptr_eq(a.scopes(), c.scopes()));
        assert!(
            Arc::ptr_eq(&a.data.shared, &b.data.shared),
            "one pair for both"
        );
        // Two tenants, two scope lists, two pairs.
        assert_eq!(i.len(), 6);
        // The hot record stays small: no name, no creation time, no publishable fields inline,
        // tenant and scopes behind one pointer, the id apart.
        assert_eq!(std::mem::size_of::<KeyData>(), 72);
    }

    #[test]
    fn values_no_key_holds_are_forgotten() {
        let mut i = Interner::default();
        let kept = i.key(&record("kept", "kept-tenant", &[]));
        for n in 0..10 * FIRST_SWEEP {
            drop(i.key(&record("k", &format!("tenant-{n}"), &[])));
        }
        assert!(i.len() <= 2 * FIRST_SWEEP, "{} values held", i.len());
        let again = i.key(&record("again", "kept-tenant", &[]));
        assert!(Arc::ptr_eq(kept.tenant(), again.tenant()));
    }
}
