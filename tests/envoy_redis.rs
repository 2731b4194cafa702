//! End to end through the real Envoy with the fleet's real Redis behind the daemon: keys written
//! into Redis as the key service writes them, the fleet-wide limiter answering the
//! `X-RateLimit-*` headers a client sees, a revocation published on Redis reaching the client
//! through Envoy within a second, and a Redis outage seen from the client's side (cached keys keep
//! working, an unknown key is a 503 with `Retry-After`, never an allow).

mod support;

use std::time::{Duration, Instant};

use support::envoy::*;
use support::redis::{RedisServer, redis_yaml, revoke, seed};
use support::*;

async fn stack(mode: Mode, redis: &RedisServer, keys: &TestKeys) -> Stack {
    seed(&redis.url(), &keys.records()).await;
    let mut opts = redis_yaml(&[redis.url()], false, "fail_open");
    opts.keys = Some(keys.clone());
    Stack::start_with(mode, opts).await
}

async fn redis_keys_and_limits_reach_the_client_and_the_upstream_through_envoy(mode: Mode) {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    let s = stack(mode, &redis, &keys).await;

    // key_limited: 2 per 60 s, counted in Redis.
    for remaining in ["1", "0"] {
        let r = s
            .post(
                API_PATH,
                &[("x-api-key", &keys.limited), ("x-tenant-id", "spoofed")],
            )
            .await;
        let up = r.allowed();
        assert_eq!(
            up.identity(),
            map(&[
                ("x-tenant-id", TENANT),
                ("x-auth-method", "api_key"),
                ("x-api-key-id", "key_limited"),
            ]),
            "identity from the Redis record; the client's x-tenant-id is gone"
        );
        assert_eq!(up.one("x-api-key"), None, "the key is not forwarded");
        assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some(remaining));
        for h in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert_eq!(up.one(h), None, "{h} goes to the client, never upstream");
        }
    }
    let r = s.post(API_PATH, &[("x-api-key", &keys.limited)]).await;
    r.denied(429, "rate_limited");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "retry-after {retry}");

    // The counter lives in Redis (docs/key-store.md: `gybc:rl:{<key id>}`), not in this replica.
    assert_eq!(redis.cli(&["EXISTS", "gybc:rl:{key_limited}"]), "1");
    s.stop().await;
}

async fn a_key_revoked_on_redis_is_refused_at_the_client_within_one_second(mode: Mode) {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    let s = stack(mode, &redis, &keys).await;
    // Cached now: only the published event can evict it within the second.
    s.post(API_PATH, &[("x-api-key", &keys.impersonator)])
        .await
        .allowed();

    let record = keys
        .records()
        .into_iter()
        .find(|r| r.id == "key_impersonator")
        .unwrap();
    let started = Instant::now();
    revoke(&redis.url(), &record).await;
    loop {
        let r = s.post(API_PATH, &[("x-api-key", &keys.impersonator)]).await;
        if r.status == 401 {
            r.denied(401, "invalid_api_key");
            break;
        }
        r.allowed();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "still allowed through Envoy {:?} after the revocation",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    s.stop().await;
}

async fn a_redis_outage_fails_closed_for_unknown_keys_at_the_client(mode: Mode) {
    let mut redis = RedisServer::start();
    let keys = TestKeys::generate();
    let s = stack(mode, &redis, &keys).await;
    s.post(API_PATH, &[("x-api-key", &keys.secret)])
        .await
        .allowed();

    redis.kill();
    // The cached key keeps working, limited by this replica's local limiter (fail_open).
    let r = s.post(API_PATH, &[("x-api-key", &keys.secret)]).await;
    assert_eq!(r.allowed().one("x-api-key-id"), Some("key_secret"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    // A key not in the cache cannot be judged: the daemon's 503 (its JSON body, `Retry-After`),
    // not Envoy's own.
    let r = s.post(API_PATH, &[("x-api-key", &keys.impersonator)]).await;
    r.denied(503, "unavailable");
    assert!(r.header("retry-after").is_some(), "{r:?}");

    redis.restart();
    seed(&redis.url(), &keys.records()).await;
    wait_until(
        "recovery through Envoy",
        Duration::from_secs(10),
        async || {
            s.post(API_PATH, &[("x-api-key", &keys.impersonator)])
                .await
                .status
                == 200
        },
    )
    .await;
    s.stop().await;
}

// Redis keys, the fleet limiter, revocations and an outage, with the engine as a sidecar and
// inside Envoy.
both_modes!(
    redis_keys_and_limits_reach_the_client_and_the_upstream_through_envoy,
    a_key_revoked_on_redis_is_refused_at_the_client_within_one_second,
    a_redis_outage_fails_closed_for_unknown_keys_at_the_client,
);
