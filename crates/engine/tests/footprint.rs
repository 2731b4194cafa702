//! What each per-key structure costs in heap bytes, counted by `allocation-counter`'s global
//! allocator on the calling thread (a test binary of its own): the key file's table (and the peak
//! while it loads or reloads), the local limiter's cell, the Redis path's key cache. Each is
//! bounded here; `cargo test -p gybc-authz-engine --test footprint -- --nocapture` prints the
//! breakdown BENCHMARKS.md quotes. Bytes are what was asked of the allocator; glibc adds 8 to
//! each allocation and rounds it up to 16.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use gybc_authz_engine::authn::apikey::{KeyHash, KeyKind};
use gybc_authz_engine::clock::SystemClock;
use gybc_authz_engine::config::KeyCacheConfig;
use gybc_authz_engine::ratelimit::{LocalLimiter, RateLimit};
use gybc_authz_engine::store::{
    CachedStore, FileStore, Interner, Key, KeyRecord, KeyStatus, KeyStore, StoreError,
};

const KEYS: usize = 100_000;

/// Key ids as the key service makes them: `key_` and 16 base62 characters.
fn id(i: usize) -> String {
    format!("key_{i:016}")
}

fn secret(i: usize) -> String {
    format!("sk_footprint_{i}")
}

/// A JSON key file of `n` keys over a few tenants and scope lists, as a fleet's looks.
fn key_file(n: usize) -> String {
    let mut text = String::from("{\"keys\":[\n");
    for i in 0..n {
        let sep = if i == 0 { "" } else { ",\n" };
        write!(
            text,
            r#"{sep}{{"id":"{}","hash":"sha256:{}","kind":"secret","tenant":"tenant-{}","scopes":["threads:read","runs:{}"],"name":"backend {i}","created_at":"2026-11-01T00:00:00Z"}}"#,
            id(i),
            KeyHash::of(&secret(i)).to_hex(),
            i % 7,
            i % 3,
        )
        .unwrap();
    }
    text.push_str("\n]}\n");
    text
}

fn record(i: usize) -> KeyRecord {
    KeyRecord {
        id: id(i),
        hash: KeyHash::of(&secret(i)),
        kind: KeyKind::Secret,
        tenant: format!("tenant-{}", i % 7),
        scopes: vec!["threads:read".into(), format!("runs:{}", i % 3)],
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

/// Bytes per key held after `f`, the peak per key while it ran, and allocations per key held.
fn per_key<T>(n: usize, f: impl FnOnce() -> T) -> (T, f64, f64, f64) {
    let mut out = None;
    let info = allocation_counter::measure(|| out = Some(f()));
    (
        out.expect("ran"),
        info.bytes_current as f64 / n as f64,
        info.bytes_max as f64 / n as f64,
        info.count_current as f64 / n as f64,
    )
}

/// The Redis store stood in for by records built in memory: what the key cache holds per key
/// is the record as Redis decoding makes it (an `Arc<Key>` of its own) and its entry.
struct Records(HashMap<KeyHash, Arc<Key>>);

impl KeyStore for Records {
    fn lookup<'a>(
        &'a self,
        hash: &'a KeyHash,
    ) -> BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>> {
        Box::pin(std::future::ready(Ok(self.0.get(hash).cloned())))
    }
}

#[test]
fn every_per_key_structure_is_bounded_and_a_reload_never_doubles_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    std::fs::write(&path, key_file(KEYS)).unwrap();
    let mut report = String::new();

    // The key file's table: the key (72 bytes), its id's bytes in its block's buffer, a slot of
    // the table. Loading streams the file, so its peak is the table and the interner, not the
    // file's text or entries.
    let (store, table, load_peak, allocs) = per_key(KEYS, || FileStore::open(&path).unwrap());
    assert_eq!(store.len(), KEYS);
    // No allocation per key: the ids are in one buffer a block of 4,096 keys.
    assert!(
        allocs < 0.01,
        "{allocs:.2} allocations per key in the file's table"
    );
    writeln!(
        report,
        "file store: {table:.1} B/key held ({allocs:.2} allocations/key), {load_peak:.1} B/key at the load's peak"
    )
    .unwrap();
    assert!(table <= 100.0, "{table:.1} B per key in the file's table");
    assert!(
        load_peak <= table * 1.25,
        "loading peaks at {load_peak:.1} B per key for a table of {table:.1}"
    );

    // A reload builds the new table beside the serving one: at most the table once more.
    std::fs::write(&path, key_file(KEYS + 1)).unwrap();
    let (reloaded, _, reload_peak, _) = per_key(KEYS, || store.reload_if_changed().unwrap());
    assert!(reloaded);
    writeln!(
        report,
        "file store reload: {reload_peak:.1} B/key above the serving table at its peak"
    )
    .unwrap();
    assert!(
        reload_peak <= table * 1.25,
        "a reload peaks {reload_peak:.1} B per key above the serving {table:.1}"
    );

    // The local limiter: a 16-byte cell per key in plain tables.
    let limiter = LocalLimiter::new(Arc::new(SystemClock), KEYS as u64);
    let limit: RateLimit = "100/60s".parse().unwrap();
    let ids: Vec<String> = (0..KEYS).map(id).collect();
    let ((), cells, _, _) = per_key(KEYS, || {
        for i in &ids {
            assert!(limiter.check_now(i, limit).allowed);
        }
    });
    writeln!(report, "local limiter: {cells:.1} B/key").unwrap();
    assert!(cells <= 40.0, "{cells:.1} B per limiter cell");

    // The Redis path's key cache: every key looked up once, so the cache holds each record (as
    // Redis decoding makes it) and its entry.
    let mut interner = Interner::default();
    // Made before counting: the test's map of the records is no part of any pod.
    let mut records = HashMap::with_capacity(KEYS);
    let ((), record, _, _) = per_key(KEYS, || {
        for i in 0..KEYS {
            let key = Arc::new(interner.key(&record(i)));
            records.insert(*key.hash(), key);
        }
    });
    let hashes: Vec<KeyHash> = (0..KEYS).map(|i| KeyHash::of(&secret(i))).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = KeyCacheConfig {
        max_entries: KEYS as u64,
        ..Default::default()
    };
    let store: Arc<dyn KeyStore> = Arc::new(Records(records));
    let (cache, entry, _, _) = per_key(KEYS, || {
        let cache = CachedStore::new(store.clone(), &cfg);
        rt.block_on(async {
            for h in &hashes {
                assert!(cache.lookup(h).await.unwrap().is_some());
            }
        });
        cache
    });
    assert!(cache.entry_count() > 0);
    writeln!(
        report,
        "key cache (Redis): {record:.1} B/key for the record, {entry:.1} B/key for its cache entry"
    )
    .unwrap();
    // The record as Redis decoding makes it (an `Arc<Key>` and its id), and a table slot.
    assert!(record <= 150.0, "{record:.1} B per cached record");
    assert!(entry <= 40.0, "{entry:.1} B per cache entry");
    println!("{report}");
}
