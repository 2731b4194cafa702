use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::ManualClock;
use crate::config::Config;
use crate::decision::{AuthMethod, Denial, Grant, Identity};

/// 2027-01-15T08:00:00Z.
const T0: u64 = 1_800_000_000;

/// A Redis no one listens on: nothing is ever written, so what was counted stays readable
/// (`take`) or held.
async fn unreachable_redis() -> (Redis, String, bool) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = Config::from_yaml(
        &format!("redis: {{ urls: [\"redis://127.0.0.1:{port}\"], timeout_ms: 100, connect_timeout_ms: 100 }}\n"),
        &BTreeMap::new(),
    )
    .unwrap();
    let redis = Redis::connect(cfg.redis.as_ref().unwrap()).await.unwrap();
    (redis, "gybc".into(), false)
}

async fn usage(cfg: UsageConfig) -> (Usage, Arc<ManualClock>, Arc<Observer>) {
    let clock = Arc::new(ManualClock::at_secs(T0 + 60));
    let observer = Arc::new(Observer::default());
    let u = Usage::new(
        &cfg,
        Some(unreachable_redis().await),
        clock.clone(),
        observer.clone(),
    );
    (u, clock, observer)
}

fn allow(key: Option<&str>) -> Decision {
    Decision::Allow(Grant {
        identity: Some(Identity {
            method: if key.is_some() {
                AuthMethod::ApiKey
            } else {
                AuthMethod::Jwt
            },
            tenant: Some(Arc::from("t1")),
            user: key.is_none().then(|| "u1".to_owned()),
            key_id: key.map(KeyId::from),
            scopes: None,
            impersonated_by: None,
        }),
        rate: None,
    })
}

fn deny(reason: Reason, key: Option<&str>) -> Decision {
    let d = Denial::new(reason);
    Decision::Deny(match key {
        Some(k) => d.by(AuthMethod::ApiKey, Some("t1"), Some(k)),
        None => d.by(AuthMethod::ApiKey, None, None),
    })
}

fn counts(allowed: u32, rate_limited: u32, denied: u32) -> Tally {
    Tally {
        allowed,
        rate_limited,
        denied,
    }
}

/// What is counted and not yet flushed, per key: (hour start, tally) in hour order.
fn series(taken: &[Entry], key: &str) -> Vec<(u64, Tally)> {
    let mut out: Vec<(u64, Tally)> = taken
        .iter()
        .filter(|(k, _, _)| &**k == key)
        .map(|(_, h, t)| (u64::from(*h) * HOUR_SECS, *t))
        .collect();
    out.sort_by_key(|(h, _)| *h);
    out
}

fn dropped(observer: &Observer, reason: &str) -> Option<String> {
    let prefix = format!("gybc_authz_usage_dropped_total{{reason=\"{reason}\"}}");
    observer
        .metrics
        .render()
        .lines()
        .find(|l| l.starts_with(&prefix))
        .map(|l| l.rsplit(' ').next().unwrap().to_owned())
}

#[tokio::test]
async fn only_decisions_about_a_known_key_count_each_by_its_outcome() {
    let (u, _, _) = usage(UsageConfig::default()).await;
    for d in [
        allow(Some("key_a")),
        allow(Some("key_a")),
        deny(Reason::RateLimited, Some("key_a")),
        deny(Reason::InsufficientScope, Some("key_a")),
        deny(Reason::Unavailable, Some("key_b")),
        // A token's allow, an unknown key, a request without credentials: no key, no count.
        allow(None),
        deny(Reason::InvalidApiKey, None),
        Decision::Deny(Denial::new(Reason::MissingCredentials)),
    ] {
        u.count(&d);
    }
    assert_eq!(u.entries().await, 2, "two keys counted");
    let taken = u.take();
    assert_eq!(series(&taken, "key_a"), [(T0, counts(2, 1, 1))]);
    assert_eq!(series(&taken, "key_b"), [(T0, counts(0, 0, 1))]);
    assert_eq!(series(&taken, "key_c"), []);
    assert_eq!(u.entries().await, 0, "taken: nothing left");
}

#[tokio::test]
async fn each_decision_goes_to_its_own_hour_even_within_one_interval() {
    let (u, clock, _) = usage(UsageConfig::default()).await;
    u.count(&allow(Some("key_a")));
    clock.advance(Duration::from_secs(3600));
    u.count(&allow(Some("key_a")));
    u.count(&deny(Reason::RateLimited, Some("key_a")));
    clock.advance(Duration::from_secs(7200));
    u.count(&allow(Some("key_a")));
    assert_eq!(u.entries().await, 3, "the key's three hours");
    // A thread that read the clock just before the hour turned counts into the earlier hour.
    clock.set_nanos((T0 + 3600 + 5) * 1_000_000_000);
    u.count(&deny(Reason::InsufficientScope, Some("key_a")));
    assert_eq!(
        series(&u.take(), "key_a"),
        [
            (T0, counts(1, 0, 0)),
            (T0 + 3600, counts(1, 1, 1)),
            (T0 + 3 * 3600, counts(1, 0, 0)),
        ]
    );
}

#[tokio::test]
async fn keys_over_the_interval_cap_are_not_held_but_counted_as_lost() {
    let (u, _, observer) = usage(UsageConfig {
        max_keys_per_interval: 2,
        ..Default::default()
    })
    .await;
    for key in ["key_a", "key_b", "key_c", "key_d"] {
        u.count(&allow(Some(key)));
        u.count(&allow(Some(key)));
    }
    // The first two keys keep counting; the others never take space.
    assert_eq!(u.entries().await, 2);
    assert_eq!(
        dropped(&observer, "key_cap").as_deref(),
        Some("0"),
        "reported by the flush"
    );
    let taken = u.take();
    assert_eq!(series(&taken, "key_a"), [(T0, counts(2, 0, 0))]);
    assert_eq!(series(&taken, "key_c"), []);
    u.flush_now().await;
    assert_eq!(dropped(&observer, "key_cap").as_deref(), Some("4"));
    // A new interval: the cap counts again from zero.
    u.count(&allow(Some("key_c")));
    assert_eq!(series(&u.take(), "key_c"), [(T0, counts(1, 0, 0))]);
}

/// The memory usage may hold: live entries within `max_keys_per_interval`, held ones (Redis
/// unwritable) within `max_held_entries`, each a compact entry; everything else is counted.
#[tokio::test]
async fn held_usage_entries_are_compact_and_bounded() {
    // 32 bytes an entry taken or held (the id shared with the key record, the hour, three
    // 32-bit counters), 32 a live slot: not the 48 + 24 of (key, u64 hour, u64 counts).
    assert_eq!(std::mem::size_of::<Entry>(), 32);
    assert_eq!(std::mem::size_of::<(Arc<str>, Slot)>(), 32);
    let (u, clock, observer) = usage(UsageConfig {
        max_keys_per_interval: 50,
        max_held_entries: 120,
        ..Default::default()
    })
    .await;
    let mut decided = 0;
    for round in 0..4 {
        for k in 0..80 {
            u.count(&allow(Some(&format!("key_{round}_{k}"))));
            decided += 1;
        }
        assert!(u.entries().await <= 50 + 120, "{}", u.entries().await);
        // Redis is unreachable: what fits is held for the next flush, the rest is counted.
        u.flush_now().await;
        assert!(u.entries().await <= 120, "{}", u.entries().await);
        clock.advance(Duration::from_secs(1));
    }
    assert_eq!(u.entries().await, 120, "the bound is reached, not passed");
    let text = observer.metrics.render();
    assert!(text.contains("gybc_authz_usage_entries 120"), "{text}");
    let lost: u64 = ["key_cap", "held_full", "expired"]
        .iter()
        .map(|r| dropped(&observer, r).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(
        lost + 120,
        decided,
        "every decision is held or counted as lost"
    );
}

#[tokio::test]
async fn without_redis_nothing_is_held_and_every_decision_is_counted_as_dropped() {
    let clock = Arc::new(ManualClock::at_secs(T0 + 60));
    let observer = Arc::new(Observer::default());
    let u = Usage::new(&UsageConfig::default(), None, clock, observer.clone());
    for k in 0..1_000 {
        u.count(&allow(Some(&format!("key_{k}"))));
    }
    u.count(&deny(Reason::RateLimited, Some("key_0")));
    u.count(&deny(Reason::InvalidApiKey, None));
    assert_eq!(u.entries().await, 0);
    assert!(u.take().is_empty());
    u.flush_now().await;
    assert_eq!(dropped(&observer, "no_redis").as_deref(), Some("1001"));
    assert_eq!(u.entries().await, 0);
}

#[tokio::test]
async fn counting_from_many_threads_loses_nothing() {
    let (u, _, _) = usage(UsageConfig::default()).await;
    let u = Arc::new(u);
    let keys: Vec<String> = (0..40).map(|i| format!("key_{i}")).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (u, keys) = (u.clone(), &keys);
            s.spawn(move || {
                for i in 0..1_000 {
                    let key = &keys[(i + t) % keys.len()];
                    u.count(&allow(Some(key)));
                }
            });
        }
    });
    let taken = u.take();
    let mut total = 0;
    for key in &keys {
        for (_, c) in series(&taken, key) {
            total += c.allowed;
        }
    }
    assert_eq!(total, 4_000);
}

#[test]
fn a_tally_never_wraps_and_says_what_did_not_fit() {
    let mut t = counts(u32::MAX - 1, 0, 7);
    assert_eq!(t.add(counts(5, 2, 1)), 4);
    assert_eq!(t, counts(u32::MAX, 2, 8));
    assert_eq!(t.counts().allowed, u64::from(u32::MAX));
}

#[test]
fn names_follow_the_documented_layout() {
    assert_eq!(hour_name(T0 / 3600), "2027011508");
    assert_eq!(
        usage_name("gybc", "key_abc", T0 / 3600 + 15),
        "gybc:usage:{key_abc}:2027011523"
    );
    assert_eq!(
        read::hours_covering(T0 + 10, T0 + 3600),
        T0 / 3600..T0 / 3600 + 1
    );
    assert_eq!(
        read::hours_covering(T0, T0 + 3601),
        T0 / 3600..T0 / 3600 + 2
    );
}
