//! `CachedStore`: the in-process cache in front of a remote key store (Redis). Found keys are
//! fresh for a short TTL and then served stale while one background refresh runs (up to a hard
//! maximum age); unknown keys are remembered briefly; concurrent misses for one hash make one
//! lookup. When key events may have been missed, every entry is marked stale at once (re-read on
//! its next use, served meanwhile), so a key cached before a Redis failover keeps working through
//! it. In-memory stores are not cached: they are their own index.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use super::{Key, KeyStore, StoreError};
use crate::authn::apikey::KeyHash;
use crate::config::KeyCacheConfig;
use crate::event::CacheOutcome;
use crate::observe::Observer;

#[derive(Clone)]
struct Entry {
    record: Option<Arc<Key>>,
    fetched: Instant,
    /// The store's generation when the lookup started: an older one is stale.
    generation: u64,
}

struct EntryExpiry {
    positive: Duration,
    negative: Duration,
}

impl Expiry<KeyHash, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &KeyHash, e: &Entry, _: Instant) -> Option<Duration> {
        Some(if e.record.is_some() {
            self.positive
        } else {
            self.negative
        })
    }

    fn expire_after_update(
        &self,
        k: &KeyHash,
        e: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(k, e, now)
    }
}

pub struct CachedStore {
    inner: Arc<dyn KeyStore>,
    cache: Cache<KeyHash, Entry>,
    ttl: Duration,
    refreshing: Arc<Mutex<HashSet<KeyHash>>>,
    observer: Arc<Observer>,
    /// Bumped by [`CachedStore::revalidate_all`]: entries read before are stale.
    generation: Arc<AtomicU64>,
}

impl CachedStore {
    pub fn new(inner: Arc<dyn KeyStore>, cfg: &KeyCacheConfig) -> Self {
        Self {
            inner,
            cache: Cache::builder()
                .max_capacity(cfg.max_entries)
                .expire_after(EntryExpiry {
                    positive: Duration::from_secs(cfg.max_stale_secs),
                    negative: Duration::from_secs(cfg.negative_ttl_secs),
                })
                .build(),
            ttl: Duration::from_secs(cfg.ttl_secs),
            refreshing: Arc::default(),
            observer: Arc::default(),
            generation: Arc::default(),
        }
    }

    /// Reports failed background refreshes to `observer`.
    pub fn with_observer(mut self, observer: Arc<Observer>) -> Self {
        self.observer = observer;
        self
    }

    pub async fn lookup(&self, hash: &KeyHash) -> Result<Option<Arc<Key>>, StoreError> {
        self.lookup_traced(hash).await.map(|(r, _)| r)
    }

    pub async fn lookup_traced(
        &self,
        hash: &KeyHash,
    ) -> Result<(Option<Arc<Key>>, CacheOutcome), StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(e) = self.cache.get(hash).await {
            let outdated = e.generation != generation;
            if e.record.is_some() && (outdated || e.fetched.elapsed() >= self.ttl) {
                self.spawn_refresh(*hash);
                return Ok((e.record, CacheOutcome::Stale));
            }
            if !outdated {
                return Ok((e.record, CacheOutcome::Hit));
            }
            // "Unknown" from before: the key may have been created since; ask again.
            self.cache.invalidate(hash).await;
        }
        let inner = self.inner.clone();
        let h = *hash;
        let entry = self
            .cache
            .try_get_with(h, async move {
                let record = inner.lookup(&h).await?;
                Ok::<_, StoreError>(Entry {
                    record,
                    fetched: Instant::now(),
                    generation,
                })
            })
            .await
            .map_err(|e: Arc<StoreError>| (*e).clone())?;
        Ok((entry.record, CacheOutcome::Miss))
    }

    /// One background refresh per hash at a time; a failed refresh leaves the stale entry serving
    /// until its maximum age.
    fn spawn_refresh(&self, hash: KeyHash) {
        if !self.refreshing.lock().expect("refresh set").insert(hash) {
            return;
        }
        let (inner, cache, refreshing, observer) = (
            self.inner.clone(),
            self.cache.clone(),
            self.refreshing.clone(),
            self.observer.clone(),
        );
        // Read before the lookup: a revalidation while it runs leaves its answer stale too.
        let generation = self.generation.load(Ordering::Acquire);
        tokio::spawn(async move {
            match inner.lookup(&hash).await {
                Ok(record) => {
                    cache
                        .insert(
                            hash,
                            Entry {
                                record,
                                fetched: Instant::now(),
                                generation,
                            },
                        )
                        .await
                }
                Err(e) => observer.key_store_error("refresh", &e),
            }
            refreshing.lock().expect("refresh set").remove(&hash);
        });
    }

    /// Drops one key (a revocation).
    pub async fn invalidate(&self, hash: &KeyHash) {
        self.cache.invalidate(hash).await;
    }

    /// Events may have been missed (the subscription was lost): every key is re-read on its next
    /// use, as once `ttl_secs` has passed. A found key keeps serving while it is re-read (and
    /// while the store cannot answer, up to `max_stale_secs`), so a Redis failover does not turn
    /// cached keys into 503s; an unknown one is asked again at once.
    pub fn revalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::apikey::KeyKind;
    use crate::store::{Interner, KeyRecord, KeyStatus};
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A store that counts lookups, can be slowed down and can fail.
    #[derive(Default)]
    struct Counting {
        calls: AtomicUsize,
        down: AtomicBool,
        record: Mutex<Option<Arc<Key>>>,
        delay_ms: u64,
    }

    impl KeyStore for Counting {
        fn lookup<'a>(
            &'a self,
            _: &'a KeyHash,
        ) -> BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
                if self.down.load(Ordering::SeqCst) {
                    return Err(StoreError::Unavailable("down".into()));
                }
                Ok(self.record.lock().unwrap().clone())
            })
        }
    }

    fn cfg(ttl: u64, neg: u64, stale: u64) -> KeyCacheConfig {
        KeyCacheConfig {
            max_entries: 100,
            ttl_secs: ttl,
            negative_ttl_secs: neg,
            max_stale_secs: stale,
        }
    }

    fn rec_with(status: KeyStatus) -> Arc<Key> {
        let mut r = KeyRecord::for_test("k", KeyKind::Secret, "t");
        r.status = status;
        Arc::new(Interner::default().key(&r))
    }

    fn rec() -> Arc<Key> {
        rec_with(KeyStatus::Active)
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_lookup() {
        let store = Arc::new(Counting {
            delay_ms: 50,
            record: Mutex::new(Some(rec())),
            ..Default::default()
        });
        let cached = Arc::new(CachedStore::new(store.clone(), &cfg(10, 5, 60)));
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (c, b) = (cached.clone(), barrier.clone());
                tokio::spawn(async move {
                    b.wait().await;
                    c.lookup(&KeyHash::of("k"))
                        .await
                        .unwrap()
                        .unwrap()
                        .id()
                        .to_string()
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "k");
        }
        assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn negative_results_are_cached_briefly() {
        let store = Arc::new(Counting::default());
        let cached = CachedStore::new(store.clone(), &cfg(10, 1, 60));
        for _ in 0..5 {
            assert!(cached.lookup(&KeyHash::of("x")).await.unwrap().is_none());
        }
        assert_eq!(store.calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        *store.record.lock().unwrap() = Some(rec());
        assert!(
            cached.lookup(&KeyHash::of("x")).await.unwrap().is_some(),
            "negative entry expired"
        );
        assert_eq!(store.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn stale_entries_serve_while_refreshing_and_survive_an_outage() {
        let store = Arc::new(Counting {
            record: Mutex::new(Some(rec())),
            ..Default::default()
        });
        let cached = CachedStore::new(store.clone(), &cfg(1, 1, 60));
        let (_, o) = cached.lookup_traced(&KeyHash::of("k")).await.unwrap();
        assert_eq!(o, CacheOutcome::Miss);
        let (_, o) = cached.lookup_traced(&KeyHash::of("k")).await.unwrap();
        assert_eq!(o, CacheOutcome::Hit);

        tokio::time::sleep(Duration::from_millis(1_100)).await;
        store.down.store(true, Ordering::SeqCst);
        let (r, o) = cached.lookup_traced(&KeyHash::of("k")).await.unwrap();
        assert_eq!(o, CacheOutcome::Stale);
        assert!(r.is_some(), "a stale record serves while the store is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cached.lookup(&KeyHash::of("k")).await.unwrap().is_some());

        // Unknown keys are not guessed at while the store is down.
        assert!(cached.lookup(&KeyHash::of("other")).await.is_err());
    }

    #[tokio::test]
    async fn a_refresh_picks_up_changes() {
        let store = Arc::new(Counting {
            record: Mutex::new(Some(rec())),
            ..Default::default()
        });
        let cached = CachedStore::new(store.clone(), &cfg(1, 1, 60));
        cached.lookup(&KeyHash::of("k")).await.unwrap();
        *store.record.lock().unwrap() = Some(rec_with(KeyStatus::Revoked));
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        cached.lookup(&KeyHash::of("k")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = cached.lookup(&KeyHash::of("k")).await.unwrap().unwrap();
        assert_eq!(r.status(), KeyStatus::Revoked);
    }

    #[tokio::test]
    async fn after_missed_events_every_key_is_read_again_and_a_found_one_keeps_serving() {
        let store = Arc::new(Counting {
            record: Mutex::new(Some(rec())),
            ..Default::default()
        });
        // Fresh for a minute: only the revalidation makes them stale.
        let cached = CachedStore::new(store.clone(), &cfg(60, 60, 600));
        cached.lookup(&KeyHash::of("k")).await.unwrap();
        *store.record.lock().unwrap() = None;
        assert!(cached.lookup(&KeyHash::of("x")).await.unwrap().is_none());
        assert_eq!(store.calls.load(Ordering::SeqCst), 2);

        // The key was revoked (deleted) and a new one created while events were lost; the store
        // is down when the subscription comes back.
        *store.record.lock().unwrap() = Some(rec_with(KeyStatus::Revoked));
        store.down.store(true, Ordering::SeqCst);
        cached.revalidate_all();
        let (r, o) = cached.lookup_traced(&KeyHash::of("k")).await.unwrap();
        assert_eq!(o, CacheOutcome::Stale, "re-read, and served meanwhile");
        assert_eq!(r.unwrap().status(), KeyStatus::Active);
        assert!(
            cached.lookup(&KeyHash::of("x")).await.is_err(),
            "an unknown key is asked again, not answered from before"
        );

        // Once the store answers, the next use reads what is there now.
        store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        cached.lookup(&KeyHash::of("k")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = cached.lookup(&KeyHash::of("k")).await.unwrap().unwrap();
        assert_eq!(r.status(), KeyStatus::Revoked);
        assert!(cached.lookup(&KeyHash::of("x")).await.unwrap().is_some());
    }
}
