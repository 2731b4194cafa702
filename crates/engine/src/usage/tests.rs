use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::ManualClock;
use crate::decision::{AuthMethod, Denial, Grant, Identity};

/// 2027-01-15T08:00:00Z.
const T0: u64 = 1_800_000_000;

fn usage(cfg: UsageConfig) -> (Usage, Arc<ManualClock>, Arc<Observer>) {
    let clock = Arc::new(ManualClock::at_secs(T0 + 60));
    let observer = Arc::new(Observer::default());
    let u = Usage::new(&cfg, None, clock.clone(), observer.clone());
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
            key_id: key.map(Arc::from),
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

fn counts(allowed: u64, rate_limited: u64, denied: u64) -> Counts {
    Counts {
        allowed,
        rate_limited,
        denied,
    }
}

async fn series(u: &Usage, key: &str) -> Vec<(u64, Counts)> {
    u.local_series(key, 0..u64::MAX)
        .await
        .expect("no Redis: kept in memory")
        .into_iter()
        .map(|b| (b.hour_start, b.counts))
        .collect()
}

#[tokio::test]
async fn only_decisions_about_a_known_key_count_each_by_its_outcome() {
    let (u, _, _) = usage(UsageConfig::default());
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
    u.flush_now().await;
    let hour = T0;
    assert_eq!(series(&u, "key_a").await, [(hour, counts(2, 1, 1))]);
    assert_eq!(series(&u, "key_b").await, [(hour, counts(0, 0, 1))]);
    assert_eq!(series(&u, "key_c").await, []);
}

#[tokio::test]
async fn each_decision_goes_to_its_own_hour_even_within_one_interval() {
    let (u, clock, _) = usage(UsageConfig::default());
    u.count(&allow(Some("key_a")));
    clock.advance(Duration::from_secs(3600));
    u.count(&allow(Some("key_a")));
    u.count(&deny(Reason::RateLimited, Some("key_a")));
    u.flush_now().await;
    clock.advance(Duration::from_secs(7200));
    u.count(&allow(Some("key_a")));
    u.flush_now().await;
    assert_eq!(
        series(&u, "key_a").await,
        [
            (T0, counts(1, 0, 0)),
            (T0 + 3600, counts(1, 1, 0)),
            (T0 + 3 * 3600, counts(1, 0, 0)),
        ]
    );
    // A range is whole hours, its end excluded.
    let hours = read::hours_covering(T0 + 3600, T0 + 3 * 3600);
    let got = u.local_series("key_a", hours).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].hour_start, T0 + 3600);
}

#[tokio::test]
async fn keys_over_the_interval_cap_are_not_held_but_counted_as_lost() {
    let (u, _, observer) = usage(UsageConfig {
        max_keys_per_interval: 2,
        ..Default::default()
    });
    for key in ["key_a", "key_b", "key_c", "key_d"] {
        u.count(&allow(Some(key)));
        u.count(&allow(Some(key)));
    }
    // The first two keys keep counting; the others never take space.
    assert_eq!(u.entries().await, 2);
    let dropped = || {
        observer
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with("gybc_authz_usage_dropped_total{reason=\"key_cap\"}"))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(dropped().as_deref(), Some("0"), "reported by the flush");
    u.flush_now().await;
    assert_eq!(dropped().as_deref(), Some("4"));
    assert_eq!(series(&u, "key_a").await, [(T0, counts(2, 0, 0))]);
    assert_eq!(series(&u, "key_c").await, []);
    // A new interval: the cap counts again from zero.
    u.count(&allow(Some("key_c")));
    u.flush_now().await;
    assert_eq!(series(&u, "key_c").await, [(T0, counts(1, 0, 0))]);
}

#[tokio::test]
async fn without_redis_the_record_is_bounded_and_forgets_past_the_retention() {
    let (u, clock, observer) = usage(UsageConfig {
        max_keys_per_interval: 2,
        max_held_entries: 3,
        retention_days: 1,
        ..Default::default()
    });
    u.count(&allow(Some("key_a")));
    u.count(&allow(Some("key_b")));
    u.flush_now().await;
    clock.advance(Duration::from_secs(3600));
    for _ in 0..2 {
        u.count(&allow(Some("key_a")));
        u.count(&allow(Some("key_b")));
    }
    u.flush_now().await;
    // Three entries fit: both first hours, and one of the two second hours (which one depends
    // on the map's order); the other's 2 decisions are dropped and counted.
    assert_eq!(u.entries().await, 3);
    let text = observer.metrics.render();
    assert!(
        text.contains("gybc_authz_usage_dropped_total{reason=\"held_full\"} 2"),
        "{text}"
    );
    assert!(text.contains("gybc_authz_usage_entries 3"), "{text}");
    let (a, b) = (series(&u, "key_a").await, series(&u, "key_b").await);
    assert_eq!((a[0], b[0]), ((T0, counts(1, 0, 0)), (T0, counts(1, 0, 0))));
    let second: Vec<_> = a[1..].iter().chain(&b[1..]).collect();
    assert_eq!(second, [&(T0 + 3600, counts(2, 0, 0))], "{a:?} {b:?}");
    // A day and more later the first hours are gone.
    clock.advance(Duration::from_secs(25 * 3600));
    u.flush_now().await;
    assert_eq!(u.entries().await, 0);
    assert_eq!(series(&u, "key_a").await, []);
}

#[tokio::test]
async fn counting_from_many_threads_loses_nothing() {
    let (u, _, _) = usage(UsageConfig::default());
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
    u.flush_now().await;
    let mut total = 0;
    for key in &keys {
        for (_, c) in series(&u, key).await {
            total += c.allowed;
        }
    }
    assert_eq!(total, 4_000);
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
