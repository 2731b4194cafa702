//! Usage per key through the real Envoy, in both modes: two replicas (each an Envoy with the
//! engine behind it or inside it) share a real Redis; a known number of allowed, 429 and denied
//! requests per key, over both replicas and two hours; after a flush the key service's
//! `get-key-usage` and the `keys usage` command return exactly those numbers, per key and per
//! hour bucket; another tenant's key is 404.
//!
//! Hour buckets come from each replica's engine clock (the test's `ManualClock`, which only moves
//! when told; the module's starts at the same time and moves with it), so no run can straddle an
//! hour boundary unnoticed: the expected bucket is computed from that clock.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use gybc_authz_engine::usage::Counts;
use serde_json::Value;
use support::envoy::*;
use support::key_service::{Backend, KeyService, Who, usage_counts};
use support::redis::{RedisServer, redis_yaml, seed};
use support::*;

both_modes!(known_decisions_add_up_exactly_per_key_and_hour_over_two_replicas);

fn rfc3339(t: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

fn secs(t: &str) -> u64 {
    humantime::parse_rfc3339(t)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn known_decisions_add_up_exactly_per_key_and_hour_over_two_replicas(mode: Mode) {
    let redis = RedisServer::start();
    let keys = TestKeys::generate();
    seed(&redis.url(), &keys.records()).await;
    // The key service finds keys through the indexes its own writes keep.
    for r in keys.records() {
        redis.cli(&["SET", &format!("gybc:key-id:{}", r.id), &r.hash.to_hex()]);
        redis.cli(&[
            "ZADD",
            &format!("gybc:tenant-keys:{}", r.tenant),
            "1",
            &r.id,
        ]);
    }
    let opts = || {
        let mut o = redis_yaml(&[redis.url()], false, "fail_open");
        o.keys = Some(keys.clone());
        o.extra_yaml.push_str("usage: { flush_interval_ms: 200 }\n");
        o
    };
    let a = Stack::start_with(mode, opts()).await;
    let b = Stack::start_with(mode, opts()).await;

    // (key id, hour start) → decisions, from each replica's clock at the time.
    let mut want: BTreeMap<(&str, u64), Counts> = BTreeMap::new();
    let hour = |s: &Stack| s.env.now() / 3600 * 3600;
    let unknown = keys.unknown.clone();
    for round in 0..2 {
        for (s, key, id, obo) in [
            (&a, &keys.secret, "key_secret", false),
            (&b, &keys.secret, "key_secret", false),
            (&a, &keys.secret, "key_secret", true),
            (&b, &keys.limited, "key_limited", false),
            (&a, &keys.limited, "key_limited", false),
            (&b, &keys.limited, "key_limited", false),
            (&a, &keys.publishable, "key_app", false),
            (&b, &unknown, "", false),
        ] {
            let mut h = vec![("x-api-key", key.as_str())];
            if obo {
                h.push(("x-on-behalf-of", "user_1"));
            }
            let r = s.post(API_PATH, &h).await;
            let c = want.entry((id, hour(s))).or_default();
            match (id, r.status) {
                ("", _) => {
                    r.denied(401, "invalid_api_key");
                }
                (_, 200) => c.allowed += 1,
                (_, 429) => {
                    r.denied(429, "rate_limited");
                    c.rate_limited += 1;
                }
                (_, 403) => {
                    r.denied(403, "impersonation_not_allowed");
                    c.denied += 1;
                }
                // A publishable key without its user's token: refused once the key is known.
                (_, 401) => {
                    r.denied(401, "user_token_required");
                    c.denied += 1;
                }
                (_, s) => panic!("unexpected {s}: {r:?}"),
            }
        }
        if round == 0 {
            // The next hour, on both replicas' engines.
            a.advance(Duration::from_secs(3600));
            b.advance(Duration::from_secs(3600));
        }
    }
    want.retain(|(id, _), _| !id.is_empty());
    let limited: Counts = want
        .iter()
        .filter(|((id, _), _)| *id == "key_limited")
        .fold(Counts::default(), |mut t, (_, c)| {
            t.add(*c);
            t
        });
    assert_eq!(
        (limited.allowed, limited.rate_limited),
        (2, 4),
        "2/60s over the fleet"
    );
    let expected = |id: &str| -> Vec<(u64, Counts)> {
        want.iter()
            .filter(|((k, _), _)| *k == id)
            .map(|((_, h), c)| (*h, *c))
            .collect()
    };

    let start = hour(&a).min(hour(&b)) - 3 * 3600;
    let end = start + 6 * 3600;
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyService::start(dir.path(), &Backend::Redis(redis.url()), &[]);
    let usage = async |who: &Who, id: &str| {
        let body = format!(
            r#"{{"id":"{id}","startTime":"{}","endTime":"{}"}}"#,
            rfc3339(start),
            rfc3339(end)
        );
        ks.call("get-key-usage", who, &body).await
    };
    let user = Who::user(TENANT, "u1");
    for id in ["key_secret", "key_limited", "key_app"] {
        let want = expected(id);
        let mut last = Value::Null;
        wait_until(
            "the replicas' flushes add up in Redis",
            Duration::from_secs(5),
            async || {
                let r = usage(&user, id).await;
                assert_eq!(r.status, 200, "{}", r.text);
                // protojson leaves an empty list out: before the first flush, no `buckets`.
                let got: Vec<(u64, Counts)> = r.body["buckets"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .map(|b| {
                        (
                            secs(b["startTime"].as_str().unwrap()),
                            usage_counts(b, "rateLimited"),
                        )
                    })
                    .collect();
                last = r.body;
                got == want
            },
        )
        .await;
        assert_eq!(last["id"], id);
        let mut total = Counts::default();
        for (_, c) in &want {
            total.add(*c);
        }
        assert_eq!(usage_counts(&last["total"], "rateLimited"), total, "{last}");

        // The CLI reads the same.
        let cfg = dir.path().join("cli.yaml");
        std::fs::write(
            &cfg,
            format!(
                "key_store: {{ type: redis }}\nredis: {{ urls: [\"{}\"] }}\n",
                redis.url()
            ),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
            .args(["keys", "usage", id, "--output", "json", "--config"])
            .arg(&cfg)
            .args(["--since", &rfc3339(start), "--until", &rfc3339(end)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let from_cli: Vec<(u64, Counts)> = v["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    secs(b["start_time"].as_str().unwrap()),
                    usage_counts(b, "rate_limited"),
                )
            })
            .collect();
        assert_eq!(from_cli, expected(id), "keys usage {id}");
        assert_eq!(usage_counts(&v["total"], "rate_limited"), total);
    }

    // Another tenant's users cannot read it: 404, as for a key that does not exist.
    let r = usage(&Who::user(OTHER_TENANT, "u2"), "key_secret").await;
    assert_eq!(
        (r.status, r.body["reason"].as_str()),
        (404, Some("key_not_found"))
    );
    // Nothing was recorded for the unknown key.
    assert!(redis.cli(&["KEYS", "gybc:usage:*"]).lines().all(|n| {
        ["{key_secret}", "{key_limited}", "{key_app}"]
            .iter()
            .any(|k| n.contains(k))
    }),);
    a.stop().await;
    b.stop().await;
}
