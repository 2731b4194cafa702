//! `CachedStore`: the in-process cache in front of a remote key store (Redis). Found keys are
//! fresh for a short TTL and then served stale while one background refresh runs (up to a hard
//! maximum age); unknown keys are remembered briefly; concurrent misses for one hash make one
//! lookup. When key events may have been missed, every entry is marked stale at once (re-read on
//! its next use, served meanwhile), so a key cached before a Redis failover keeps working through
//! it. In-memory stores are not cached: they are their own table.
//!
//! Every replica holds up to `key_cache.max_entries` of these, so an entry is kept small: a found
//! key is its shared record, a fetch time and the generation it was read in (24 bytes in a hash
//! table, beside the record itself), an unknown one its hash, a fetch time and a generation (48). A general-purpose cache (moka, which this
//! replaced) spends about 400 bytes of bookkeeping per entry. Bounded per shard: expired entries
//! go first, then unknown keys, then found keys not looked up since the last sweep, so a flood of
//! unknown keys only ever displaces other unknown keys, never a key in use.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use foldhash::fast::RandomState;
use hashbrown::HashTable;

use super::{Key, KeyStore, StoreError};
use crate::authn::apikey::KeyHash;
use crate::config::KeyCacheConfig;
use crate::event::CacheOutcome;
use crate::observe::Observer;

/// Shards of the cache, so concurrent lookups of different keys rarely wait on one lock.
const SHARDS: usize = 16;
/// The top bit of an entry's stamp: looked up since the last sweep.
const USED: u64 = 1 << 63;

/// A fetch time (milliseconds since the cache started) with the `USED` bit.
#[derive(Clone, Copy)]
struct Stamp(u64);

impl Stamp {
    fn fetched(&self) -> u64 {
        self.0 & !USED
    }

    fn used(&self) -> bool {
        self.0 & USED != 0
    }
}

struct FoundEntry {
    key: Arc<Key>,
    stamp: Stamp,
    /// [`State::generation`] when its lookup started: an older one is stale.
    generation: u32,
}

struct UnknownEntry {
    hash: KeyHash,
    stamp: Stamp,
    generation: u32,
}

#[derive(Default)]
struct Shard {
    found: HashTable<FoundEntry>,
    unknown: HashTable<UnknownEntry>,
    /// Unknown keys remembered since expired ones were last swept out.
    unknown_since_sweep: usize,
}

/// Unknown keys remembered in a shard between two sweeps of the expired ones: a flood leaves
/// behind what it sent in the last few seconds and this many, not a full cache of expired
/// entries.
const UNKNOWN_SWEEP_EVERY: usize = 1024;

impl Shard {
    fn len(&self) -> usize {
        self.found.len() + self.unknown.len()
    }
}

/// The result of one lookup in the store, shared by every request that waited for it.
type Fetched = Result<Option<Arc<Key>>, StoreError>;

/// One lookup in flight: whoever comes first runs it, the others wait for its result (and one of
/// them runs it instead if the first is dropped before it finishes).
#[derive(Default)]
struct Flight(tokio::sync::OnceCell<Fetched>);

pub struct CachedStore {
    inner: Arc<dyn KeyStore>,
    state: Arc<State>,
    refreshing: Arc<Mutex<HashSet<KeyHash>>>,
    flights: Mutex<HashMap<KeyHash, Arc<Flight>>>,
    observer: Arc<Observer>,
}

/// The entries and their lifetimes, shared with background refreshes.
struct State {
    shards: Box<[Mutex<Shard>]>,
    pick: RandomState,
    per_shard: usize,
    epoch: Instant,
    ttl_ms: u64,
    max_stale_ms: u64,
    negative_ms: u64,
    /// Bumped by [`CachedStore::revalidate_all`]: entries read before are stale.
    generation: AtomicU32,
}

/// What a lookup found in the cache.
enum Cached {
    Found(Arc<Key>, CacheOutcome),
    Unknown,
    Missing,
}

impl State {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn shard(&self, hash: &KeyHash) -> (u64, &Mutex<Shard>) {
        let h = self.pick.hash_one(hash);
        // The top bits pick the shard; the table indexes by the low bits, which stay spread.
        (h, &self.shards[(h >> 58) as usize % self.shards.len()])
    }

    /// The generation a lookup starting now belongs to.
    fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    fn get(&self, hash: &KeyHash) -> Cached {
        let (h, shard) = self.shard(hash);
        let now = self.now_ms();
        let generation = self.generation();
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Ok(e) = shard.found.find_entry(h, |e| e.key.hash() == hash) {
            let age = now.saturating_sub(e.get().stamp.fetched());
            if age >= self.max_stale_ms {
                e.remove();
                return Cached::Missing;
            }
            let entry = e.into_mut();
            entry.stamp.0 |= USED;
            let outcome = if age >= self.ttl_ms || entry.generation != generation {
                CacheOutcome::Stale
            } else {
                CacheOutcome::Hit
            };
            return Cached::Found(entry.key.clone(), outcome);
        }
        if let Ok(e) = shard.unknown.find_entry(h, |e| e.hash == *hash) {
            // "Unknown" from before a revalidation: the key may have been created since.
            if now.saturating_sub(e.get().stamp.fetched()) >= self.negative_ms
                || e.get().generation != generation
            {
                e.remove();
                return Cached::Missing;
            }
            return Cached::Unknown;
        }
        Cached::Missing
    }

    /// Remembers what the store answered for `hash` to a lookup started in `generation`, making
    /// room first when the shard is full.
    fn put(&self, hash: KeyHash, record: Option<Arc<Key>>, generation: u32) {
        let (h, shard) = self.shard(&hash);
        let now = self.now_ms();
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let shard = &mut *shard;
        // Whatever was there goes: a refresh replaces, a key that appeared or vanished moves.
        if let Ok(e) = shard.found.find_entry(h, |e| e.key.hash() == &hash) {
            e.remove();
        }
        if let Ok(e) = shard.unknown.find_entry(h, |e| e.hash == hash) {
            e.remove();
        }
        if shard.len() >= self.per_shard && !self.make_room(shard, now, record.is_some()) {
            return;
        }
        let pick = &self.pick;
        match record {
            Some(key) => {
                shard.found.insert_unique(
                    h,
                    FoundEntry {
                        key,
                        stamp: Stamp(now),
                        generation,
                    },
                    |e| pick.hash_one(e.key.hash()),
                );
            }
            None => {
                shard.unknown_since_sweep += 1;
                if shard.unknown_since_sweep >= UNKNOWN_SWEEP_EVERY {
                    shard.unknown_since_sweep = 0;
                    shard
                        .unknown
                        .retain(|e| now.saturating_sub(e.stamp.fetched()) < self.negative_ms);
                }
                shard.unknown.insert_unique(
                    h,
                    UnknownEntry {
                        hash,
                        stamp: Stamp(now),
                        generation,
                    },
                    |e| pick.hash_one(e.hash),
                );
            }
        }
    }

    /// Frees room in a full shard, a batch at a time so the next sweep is many insertions
    /// away: expired entries, then unknown keys, then (only for a found key) found keys not
    /// looked up since the last sweep, then any. False: an unknown key finds no room, because
    /// only keys in use fill the shard (a flood of unknown keys never displaces them).
    fn make_room(&self, shard: &mut Shard, now: u64, found: bool) -> bool {
        let target = self.per_shard - (self.per_shard / 8).max(1);
        shard
            .unknown
            .retain(|e| now.saturating_sub(e.stamp.fetched()) < self.negative_ms);
        shard
            .found
            .retain(|e| now.saturating_sub(e.stamp.fetched()) < self.max_stale_ms);
        if shard.len() > target {
            let mut excess = shard.len() - target;
            shard.unknown.retain(|_| {
                let keep = excess == 0;
                excess = excess.saturating_sub(1);
                keep
            });
        }
        if !found {
            return shard.len() < self.per_shard;
        }
        if shard.len() > target {
            let mut excess = shard.len() - target;
            shard.found.retain(|e| {
                if e.stamp.used() || excess == 0 {
                    e.stamp.0 &= !USED;
                    return true;
                }
                excess -= 1;
                false
            });
            let mut excess = shard.len().saturating_sub(target);
            shard.found.retain(|_| {
                let keep = excess == 0;
                excess = excess.saturating_sub(1);
                keep
            });
        }
        true
    }

    fn remove(&self, hash: &KeyHash) {
        let (h, shard) = self.shard(hash);
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Ok(e) = shard.found.find_entry(h, |e| e.key.hash() == hash) {
            e.remove();
        }
        if let Ok(e) = shard.unknown.find_entry(h, |e| e.hash == *hash) {
            e.remove();
        }
    }
}

impl CachedStore {
    pub fn new(inner: Arc<dyn KeyStore>, cfg: &KeyCacheConfig) -> Self {
        let max = usize::try_from(cfg.max_entries)
            .unwrap_or(usize::MAX)
            .max(1);
        // Small bounds (tests) in one shard, so the bound is exact.
        let shards = if max >= 1024 { SHARDS } else { 1 };
        let ms = |secs: u64| secs.saturating_mul(1000);
        Self {
            inner,
            state: Arc::new(State {
                // Tables grow with use: an idle daemon holds none of it.
                shards: (0..shards).map(|_| Mutex::default()).collect(),
                pick: RandomState::default(),
                per_shard: (max / shards).max(1),
                epoch: Instant::now(),
                ttl_ms: ms(cfg.ttl_secs),
                max_stale_ms: ms(cfg.max_stale_secs),
                negative_ms: ms(cfg.negative_ttl_secs),
                generation: AtomicU32::new(0),
            }),
            refreshing: Arc::default(),
            flights: Mutex::default(),
            observer: Arc::default(),
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
        match self.state.get(hash) {
            Cached::Found(key, CacheOutcome::Stale) => {
                self.spawn_refresh(*hash);
                return Ok((Some(key), CacheOutcome::Stale));
            }
            Cached::Found(key, outcome) => return Ok((Some(key), outcome)),
            Cached::Unknown => return Ok((None, CacheOutcome::Hit)),
            Cached::Missing => {}
        }
        let flight = self
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(*hash)
            .or_default()
            .clone();
        let _landed = Landed {
            flights: &self.flights,
            hash,
            flight: &flight,
        };
        let fetched = flight
            .0
            .get_or_init(|| async {
                let generation = self.state.generation();
                let fetched = self.inner.lookup(hash).await;
                if let Ok(record) = &fetched {
                    self.state.put(*hash, record.clone(), generation);
                }
                fetched
            })
            .await
            .clone();
        Ok((fetched?, CacheOutcome::Miss))
    }

    /// One background refresh per hash at a time; a failed refresh leaves the stale entry serving
    /// until its maximum age.
    fn spawn_refresh(&self, hash: KeyHash) {
        if !self
            .refreshing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hash)
        {
            return;
        }
        let (inner, state, refreshing, observer) = (
            self.inner.clone(),
            self.state.clone(),
            self.refreshing.clone(),
            self.observer.clone(),
        );
        // Read before the lookup: a revalidation while it runs leaves its answer stale too.
        let generation = state.generation();
        tokio::spawn(async move {
            match inner.lookup(&hash).await {
                Ok(record) => state.put(hash, record, generation),
                Err(e) => observer.key_store_error("refresh", &e),
            }
            refreshing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&hash);
        });
    }

    /// Drops one key (a revocation).
    pub async fn invalidate(&self, hash: &KeyHash) {
        self.state.remove(hash);
    }

    /// Events may have been missed (the subscription was lost): every key is re-read on its next
    /// use, as once `ttl_secs` has passed. A found key keeps serving while it is re-read (and
    /// while the store cannot answer, up to `max_stale_secs`), so a Redis failover does not turn
    /// cached keys into 503s; an unknown one is asked again at once.
    pub fn revalidate_all(&self) {
        self.state.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Entries held, found and unknown.
    pub fn entry_count(&self) -> u64 {
        self.state
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len() as u64)
            .sum()
    }
}

/// Takes a finished (or abandoned) lookup out of the flights when its last waiter leaves it:
/// the next miss of the hash starts afresh, and a lookup every waiter gave up on leaves nothing
/// behind.
struct Landed<'a> {
    flights: &'a Mutex<HashMap<KeyHash, Arc<Flight>>>,
    hash: &'a KeyHash,
    flight: &'a Arc<Flight>,
}

impl Drop for Landed<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        // Waiters clone the flight under this lock: two holders are the map and this one.
        let last = Arc::strong_count(self.flight) <= 2;
        if (self.flight.0.initialized() || last)
            && flights
                .get(self.hash)
                .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            flights.remove(self.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::apikey::KeyKind;
    use crate::store::{Interner, KeyRecord, KeyStatus};
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

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

    /// A store that knows the keys `k0`, `k1`, … given to it.
    struct Known(std::collections::HashMap<KeyHash, Arc<Key>>);

    impl Known {
        fn new(n: usize) -> Self {
            let mut interner = Interner::default();
            Self(
                (0..n)
                    .map(|i| {
                        let id = format!("k{i}");
                        let key = interner.key(&KeyRecord::for_test(&id, KeyKind::Secret, "t"));
                        (KeyHash::of(&id), Arc::new(key))
                    })
                    .collect(),
            )
        }
    }

    impl KeyStore for Known {
        fn lookup<'a>(
            &'a self,
            hash: &'a KeyHash,
        ) -> BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>> {
            Box::pin(std::future::ready(Ok(self.0.get(hash).cloned())))
        }
    }

    #[tokio::test]
    async fn the_bound_holds_and_a_flood_of_unknown_keys_never_displaces_a_found_one() {
        let cached = CachedStore::new(Arc::new(Known::new(150)), &cfg(10, 5, 60));
        for i in 0..60 {
            let found = cached.lookup(&KeyHash::of(&format!("k{i}"))).await.unwrap();
            assert!(found.is_some());
        }
        for i in 0..500 {
            let unknown = cached.lookup(&KeyHash::of(&format!("x{i}"))).await.unwrap();
            assert!(unknown.is_none());
            assert!(cached.entry_count() <= 100, "{}", cached.entry_count());
        }
        for i in 0..60 {
            let (found, outcome) = cached
                .lookup_traced(&KeyHash::of(&format!("k{i}")))
                .await
                .unwrap();
            assert!(found.is_some());
            assert_eq!(outcome, CacheOutcome::Hit, "k{i} was displaced");
        }
        // Found keys past the bound displace each other (those not looked up again first).
        for i in 60..150 {
            cached.lookup(&KeyHash::of(&format!("k{i}"))).await.unwrap();
            assert!(cached.entry_count() <= 100, "{}", cached.entry_count());
        }
        // A revocation forgets.
        cached.invalidate(&KeyHash::of("k149")).await;
        let (_, outcome) = cached.lookup_traced(&KeyHash::of("k149")).await.unwrap();
        assert_eq!(outcome, CacheOutcome::Miss);
    }

    #[tokio::test]
    async fn a_failed_lookup_reaches_every_waiter_once_and_is_not_remembered() {
        let store = Arc::new(Counting {
            delay_ms: 50,
            down: AtomicBool::new(true),
            ..Default::default()
        });
        let cached = Arc::new(CachedStore::new(store.clone(), &cfg(10, 5, 60)));
        let waits = (0..8).map(|_| {
            let c = cached.clone();
            tokio::spawn(async move { c.lookup(&KeyHash::of("k")).await })
        });
        for w in futures_util::future::join_all(waits).await {
            assert!(w.unwrap().is_err());
        }
        assert_eq!(store.calls.load(Ordering::SeqCst), 1);
        assert_eq!(cached.entry_count(), 0);
        assert!(
            cached.flights.lock().unwrap().is_empty(),
            "nothing left in flight"
        );
        store.down.store(false, Ordering::SeqCst);
        *store.record.lock().unwrap() = Some(rec());
        assert!(cached.lookup(&KeyHash::of("k")).await.unwrap().is_some());
        assert_eq!(store.calls.load(Ordering::SeqCst), 2);
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

        // The key was revoked while events were lost; the store is down when the subscription
        // comes back.
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
        let (r, o) = cached.lookup_traced(&KeyHash::of("k")).await.unwrap();
        assert_eq!(r.unwrap().status(), KeyStatus::Revoked);
        assert_eq!(
            o,
            CacheOutcome::Hit,
            "read in the new generation: fresh again"
        );
    }
}
