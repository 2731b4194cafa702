//! `gybc-authz keys …` end to end: every command against a file store, a real redis-server, a
//! healthy 6-node Redis Cluster and a Sentinel setup, each on the first try as a user runs it;
//! keys it creates authenticate through the daemon, revocation and rotation take effect, and
//! concurrent creates on one file lose nothing.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use support::redis::{MASTER_NAME, RedisCluster, RedisServer, SentinelSet, yaml_list};
use support::*;

fn keys(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
        .arg("keys")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("the binary runs")
}

#[track_caller]
fn json_ok(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn file_config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "key_store: {{ type: file, path: \"{}\" }}\njwt:\n  providers:\n    - {{ name: endusers, project_id: {APP_PROJECT} }}\n",
            dir.join("keys.yaml").display()
        ),
    )
    .unwrap();
    cfg
}

fn redis_config(dir: &Path, url: &str) -> std::path::PathBuf {
    redis_section_config(dir, &format!("redis: {{ urls: [\"{url}\"] }}"))
}

/// A config with the Redis key store and this `redis:` section.
fn redis_section_config(dir: &Path, redis_yaml: &str) -> std::path::PathBuf {
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!("key_store: {{ type: redis }}\n{redis_yaml}\njwt:\n  providers:\n    - {{ name: endusers, project_id: {APP_PROJECT} }}\n"),
    )
    .unwrap();
    cfg
}

/// `usage` for every key `list` shows: answered, and with the hours of the range.
fn usage_of_every_key(cfg: &Path) {
    let listed = json_ok(&keys(cfg, &["list", "--output", "json"]));
    let ids: Vec<&str> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert!(!ids.is_empty());
    for id in ids {
        let used = json_ok(&keys(
            cfg,
            &["usage", id, "--since", "2h", "--output", "json"],
        ));
        assert_eq!(used["id"], id);
        assert!(used["total"]["allowed"].is_u64(), "{used}");
    }
}

/// A daemon whose key store is the one the CLI writes.
async fn daemon_over(key_store_yaml: String, extra_yaml: String) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        key_store_yaml: Some(key_store_yaml),
        extra_yaml,
        ..Default::default()
    })
    .await
}

/// The command sequence every store must support.
async fn exercise(cfg: &Path, env: &TestEnv) {
    // create: the key is printed once, with its record.
    let created = json_ok(&keys(
        cfg,
        &[
            "create",
            "--tenant",
            TENANT,
            "--kind",
            "secret",
            "--scope",
            "users:impersonate",
            "--rate-limit",
            "3/60s",
            "--name",
            "backend",
            "--output",
            "json",
        ],
    ));
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["record"]["id"].as_str().unwrap().to_owned();
    assert!(
        key.starts_with("sk_") && gybc_authz_engine::authn::apikey::ApiKey::parse(&key).is_ok()
    );
    assert_eq!(created["record"]["rate_limit"], "3/60s");

    // Text mode prints just the key on stdout, the rest on stderr.
    let text = keys(
        cfg,
        &[
            "create",
            "--tenant",
            OTHER_TENANT,
            "--kind",
            "publishable",
            "--allowed-origin",
            APP_ORIGIN,
            "--jwt-provider",
            "endusers",
        ],
    );
    assert!(
        text.status.success(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    let pk = String::from_utf8(text.stdout).unwrap().trim().to_owned();
    assert!(pk.starts_with("pk_") && !pk.contains(' '));
    assert!(String::from_utf8_lossy(&text.stderr).contains("shown only now"));

    // The key authenticates through the daemon.
    let a = allowed(
        &env.check(API_PATH, &[("x-api-key", &key), ("x-on-behalf-of", "u7")])
            .await,
    );
    assert_eq!(a.upstream["x-api-key-id"], id);
    assert_eq!(a.upstream["x-tenant-id"], TENANT);
    assert_eq!(a.to_client["x-ratelimit-limit"], "3");

    // list / show never print a key or a whole hash.
    let listed = keys(cfg, &["list"]);
    let listed_json = json_ok(&keys(cfg, &["list", "--output", "json"]));
    let shown = keys(cfg, &["show", &id]);
    let shown_json = json_ok(&keys(cfg, &["show", &id, "--output", "json"]));
    let full_hash = gybc_authz_engine::authn::apikey::KeyHash::of(&key).to_hex();
    for out in [
        &listed.stdout,
        &shown.stdout,
        &listed_json.to_string().into_bytes(),
        &shown_json.to_string().into_bytes(),
    ] {
        let text = String::from_utf8_lossy(out);
        assert!(
            !text.contains(&key) && !text.contains(&pk) && !text.contains(&full_hash),
            "{text}"
        );
    }
    assert_eq!(listed_json["keys"].as_array().unwrap().len(), 2);
    assert_eq!(shown_json["name"], "backend");
    assert_eq!(shown_json["hash_prefix"], full_hash[..8]);
    let only_other = json_ok(&keys(
        cfg,
        &["list", "--tenant", OTHER_TENANT, "--output", "json"],
    ));
    assert_eq!(only_other["keys"].as_array().unwrap().len(), 1);
    assert_eq!(only_other["keys"][0]["kind"], "publishable");
    assert_eq!(only_other["keys"][0]["allowed_origins"][0], APP_ORIGIN);

    // rotate: the new key works, and the old one during the grace period only.
    let rotated = json_ok(&keys(
        cfg,
        &["rotate", &id, "--grace", "1h", "--output", "json"],
    ));
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, key);
    assert_eq!(rotated["record"]["scopes"][0], "users:impersonate");
    assert_eq!(rotated["record"]["rate_limit"], "3/60s");
    let new_id = rotated["record"]["id"].as_str().unwrap().to_owned();
    wait_until("rotated key usable", Duration::from_secs(3), async || {
        env.check(API_PATH, &[("x-api-key", &new_key)])
            .await
            .status
            .unwrap()
            .code
            == 0
    })
    .await;
    // The old key: the daemon re-reads its record (file reload / event), still inside the grace.
    tokio::time::sleep(Duration::from_millis(200)).await;
    allowed(&env.check(API_PATH, &[("x-api-key", &key)]).await);
    // Past the grace period (the daemon's injected clock): refused.
    env.clock.advance(Duration::from_secs(3600 + 1));
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &key)]).await,
        401,
        "invalid_api_key",
    );
    allowed(&env.check(API_PATH, &[("x-api-key", &new_key)]).await);

    // revoke: refused right after.
    let revoked = json_ok(&keys(cfg, &["revoke", &new_id, "--output", "json"]));
    assert_eq!(revoked["revoked"]["status"], "revoked");
    wait_until("revocation applied", Duration::from_secs(1), async || {
        env.check(API_PATH, &[("x-api-key", &new_key)])
            .await
            .status
            .unwrap()
            .code
            != 0
    })
    .await;
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &new_key)]).await,
        401,
        "invalid_api_key",
    );

    // Errors: unknown id, bad input, bad config, each with its exit code and no partial write.
    let before = json_ok(&keys(cfg, &["list", "--output", "json"]));
    let out = keys(cfg, &["revoke", "key_nope", "--output", "json"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["exit_code"],
        3
    );
    assert_eq!(keys(cfg, &["show", "key_nope"]).status.code(), Some(3));
    assert_eq!(
        keys(cfg, &["rotate", &new_id]).status.code(),
        Some(65),
        "a revoked key is not rotated"
    );
    assert_eq!(
        keys(
            cfg,
            &[
                "create",
                "--tenant",
                "t",
                "--kind",
                "secret",
                "--rate-limit",
                "lots"
            ]
        )
        .status
        .code(),
        Some(2)
    );
    assert_eq!(
        keys(
            cfg,
            &[
                "create",
                "--tenant",
                "t",
                "--kind",
                "secret",
                "--expires",
                "soon"
            ]
        )
        .status
        .code(),
        Some(2)
    );
    assert_eq!(
        keys(
            cfg,
            &[
                "create",
                "--tenant",
                "t",
                "--kind",
                "secret",
                "--allowed-origin",
                "https://x"
            ]
        )
        .status
        .code(),
        Some(65)
    );
    assert_eq!(
        keys(cfg, &["create", "--tenant", "", "--kind", "secret"])
            .status
            .code(),
        Some(65)
    );
    let after = json_ok(&keys(cfg, &["list", "--output", "json"]));
    assert_eq!(before, after, "failed commands write nothing");
}

#[tokio::test]
async fn every_command_against_a_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_config(dir.path());
    // The daemon refuses to start on a missing key file: start it on an empty one.
    std::fs::write(dir.path().join("keys.yaml"), "keys: []\n").unwrap();
    let env = daemon_over(
        format!(
            "key_store: {{ type: file, path: \"{}\", reload_interval_ms: 20 }}",
            dir.path().join("keys.yaml").display()
        ),
        String::new(),
    )
    .await;
    exercise(&cfg, &env).await;
    assert_eq!(
        keys(
            &cfg,
            &[
                "create",
                "--tenant",
                "t",
                "--kind",
                "publishable",
                "--jwt-provider",
                "ghost"
            ]
        )
        .status
        .code(),
        Some(65),
        "an unknown provider is refused"
    );
    env.stop().await;
}

#[tokio::test]
async fn every_command_against_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = redis_config(dir.path(), &redis.url());
    let env = daemon_over(
        "key_store: { type: redis }".into(),
        format!("redis: {{ urls: [\"{}\"] }}\n", redis.url()),
    )
    .await;
    exercise(&cfg, &env).await;
    env.stop().await;

    // The store unreachable: a clear error and its own exit code.
    let dead = dir.path().join("dead.yaml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(&dead, format!("key_store: {{ type: redis }}\nredis: {{ urls: [\"redis://127.0.0.1:{port}\"], connect_timeout_ms: 200 }}\n")).unwrap();
    let out = keys(&dead, &["list"]);
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
    // A bad config file.
    std::fs::write(&dead, "key_store: { type: redis }\n").unwrap();
    assert_eq!(keys(&dead, &["list"]).status.code(), Some(64));
}

/// Every command, then `usage` for every key, with this `redis:` section, over a daemon on it.
async fn every_command_with(redis_yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = redis_section_config(dir.path(), redis_yaml);
    let env = daemon_over(
        "key_store: { type: redis }".into(),
        format!("{redis_yaml}\n"),
    )
    .await;
    exercise(&cfg, &env).await;
    usage_of_every_key(&cfg);
    env.stop().await;
}

/// Against a healthy cluster of 3 primaries and 3 replicas, every command works on the first try
/// (each is run once and must succeed): the CLI waits for the cluster connection to be set up
/// before it checks that Redis answers, instead of finding it not connected yet.
#[tokio::test]
async fn every_command_against_a_redis_cluster_on_the_first_try() {
    let cluster = RedisCluster::start_with_replicas(3, 1, 2000);
    every_command_with(&format!(
        "redis: {{ urls: [{}], cluster: true }}",
        yaml_list(&cluster.urls())
    ))
    .await;
}

/// The same through three sentinels: the CLI asks them for the primary.
#[tokio::test]
async fn every_command_through_redis_sentinels() {
    let set = SentinelSet::start();
    every_command_with(&format!(
        "redis: {{ sentinel: {{ master_name: {MASTER_NAME}, urls: [{}] }} }}",
        yaml_list(&set.urls())
    ))
    .await;
}

#[test]
fn concurrent_creates_on_one_file_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_config(dir.path());
    let children: Vec<_> = (0..16)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_gybc-authz"))
                .args([
                    "keys",
                    "--config",
                    cfg.to_str().unwrap(),
                    "create",
                    "--tenant",
                    &format!("tenant{i}"),
                    "--kind",
                    "secret",
                    "--output",
                    "json",
                ])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut made = std::collections::BTreeSet::new();
    for c in children {
        let v = json_ok(&c.wait_with_output().unwrap());
        made.insert(v["record"]["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(made.len(), 16);
    let listed = json_ok(&keys(&cfg, &["list", "--output", "json"]));
    let ids: std::collections::BTreeSet<String> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, made, "every concurrently created key is in the file");
    // The file is whole and loads in the daemon's own parser.
    assert_eq!(
        gybc_authz_engine::store::FileStore::open(&dir.path().join("keys.yaml"))
            .unwrap()
            .len(),
        16
    );
}

#[tokio::test]
async fn junk_keys_cost_no_lookup() {
    let env = TestEnv::start().await;
    let before = scrape(&env).await;
    for junk in [
        "sk_",
        "sk_0123456789abcdefghij0123456789abcdef",
        "pk_!!",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    ] {
        assert_denied(
            &env.check(API_PATH, &[("x-api-key", junk)]).await,
            401,
            "invalid_api_key",
        );
    }
    let after = scrape(&env).await;
    for result in ["found", "not_found", "error"] {
        let series = [("store", "file"), ("result", result)];
        assert_eq!(
            after.get("gybc_authz_key_lookups_total", &series),
            before.get("gybc_authz_key_lookups_total", &series),
            "{result}"
        );
    }
    // The file store is its own index: no cache in front of it to fill.
    assert_eq!(env.daemon.as_ref().unwrap().keys.cached_entries(), None);
    env.stop().await;
}
