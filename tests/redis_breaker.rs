//! A Redis that stalls (slow, not down) must not put its timeout on every request: a real
//! `redis-server` is stalled with `DEBUG SLEEP` under two replicas sharing it (one fail_closed, one
//! fail_open). Once each replica's circuit breaker has opened, a request costs under 5 ms more than
//! before the stall (median), nothing is allowed that the failure mode forbids, and within a
//! second of Redis answering again the breakers have closed and the fleet-wide limit is exact.

mod support;

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use support::redis::{RedisServer, seed};
use support::*;

/// How long Redis is stalled.
const STALL: Duration = Duration::from_secs(3);
/// Samples stop this long before the stall can end at the earliest, so every one of them was
/// answered while Redis was stalled, however late the stall began.
const STALL_MARGIN: Duration = Duration::from_millis(300);

async fn replica(redis: &RedisServer, keys: &TestKeys, failure_mode: &str) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        keys: Some(keys.clone()),
        key_store_yaml: Some("key_store: { type: redis }".into()),
        // The default breaker; a default limit high enough that the latency samples are never
        // rate limited (an over-limit key is answered without Redis, which would flatter the
        // baseline).
        extra_yaml: format!(
            "redis: {{ urls: [\"{}\"], timeout_ms: 200, connect_timeout_ms: 300 }}\nrate_limit: {{ backend: redis, failure_mode: {failure_mode}, default: 1000000/60s }}\n",
            redis.url()
        ),
        ..Default::default()
    })
    .await
}

/// One Check and how long it took, as the client saw it.
async fn timed(env: &TestEnv, key: &str) -> (CheckResponse, Duration) {
    let started = Instant::now();
    let resp = env.check(API_PATH, &[("x-api-key", key)]).await;
    (resp, started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    assert!(!v.is_empty());
    v.sort();
    v[v.len() / 2]
}

async fn breaker_open(env: &TestEnv) -> f64 {
    scrape(env).await.get("gybc_authz_redis_breaker_open", &[])
}

fn is_allow(resp: &CheckResponse) -> bool {
    resp.status.as_ref().is_some_and(|s| s.code == 0)
}

#[tokio::test]
async fn a_stalled_redis_costs_little_once_the_breaker_opens_and_the_fleet_limit_returns_within_a_second()
 {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let closed = replica(&redis, &keys, "fail_closed").await;
    let open = replica(&redis, &keys, "fail_open").await;
    let cached = keys.impersonator.as_str();

    // Baseline: a cached key (after its first lookup), counted in Redis on every request.
    for env in [&closed, &open] {
        allowed(&env.check(API_PATH, &[("x-api-key", cached)]).await);
    }
    let mut baseline = Vec::new();
    for _ in 0..40 {
        for env in [&closed, &open] {
            let (resp, took) = timed(env, cached).await;
            allowed(&resp);
            baseline.push(took);
        }
    }
    let baseline = median(baseline);

    // Stall Redis from its own connection; the thread reports when Redis answered again.
    let port = redis.port;
    let stalled_from = Instant::now();
    let stall = std::thread::spawn(move || {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["DEBUG", "SLEEP", &STALL.as_secs().to_string()])
            .output()
            .expect("redis-cli runs");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("OK"),
            "DEBUG SLEEP refused: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Instant::now()
    });
    let stall_ends_earliest = stalled_from + STALL;

    // Requests wait on Redis (up to timeout_ms each) until enough have failed in a row.
    let opens = async |env: &TestEnv| {
        wait_until(
            "the breaker opens under a stalled Redis",
            STALL - STALL_MARGIN * 2,
            async || {
                env.check(API_PATH, &[("x-api-key", cached)]).await;
                breaker_open(env).await == 1.0
            },
        )
        .await
    };
    tokio::join!(opens(&closed), opens(&open));
    let opened_after = stalled_from.elapsed();

    // The rest of the stall: every answer at once, and by the failure mode. fail_closed cannot
    // count the cached key, so 503; fail_open counts it on this replica and allows it. Keys that
    // are not cached cannot be judged on either: 503 with Retry-After, whether Redis holds them
    // (secret) or not (unknown).
    let cases = [
        (&closed, cached, true),
        (&open, cached, false),
        (&closed, keys.secret.as_str(), true),
        (&closed, keys.unknown.as_str(), true),
        (&open, keys.secret.as_str(), true),
        (&open, keys.unknown.as_str(), true),
    ];
    let sample_until = stall_ends_earliest - STALL_MARGIN;
    let mut during = Vec::new();
    'sampling: loop {
        for (env, key, unavailable) in cases {
            if Instant::now() >= sample_until {
                break 'sampling;
            }
            let (resp, took) = timed(env, key).await;
            if Instant::now() >= stall_ends_earliest {
                // Perhaps answered after the stall: neither a sample nor a case to judge.
                break 'sampling;
            }
            if unavailable {
                let d = assert_denied(&resp, 503, "unavailable");
                assert!(d.headers.contains_key("retry-after"));
            } else {
                let a = allowed(&resp);
                assert_eq!(a.upstream["x-api-key-id"], "key_impersonator");
            }
            during.push(took);
        }
    }
    let samples = during.len();
    assert!(
        samples >= 30,
        "too few samples after the breakers opened ({samples}; they opened {opened_after:?} into the stall)"
    );
    let stalled = median(during);
    let added = stalled.saturating_sub(baseline);
    eprintln!(
        "breakers open {opened_after:?} into the stall; median check {baseline:?} before, {stalled:?} with the breakers open ({samples} samples)"
    );
    assert!(
        added < Duration::from_millis(5),
        "median added latency {added:?} with the breaker open (baseline {baseline:?}, stalled {stalled:?})"
    );
    let fallbacks =
        |m: &Metrics, mode: &str| m.get("gybc_authz_rate_limit_fallbacks_total", &[("mode", mode)]);
    for (env, mode) in [(&closed, "denied"), (&open, "local")] {
        let m = scrape(env).await;
        assert_eq!(
            m.get(
                "gybc_authz_redis_breaker_transitions_total",
                &[("to", "open")]
            ),
            1.0
        );
        for backend in ["key_store", "rate_limit"] {
            assert!(
                m.get(
                    "gybc_authz_backend_errors_total",
                    &[("backend", backend), ("kind", "breaker_open")]
                ) > 0.0,
                "{backend} short circuits are counted"
            );
        }
        assert!(fallbacks(&m, mode) > 0.0, "{mode} fallbacks are counted");
    }
    assert_eq!(
        fallbacks(&scrape(&closed).await, "local"),
        0.0,
        "fail_closed never counts locally"
    );

    // Redis answers again: within a second both breakers have closed and the fleet counts in
    // Redis again. key_limited (2 per 60 s) was never used: across both replicas it gets
    // exactly 2, with Remaining counting down from Redis.
    let answered = tokio::task::spawn_blocking(move || stall.join().expect("stall thread"))
        .await
        .unwrap();
    for env in [&closed, &open] {
        wait_until(
            "the breaker closes once Redis answers",
            Duration::from_secs(1),
            async || breaker_open(env).await == 0.0,
        )
        .await;
    }
    let mut seen = Vec::new();
    for env in [&closed, &open, &closed, &open] {
        let resp = env.check(API_PATH, &[("x-api-key", &keys.limited)]).await;
        seen.push(if is_allow(&resp) {
            allowed(&resp).to_client["x-ratelimit-remaining"].clone()
        } else {
            assert_denied(&resp, 429, "rate_limited");
            "429".into()
        });
    }
    let recovered = answered.elapsed();
    assert_eq!(seen, ["1", "0", "429", "429"], "one limit across the fleet");
    assert!(
        recovered < Duration::from_secs(1),
        "the fleet limit was exact again only {recovered:?} after Redis answered"
    );
    eprintln!("fleet limit exact again {recovered:?} after Redis answered");
    assert_eq!(
        redis.cli(&["EXISTS", "gybc:rl:{key_limited}"]),
        "1",
        "counted in Redis"
    );
    for env in [&closed, &open] {
        let m = scrape(env).await;
        assert_eq!(
            m.get(
                "gybc_authz_redis_breaker_transitions_total",
                &[("to", "closed")]
            ),
            1.0
        );
        // Cached keys kept working and work on: allowed, counted in Redis again.
        allowed(&env.check(API_PATH, &[("x-api-key", cached)]).await);
    }
    closed.stop().await;
    open.stop().await;
}
