//! Usage per key against a real `redis-server`, through the daemon's gRPC: two replicas add up
//! per key and per hour in Redis (the documented layout), read back the same by the key service
//! (another tenant's key is 404), the `keys usage` command and the shared admin code; a Redis
//! stalled and then killed changes no decision and loses no count (or counts the loss); a flood
//! of unknown keys takes no usage memory; with a key file nothing is held, only counted as
//! dropped.
//!
//! Hour buckets come from each replica's own clock (a `ManualClock` that only moves when told),
//! so the expected bucket is computed from it and no test can run across an hour boundary.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gybc_authz_engine::config::Config;
use gybc_authz_engine::store::admin::{AdminError, AdminStore, Scope};
use gybc_authz_engine::usage::Counts;
use serde_json::Value;
use support::key_service::{Backend, KeyService, Who, usage_counts};
use support::redis::{RedisServer, redis_yaml, seed};
use support::*;

/// Decisions sent, by (key id, hour start): what the usage record must say.
#[derive(Default, Debug)]
struct Expected(BTreeMap<(String, u64), Counts>);

impl Expected {
    fn add(&mut self, env: &TestEnv, key_id: &str, outcome: &str) {
        let hour = env.now() / 3600 * 3600;
        let c = self.0.entry((key_id.to_owned(), hour)).or_default();
        match outcome {
            "allowed" => c.allowed += 1,
            "rate_limited" => c.rate_limited += 1,
            "denied" => c.denied += 1,
            o => panic!("no outcome {o}"),
        }
    }

    fn of(&self, key_id: &str) -> Vec<(u64, Counts)> {
        self.0
            .iter()
            .filter(|((k, _), _)| k == key_id)
            .map(|((_, h), c)| (*h, *c))
            .collect()
    }
}

async fn replica(redis: &RedisServer, keys: &TestKeys, usage: &str) -> TestEnv {
    let mut o = redis_yaml(&[redis.url()], false, "fail_open");
    o.keys = Some(keys.clone());
    o.extra_yaml.push_str(usage);
    TestEnv::start_with(o).await
}

fn redis_config(dir: &Path, url: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!("key_store: {{ type: redis }}\nredis: {{ urls: [\"{url}\"] }}\n"),
    )
    .unwrap();
    path
}

async fn admin(url: &str) -> AdminStore {
    let cfg = Config::from_yaml(
        &format!("key_store: {{ type: redis }}\nredis: {{ urls: [\"{url}\"] }}\n"),
        &BTreeMap::new(),
    )
    .unwrap();
    AdminStore::from_config(&cfg).await.unwrap()
}

/// The fleet's series of a key over `[start, end)`, as the shared admin code reads it.
async fn series(store: &AdminStore, key_id: &str, start: u64, end: u64) -> Vec<(u64, Counts)> {
    store
        .usage(Scope::All, key_id, start, end)
        .await
        .unwrap()
        .buckets
        .into_iter()
        .map(|b| (b.hour_start, b.counts))
        .collect()
}

fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

async fn send(env: &TestEnv, key: &str, on_behalf_of: bool) -> &'static str {
    let mut h = vec![("x-api-key", key)];
    if on_behalf_of {
        h.push(("x-on-behalf-of", "user_1"));
    }
    let resp = env.check(API_PATH, &h).await;
    match resp.status.as_ref().map(|s| s.code) {
        Some(0) => "allowed",
        _ => match denied(&resp).reason.as_str() {
            "rate_limited" => "rate_limited",
            "impersonation_not_allowed" => "denied",
            "invalid_api_key" => "unknown",
            other => panic!("unexpected denial {other}"),
        },
    }
}

#[tokio::test]
async fn two_replicas_add_up_per_key_and_hour_and_every_reader_says_the_same() {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let a = replica(&redis, &keys, "usage: { flush_interval_ms: 100 }\n").await;
    let b = replica(&redis, &keys, "usage: { flush_interval_ms: 100 }\n").await;
    let mut want = Expected::default();

    // key_secret (5/60s): allowed on both, and refused twice after it was identified.
    // key_limited (2/60s, counted fleet-wide in Redis): 2 allowed, then 429s on either replica.
    // Unknown and revoked keys: refused before any key is identified, never counted.
    for (env, key, id, obo) in [
        (&a, &keys.secret, "key_secret", false),
        (&a, &keys.secret, "key_secret", false),
        (&b, &keys.secret, "key_secret", false),
        (&a, &keys.secret, "key_secret", true),
        (&b, &keys.secret, "key_secret", true),
        (&a, &keys.limited, "key_limited", false),
        (&b, &keys.limited, "key_limited", false),
        (&a, &keys.limited, "key_limited", false),
        (&b, &keys.limited, "key_limited", false),
        (&b, &keys.limited, "key_limited", false),
        (&a, &keys.unknown, "", false),
        (&b, &keys.revoked, "", false),
    ] {
        let outcome = send(env, key, obo).await;
        if id.is_empty() {
            assert_eq!(outcome, "unknown");
        } else {
            want.add(env, id, outcome);
        }
    }
    // The next hour, on both replicas' clocks.
    a.clock.advance(Duration::from_secs(3600));
    b.clock.advance(Duration::from_secs(3600));
    for env in [&a, &b] {
        let outcome = send(env, &keys.secret, false).await;
        want.add(env, "key_secret", outcome);
    }
    assert_eq!(
        want.of("key_limited")
            .iter()
            .map(|(_, c)| (c.allowed, c.rate_limited))
            .fold((0, 0), |s, c| (s.0 + c.0, s.1 + c.1)),
        (2, 3),
        "the fleet-wide limit decided: {want:?}"
    );

    let start = a.now().min(b.now()) / 3600 * 3600 - 2 * 3600;
    let end = start + 6 * 3600;
    let store = admin(&redis.url()).await;
    for id in ["key_secret", "key_limited"] {
        let expected = want.of(id);
        wait_until(
            "the flushes reach Redis",
            Duration::from_secs(5),
            async || series(&store, id, start, end).await == expected,
        )
        .await;
    }
    assert_eq!(series(&store, "key_revoked", start, end).await, []);
    assert!(
        redis.cli(&["KEYS", "gybc:usage:*"]).lines().all(|n| {
            n.starts_with("gybc:usage:{key_secret}:") || n.starts_with("gybc:usage:{key_limited}:")
        }),
        "only known keys have usage"
    );

    // The documented layout: one hash per key and UTC hour, expiring after the retention.
    let (&(_, hour), &c) = want.0.iter().find(|((k, _), _)| k == "key_secret").unwrap();
    let name = format!(
        "gybc:usage:{{key_secret}}:{}",
        rfc3339(hour)
            .chars()
            .filter(char::is_ascii_digit)
            .take(10)
            .collect::<String>()
    );
    assert_eq!(
        redis.cli(&["HGET", &name, "allowed"]),
        c.allowed.to_string()
    );
    assert_eq!(redis.cli(&["HGET", &name, "denied"]), c.denied.to_string());
    let ttl: u64 = redis.cli(&["TTL", &name]).parse().unwrap();
    assert!(
        ttl > 34 * 86_400 && ttl <= 35 * 86_400 + 2 * 3600,
        "TTL {ttl}"
    );

    // The key service: the same numbers per hour in protojson, totals; another tenant's 404.
    // It finds keys through the indexes its own writes keep (docs/key-store.md).
    for r in keys.records() {
        redis.cli(&["SET", &format!("gybc:key-id:{}", r.id), &r.hash.to_hex()]);
        redis.cli(&[
            "ZADD",
            &format!("gybc:tenant-keys:{}", r.tenant),
            "1",
            &r.id,
        ]);
    }
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), &Backend::Redis(redis.url()), &[]);
    let body = format!(
        r#"{{"id":"key_secret","startTime":"{}","endTime":"{}"}}"#,
        rfc3339(start),
        rfc3339(end)
    );
    let r = ks
        .call("get-key-usage", &Who::user(TENANT, "u1"), &body)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let buckets: Vec<(u64, Counts)> = r.body["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let t = humantime::parse_rfc3339(b["startTime"].as_str().unwrap()).unwrap();
            let t = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            (t, usage_counts(b, "rateLimited"))
        })
        .collect();
    assert_eq!(buckets, want.of("key_secret"));
    assert_eq!(r.body["total"]["allowed"], "5", "int64 as a string");
    assert_eq!(r.body["total"]["denied"], "2");
    let other = ks
        .call("get-key-usage", &Who::user(OTHER_TENANT, "u2"), &body)
        .await;
    assert_eq!(
        (other.status, other.body["reason"].as_str()),
        (404, Some("key_not_found"))
    );
    let missing = ks
        .call(
            "get-key-usage",
            &Who::user(TENANT, "u1"),
            r#"{"id":"key_nope"}"#,
        )
        .await;
    assert_eq!(missing.status, 404);
    let too_long = ks
        .call(
            "get-key-usage",
            &Who::user(TENANT, "u1"),
            r#"{"id":"key_secret","startTime":"2020-01-01T00:00:00Z"}"#,
        )
        .await;
    assert_eq!((too_long.status, too_long.field()), (400, "startTime"));

    // The CLI: the same, as a table and as JSON.
    let cfg = redis_config(dir.path(), &redis.url());
    let cli = |output: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
            .args(["keys", "usage", "key_limited", "--config"])
            .arg(&cfg)
            .args(["--since", &rfc3339(start), "--until", &rfc3339(end)])
            .args(["--output", output])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let v: Value = serde_json::from_str(&cli("json")).unwrap();
    let from_cli: Vec<(u64, Counts)> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let t = humantime::parse_rfc3339(b["start_time"].as_str().unwrap()).unwrap();
            let t = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            (t, usage_counts(b, "rate_limited"))
        })
        .collect();
    assert_eq!(from_cli, want.of("key_limited"));
    assert_eq!(v["total"]["rate_limited"], 3);
    let table = cli("text");
    let total = table.lines().find(|l| l.starts_with("TOTAL")).unwrap();
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>(),
        ["TOTAL", "2", "3", "0"]
    );

    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_stalled_then_dead_redis_changes_no_decision_and_the_counts_complete_after() {
    // Written to disk at every command, so the restarted Redis has what it had (markers too).
    let mut redis = RedisServer::start_with(&[
        "--enable-debug-command",
        "yes",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]);
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let mut o = redis_yaml(&[redis.url()], false, "fail_open");
    o.keys = Some(keys.clone());
    o.extra_yaml = o.extra_yaml.replace(
        "failure_mode: fail_open",
        "failure_mode: fail_open, default: 1000000/60s",
    );
    o.extra_yaml.push_str("usage: { flush_interval_ms: 200 }\n");
    let env = TestEnv::start_with(o).await;
    let key = keys.impersonator.as_str();
    let mut sent = 0u64;
    let mut burst = async |n: usize, what: &str| {
        for _ in 0..n {
            let resp = env.check(API_PATH, &[("x-api-key", key)]).await;
            assert_eq!(
                resp.status.as_ref().map(|s| s.code),
                Some(0),
                "{what}: a cached key is allowed whatever Redis does: {resp:?}"
            );
            sent += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    burst(20, "before").await;

    // Stalled: commands sent now are answered (and applied) only when the sleep ends, after
    // the replica has given up on them.
    let port = redis.port;
    let stall = std::thread::spawn(move || {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["DEBUG", "SLEEP", "2"])
            .output()
            .expect("redis-cli runs")
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    burst(40, "stalled").await;
    assert!(stall.join().unwrap().status.success());

    // Dead.
    redis.kill();
    burst(40, "down").await;

    // Back, with its data: the held counts are written, the ones already applied not twice.
    redis.restart();
    let store = admin(&redis.url()).await;
    let now = env.now();
    let (start, end) = (now / 3600 * 3600, now / 3600 * 3600 + 3600);
    let mut written = 0;
    let mut dropped = 0.0;
    wait_until(
        "the counts are complete, or the loss is counted",
        Duration::from_secs(15),
        async || {
            let m = scrape(&env).await;
            dropped = ["key_cap", "held_full", "expired"]
                .iter()
                .map(|r| m.get("gybc_authz_usage_dropped_total", &[("reason", r)]))
                .sum::<f64>();
            written = series(&store, "key_impersonator", start, end)
                .await
                .iter()
                .map(|(_, c)| c.total())
                .sum::<u64>();
            m.get("gybc_authz_usage_entries", &[]) == 0.0 && written + dropped as u64 == sent
        },
    )
    .await;
    assert_eq!(
        written + dropped as u64,
        sent,
        "in Redis plus counted as lost is what was decided"
    );
    assert_eq!(dropped, 0.0, "nothing had to be given up in this outage");
    let m = scrape(&env).await;
    assert!(m.get("gybc_authz_usage_flushes_total", &[("result", "failed")]) > 0.0);
    env.stop().await;
}

#[tokio::test]
async fn a_flood_of_unknown_keys_takes_no_usage_memory() {
    let mut redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    let env = replica(&redis, &keys, "usage: { flush_interval_ms: 100 }\n").await;
    for _ in 0..2_000 {
        let unknown = gybc_authz_engine::authn::apikey::ApiKey::generate(
            gybc_authz_engine::authn::apikey::KeyKind::Secret,
        );
        let d = denied(&env.check(API_PATH, &[("x-api-key", &unknown)]).await);
        assert_eq!(d.reason, "invalid_api_key");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = scrape(&env).await;
    assert_eq!(m.get("gybc_authz_usage_entries", &[]), 0.0);
    assert_eq!(
        m.get("gybc_authz_usage_dropped_total", &[("reason", "key_cap")]),
        0.0,
        "not counted at all, so nothing refused either"
    );
    // A known key does take an entry, held while Redis cannot be written: the gauge is live.
    let known = [("x-api-key", env.keys.secret.as_str())];
    allowed(&env.check(API_PATH, &known).await);
    redis.kill();
    allowed(&env.check(API_PATH, &known).await);
    wait_until(
        "the known key is held",
        Duration::from_secs(5),
        async || scrape(&env).await.get("gybc_authz_usage_entries", &[]) == 1.0,
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn with_a_key_file_no_usage_is_held_and_the_readers_say_why() {
    let env = TestEnv::start().await;
    allowed(
        &env.check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await,
    );
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), &Backend::File(env.key_file.clone()), &[]);
    let r = ks
        .call(
            "get-key-usage",
            &Who::user(TENANT, "u1"),
            r#"{"id":"key_secret"}"#,
        )
        .await;
    assert_eq!(
        (r.status, r.body["reason"].as_str()),
        (501, Some("usage_needs_redis")),
        "{}",
        r.text
    );
    assert!(r.body["message"].as_str().unwrap().contains("key_store"));
    // Tenant isolation comes first: another tenant's key is still not found.
    let other = ks
        .call(
            "get-key-usage",
            &Who::user(OTHER_TENANT, "u2"),
            r#"{"id":"key_secret"}"#,
        )
        .await;
    assert_eq!(other.status, 404);

    let cfg = Config::from_yaml(
        &format!(
            "key_store: {{ type: file, path: \"{}\" }}\n",
            env.key_file.display()
        ),
        &BTreeMap::new(),
    )
    .unwrap();
    let store = AdminStore::from_config(&cfg).await.unwrap();
    assert!(matches!(
        store.usage(Scope::All, "key_secret", 0, 3600).await,
        Err(AdminError::NoUsage)
    ));
    // Nothing is held in the replica either: the decision is counted as dropped, and only that.
    wait_until("counted as dropped", Duration::from_secs(3), async || {
        scrape(&env)
            .await
            .get("gybc_authz_usage_dropped_total", &[("reason", "no_redis")])
            == 1.0
    })
    .await;
    let m = scrape(&env).await;
    assert_eq!(m.get("gybc_authz_usage_entries", &[]), 0.0);
    env.stop().await;
}

#[tokio::test]
async fn a_replica_that_stops_writes_the_counts_it_has_not_flushed_yet() {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    // A flush interval far longer than the test: only the shutdown can write these counts.
    let a = replica(&redis, &keys, "usage: { flush_interval_ms: 60000 }\n").await;
    let mut want = Expected::default();
    for _ in 0..3 {
        let outcome = send(&a, &keys.secret, false).await;
        want.add(&a, "key_secret", outcome);
    }
    let start = a.now() / 3600 * 3600;
    let store = admin(&redis.url()).await;
    assert_eq!(
        series(&store, "key_secret", start, start + 3600).await,
        vec![],
        "nothing is written before the interval ends"
    );
    a.stop().await;
    assert_eq!(
        series(&store, "key_secret", start, start + 3600).await,
        want.of("key_secret"),
        "the stopping replica wrote what it had counted"
    );
}
