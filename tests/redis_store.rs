//! One fleet, one truth: the Redis key store, revocation through pub/sub, the fleet-wide rate
//! limiter, outages, Redis Cluster, and the documented layout, all against real `redis-server`s.

mod support;

use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use gybc_authz_engine::authn::apikey::KeyHash;
use gybc_authz_engine::redis_conn::Names;
use gybc_authz_engine::store::KeyRecord;
use gybc_authz_engine::store::redis::encode_record;
use support::redis::{RedisCluster, RedisServer, redis_yaml, revoke, seed, seed_cluster};
use support::*;

fn record<'a>(records: &'a [KeyRecord], id: &str) -> &'a KeyRecord {
    records.iter().find(|r| r.id == id).unwrap()
}

async fn replica(
    server_urls: &[String],
    cluster: bool,
    keys: &TestKeys,
    failure_mode: &str,
) -> TestEnv {
    let mut opts = redis_yaml(server_urls, cluster, failure_mode);
    opts.keys = Some(keys.clone());
    TestEnv::start_with(opts).await
}

#[tokio::test]
async fn two_replicas_share_one_limit_and_agree_on_headers() {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let a = replica(&[redis.url()], false, &keys, "fail_open").await;
    let b = replica(&[redis.url()], false, &keys, "fail_open").await;

    // key_secret allows 5 per 60 s: a burst of 12 spread over both replicas gets exactly 5.
    let mut remaining = Vec::new();
    let mut denials = Vec::new();
    for i in 0..12 {
        let env = if i % 2 == 0 { &a } else { &b };
        let resp = env.check(API_PATH, &[("x-api-key", &keys.secret)]).await;
        if resp.status.as_ref().unwrap().code == 0 {
            remaining.push(allowed(&resp).to_client["x-ratelimit-remaining"].clone());
        } else {
            denials.push(assert_denied(&resp, 429, "rate_limited"));
        }
    }
    assert_eq!(
        remaining,
        ["4", "3", "2", "1", "0"],
        "the replicas count into one bucket"
    );
    assert_eq!(denials.len(), 7);
    let resets: std::collections::BTreeSet<_> = denials
        .iter()
        .map(|d| d.headers["x-ratelimit-reset"].clone())
        .collect();
    assert_eq!(
        resets.len(),
        1,
        "both replicas report one reset time: {resets:?}"
    );
    for d in &denials {
        assert_eq!(d.headers["x-ratelimit-limit"], "5");
        assert_eq!(d.headers["x-ratelimit-remaining"], "0");
        let retry: u64 = d.headers["retry-after"].parse().unwrap();
        assert!((1..=12).contains(&retry), "retry-after {retry}");
    }
    a.stop().await;
    b.stop().await;
}

/// Redis lookups go through the key cache, and both say so: every lookup in `key_lookups_total`
/// under `store="redis"`, and how the cache answered in `cache_requests_total` (series a file
/// store does not have).
#[tokio::test]
async fn redis_lookups_are_counted_with_the_cache_that_answered_them() {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let env = replica(&[redis.url()], false, &keys, "fail_open").await;
    let before = scrape(&env).await;
    for _ in 0..2 {
        allowed(&env.check(API_PATH, &[("x-api-key", &keys.secret)]).await);
        assert_denied(
            &env.check(API_PATH, &[("x-api-key", &keys.unknown)]).await,
            401,
            "invalid_api_key",
        );
    }
    let after = scrape(&env).await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let lookups = "gybc_authz_key_lookups_total";
    assert_eq!(
        delta(lookups, &[("store", "redis"), ("result", "found")]),
        2.0
    );
    assert_eq!(
        delta(lookups, &[("store", "redis"), ("result", "not_found")]),
        2.0
    );
    assert_eq!(
        delta(lookups, &[("store", "redis"), ("result", "error")]),
        0.0
    );
    let cache = "gybc_authz_cache_requests_total";
    assert_eq!(delta(cache, &[("cache", "keys"), ("result", "miss")]), 2.0);
    assert_eq!(delta(cache, &[("cache", "keys"), ("result", "hit")]), 1.0);
    assert_eq!(
        delta(cache, &[("cache", "negative_keys"), ("result", "hit")]),
        1.0
    );
    assert!(
        env.daemon.as_ref().unwrap().keys.cached_entries().is_some(),
        "Redis has the key cache in front"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_revoked_key_is_denied_by_every_replica_within_one_second() {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    let records = keys.records();
    seed(&redis.url(), &records).await;
    let a = replica(&[redis.url()], false, &keys, "fail_open").await;
    let b = replica(&[redis.url()], false, &keys, "fail_open").await;
    // Both replicas have the key cached (fresh for 10 s: only the event can evict it in time).
    for env in [&a, &b] {
        allowed(
            &env.check(API_PATH, &[("x-api-key", &keys.impersonator)])
                .await,
        );
    }
    // Let the subscriptions settle before the event (they start with the daemon).
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    revoke(&redis.url(), record(&records, "key_impersonator")).await;
    let mut denied = [false, false];
    while denied != [true, true] {
        for (i, env) in [&a, &b].into_iter().enumerate() {
            if !denied[i] {
                let resp = env
                    .check(API_PATH, &[("x-api-key", &keys.impersonator)])
                    .await;
                denied[i] = resp.status.as_ref().unwrap().code != 0;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not revoked everywhere within 1 s: {denied:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    eprintln!("revocation reached both replicas in {took:?}");
    for env in [&a, &b] {
        assert_denied(
            &env.check(API_PATH, &[("x-api-key", &keys.impersonator)])
                .await,
            401,
            "invalid_api_key",
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn redis_killed_mid_test_fail_open() {
    let mut redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let env = replica(&[redis.url()], false, &keys, "fail_open").await;
    allowed(&env.check(API_PATH, &[("x-api-key", &keys.secret)]).await);

    redis.kill();
    // Cached keys keep working; the limit is counted on this replica (fresh local bucket of 5).
    let mut allowed_count = 0;
    for _ in 0..7 {
        let resp = env.check(API_PATH, &[("x-api-key", &keys.secret)]).await;
        if resp.status.as_ref().unwrap().code == 0 {
            allowed_count += 1;
        } else {
            assert_denied(&resp, 429, "rate_limited");
        }
    }
    assert_eq!(allowed_count, 5, "fail-open: the local limiter stands in");
    let m = scrape(&env).await;
    assert_eq!(
        m.get(
            "gybc_authz_rate_limit_fallbacks_total",
            &[("mode", "local")]
        ),
        7.0,
        "every fallback is counted"
    );
    // The first failures in a row open the breaker; the rest are answered without asking Redis.
    let errors = |kind: &str| {
        m.get(
            "gybc_authz_backend_errors_total",
            &[("backend", "rate_limit"), ("kind", kind)],
        )
    };
    assert_eq!(errors("error") + errors("timeout"), 3.0);
    assert_eq!(errors("breaker_open"), 4.0);
    assert_eq!(m.get("gybc_authz_redis_breaker_open", &[]), 1.0);
    wait_until(
        "redis_connected gauge drops",
        Duration::from_secs(5),
        async || scrape(&env).await.get("gybc_authz_redis_connected", &[]) == 0.0,
    )
    .await;
    // An uncached key cannot be judged: 503, never an allow.
    let d = assert_denied(
        &env.check(API_PATH, &[("x-api-key", &keys.impersonator)])
            .await,
        503,
        "unavailable",
    );
    assert!(d.headers.contains_key("retry-after"));

    // Redis comes back (empty: the key service re-seeds it).
    redis.restart();
    seed(&redis.url(), &keys.records()).await;
    wait_until("recovery", Duration::from_secs(10), async || {
        env.check(API_PATH, &[("x-api-key", &keys.impersonator)])
            .await
            .status
            .unwrap()
            .code
            == 0
    })
    .await;
    // Back on the fleet-wide limiter: key_limited (2/60 s) gets exactly 2.
    let results: Vec<i32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                env.check(API_PATH, &[("x-api-key", &keys.limited)])
                    .await
                    .status
                    .unwrap()
                    .code,
            );
        }
        v
    };
    assert_eq!(results, [0, 0, 8]);
    assert_eq!(
        redis.cli(&["EXISTS", "gybc:rl:{key_limited}"]),
        "1",
        "counted in Redis again"
    );
    wait_until(
        "redis_connected gauge back up",
        Duration::from_secs(5),
        async || scrape(&env).await.get("gybc_authz_redis_connected", &[]) == 1.0,
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn redis_killed_mid_test_fail_closed() {
    let mut redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let env = replica(&[redis.url()], false, &keys, "fail_closed").await;
    allowed(&env.check(API_PATH, &[("x-api-key", &keys.secret)]).await);
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));

    redis.kill();
    // The key is cached, but its rate limit cannot be counted: fail closed.
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &keys.secret)]).await,
        503,
        "unavailable",
    );
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &keys.unknown)]).await,
        503,
        "unavailable",
    );
    let m = scrape(&env).await;
    assert_eq!(
        m.get(
            "gybc_authz_rate_limit_fallbacks_total",
            &[("mode", "denied")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "gybc_authz_rate_limit_fallbacks_total",
            &[("mode", "local")]
        ),
        0.0
    );
    // Token traffic needs no Redis.
    allowed(&env.check(API_PATH, &[("authorization", &jwt)]).await);

    redis.restart();
    seed(&redis.url(), &keys.records()).await;
    wait_until("recovery", Duration::from_secs(10), async || {
        env.check(API_PATH, &[("x-api-key", &keys.secret)])
            .await
            .status
            .unwrap()
            .code
            == 0
    })
    .await;
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &keys.unknown)]).await,
        401,
        "invalid_api_key",
    );
    env.stop().await;
}

#[tokio::test]
async fn a_three_node_cluster_serves_keys_and_limits_across_slots() {
    let cluster = RedisCluster::start(3);
    let keys = TestKeys::generate();
    let records = keys.records();
    seed_cluster(&cluster.urls(), &records).await;
    // The records really are spread over several nodes.
    let owners: std::collections::BTreeSet<String> = records
        .iter()
        .map(|r| cluster.cli(&["CLUSTER", "KEYSLOT", &Names::new("gybc").key(&r.hash)]))
        .map(|slot| (slot.parse::<u32>().unwrap() * 3 / 16384).to_string())
        .collect();
    assert!(
        owners.len() > 1,
        "records land in more than one third of the slots"
    );

    let a = replica(&cluster.urls(), true, &keys, "fail_closed").await;
    let b = replica(&cluster.urls()[1..], true, &keys, "fail_closed").await;
    for key in [&keys.secret, &keys.impersonator] {
        allowed(&a.check(API_PATH, &[("x-api-key", key)]).await);
    }
    assert_denied(
        &a.check(API_PATH, &[("x-api-key", &keys.revoked)]).await,
        401,
        "invalid_api_key",
    );
    assert_denied(
        &a.check(API_PATH, &[("x-api-key", &keys.unknown)]).await,
        401,
        "invalid_api_key",
    );
    // One limit across both replicas, on the cluster (fail_closed: no silent local fallback).
    let codes: Vec<i32> = {
        let mut v = Vec::new();
        for env in [&a, &b, &a] {
            v.push(
                env.check(API_PATH, &[("x-api-key", &keys.limited)])
                    .await
                    .status
                    .unwrap()
                    .code,
            );
        }
        v
    };
    assert_eq!(codes, [0, 0, 8]);
    a.stop().await;
    b.stop().await;
}

/// Runs a fenced `sh` block of docs/key-store.md exactly as written, with `redis-cli` pointed at
/// the test server through a wrapper on PATH.
fn run_doc_block(redis: &RedisServer, marker: &str) {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/key-store.md")).unwrap();
    let begin = format!("<!-- layout-test:{marker}:begin -->");
    let end = format!("<!-- layout-test:{marker}:end -->");
    let block = &doc[doc
        .find(&begin)
        .unwrap_or_else(|| panic!("{begin} missing"))
        + begin.len()..doc.find(&end).unwrap()];
    let script = block
        .trim()
        .trim_start_matches("```sh")
        .trim_end_matches("```");
    let bin = redis.dir().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v redis-cli"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !real.trim().is_empty(),
        "redis-cli not found: apt-get install redis-tools"
    );
    let wrapper = bin.join("redis-cli");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} -h 127.0.0.1 -p {} \"$@\"\n",
            real.trim(),
            redis.port
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", wrapper.to_str().unwrap()])
        .status()
        .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = std::process::Command::new("bash")
        .args(["-euc", script])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "doc block {marker} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_documented_redis_cli_commands_work() {
    let redis = RedisServer::start();
    let env = replica(&[redis.url()], false, &TestKeys::generate(), "fail_open").await;
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/key-store.md")).unwrap();
    let example_key = doc
        .split("The example key (public: never use it) is `")
        .nth(1)
        .unwrap()
        .split('`')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        Names::new("gybc").key(&KeyHash::of(&example_key)),
        format!(
            "gybc:key:{}",
            doc.split("its SHA-256 is\n`")
                .nth(1)
                .unwrap()
                .split('`')
                .next()
                .unwrap()
        )
    );

    run_doc_block(&redis, "create");
    let a = allowed(
        &env.check(
            API_PATH,
            &[("x-api-key", &example_key), ("x-on-behalf-of", "user_1")],
        )
        .await,
    );
    assert_eq!(
        a.upstream,
        map(&[
            ("x-tenant-id", "tenant_acme"),
            ("x-user-id", "user_1"),
            ("x-auth-method", "api_key"),
            ("x-api-key-id", "key_example_backend"),
            ("x-scopes", "threads:read users:impersonate"),
            ("x-impersonated-by", "key_example_backend"),
        ])
    );
    assert_eq!(a.to_client["x-ratelimit-limit"], "100");

    tokio::time::sleep(Duration::from_millis(100)).await;
    run_doc_block(&redis, "revoke");
    wait_until(
        "documented revocation",
        Duration::from_secs(1),
        async || {
            env.check(API_PATH, &[("x-api-key", &example_key)])
                .await
                .status
                .unwrap()
                .code
                != 0
        },
    )
    .await;
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &example_key)]).await,
        401,
        "invalid_api_key",
    );
    env.stop().await;
}

#[tokio::test]
async fn tls_with_a_private_ca_and_a_password_from_a_file() {
    let redis = RedisServer::start_tls();
    let keys = TestKeys::generate();
    // Seed over TLS with the crate's own client, trusting the test CA.
    let certs = ::redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(support::redis::tls_fixture("ca.crt")).unwrap()),
    };
    let client = ::redis::Client::build_with_tls(redis.tls_url().as_str(), certs).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let names = Names::new("gybc");
    for r in keys.records() {
        let _: () = c.set(names.key(&r.hash), encode_record(&r)).await.unwrap();
    }
    let _: () = ::redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret-pw")
        .query_async(&mut c)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "s3cret-pw\n").unwrap();

    let env = TestEnv::start_with(EnvOptions {
        keys: Some(keys.clone()),
        key_store_yaml: Some("key_store: { type: redis }".into()),
        extra_yaml: format!(
            "redis: {{ urls: [\"{}\"], tls_ca_file: \"{}\", password_file: \"{}\" }}\nrate_limit: {{ backend: redis, failure_mode: fail_closed }}\n",
            redis.tls_url(),
            support::redis::tls_fixture("ca.crt"),
            pw.display()
        ),
        ..Default::default()
    })
    .await;
    let a = allowed(&env.check(API_PATH, &[("x-api-key", &keys.secret)]).await);
    assert_eq!(a.upstream["x-api-key-id"], "key_secret");
    assert_eq!(
        a.to_client["x-ratelimit-remaining"], "4",
        "counted in Redis over TLS (fail_closed: no local fallback)"
    );
    env.stop().await;
}
