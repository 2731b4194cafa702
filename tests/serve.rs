//! The daemon as operators run it: health and readiness, the gRPC health service, key file
//! reloads, and `check-config`.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use gybc_authz::dev::SigningKey;
use support::*;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> u16 {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn grpc_health(addr: std::net::SocketAddr) -> (i32, i32) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = HealthClient::new(channel);
    let status = |service: &str| {
        let req = HealthCheckRequest {
            service: service.into(),
        };
        let mut c = c.clone();
        async move { c.check(req).await.unwrap().into_inner().status }
    };
    let named = status("envoy.service.auth.v3.Authorization").await;
    let whole = status("").await;
    let _ = &mut c;
    (named, whole)
}

#[tokio::test]
async fn readiness_waits_for_every_providers_keys_and_drops_on_shutdown() {
    let keys = KeyServer::start(SigningKey::jwks(&[&signing_key("dashboard-1")])).await;
    keys.set_failing(true);
    let cfg = gybc_authz_engine::config::Config::from_yaml(
        &format!(
            "server: {{ grpc_addr: \"127.0.0.1:0\", http_addr: \"127.0.0.1:0\" }}\njwt:\n  providers:\n    - {{ name: d, project_id: {PROJECT}, keys: {{ type: url, url: \"{}\" }} }}\n",
            keys.url()
        ),
        &BTreeMap::new(),
    )
    .unwrap();
    let running = gybc_authz::app::start(cfg, Default::default())
        .await
        .unwrap();
    let (grpc, http) = (running.grpc_addr, running.http_addr);
    assert_eq!(
        http_get(http, "/healthz").await,
        200,
        "alive while keys are missing"
    );
    assert_eq!(
        http_get(http, "/readyz").await,
        503,
        "not ready without signing keys"
    );
    assert_eq!(
        grpc_health(grpc).await,
        (
            ServingStatus::NotServing as i32,
            ServingStatus::NotServing as i32
        )
    );

    keys.set_failing(false);
    assert!(
        running.wait_ready(Duration::from_secs(5)).await,
        "ready once the endpoint answers"
    );
    assert_eq!(http_get(http, "/readyz").await, 200);
    assert_eq!(
        grpc_health(grpc).await,
        (ServingStatus::Serving as i32, ServingStatus::Serving as i32)
    );

    let ready = running.ready.clone();
    running.shutdown().await;
    assert!(!ready.is_ready(), "draining is not ready");
    assert_eq!(
        http_get(http, "/healthz").await,
        0,
        "HTTP port closed after shutdown"
    );
    assert!(
        tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .is_err(),
        "gRPC port closed after shutdown"
    );
}

#[tokio::test]
async fn key_file_changes_apply_without_restart() {
    let env = TestEnv::start().await;
    let added = gybc_authz_engine::authn::apikey::ApiKey::generate(
        gybc_authz_engine::authn::apikey::KeyKind::Secret,
    );
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &added)]).await,
        401,
        "invalid_api_key",
    );
    allowed(
        &env.check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await,
    );

    // Add a key and revoke another, written atomically as a ConfigMap update would.
    let old = std::fs::read_to_string(&env.key_file).unwrap();
    let new = old.replace(
        "scopes: [threads:read], rate_limit: 5/60s, name: backend",
        "scopes: [threads:read], rate_limit: 5/60s, name: backend, status: revoked",
    ) + &format!(
        "  - {{ id: key_added, hash: \"sha256:{}\", kind: secret, tenant: {OTHER_TENANT} }}\n",
        gybc_authz_engine::authn::apikey::KeyHash::of(&added).to_hex()
    );
    let tmp = env.dir.path().join("keys.yaml.tmp");
    std::fs::write(&tmp, new).unwrap();
    std::fs::rename(&tmp, &env.key_file).unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let added_ok = env
            .check(API_PATH, &[("x-api-key", &added)])
            .await
            .status
            .unwrap()
            .code
            == 0;
        let revoked = env
            .check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await
            .status
            .unwrap()
            .code
            != 0;
        if added_ok && revoked {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "reload not applied within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = allowed(&env.check(API_PATH, &[("x-api-key", &added)]).await);
    assert_eq!(a.upstream["x-tenant-id"], OTHER_TENANT);
    assert_denied(
        &env.check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await,
        401,
        "invalid_api_key",
    );

    // A broken edit keeps the last good keys serving.
    std::fs::write(&tmp, "keys: [ {oops").unwrap();
    std::fs::rename(&tmp, &env.key_file).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    allowed(&env.check(API_PATH, &[("x-api-key", &added)]).await);
    env.stop().await;
}

#[test]
fn check_config_accepts_the_shipped_example_and_lists_every_error() {
    let exe = env!("CARGO_BIN_EXE_gybc-authz");
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(exe)
        .args([
            "check-config",
            &format!("{root}/deploy/config.example.yaml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "example config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "jwt:\n  leeway_secs: 9000\n  default_provider: ghost\npolicy:\n  tenantless_paths: [relative]\n").unwrap();
    let out = Command::new(exe)
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "jwt.leeway_secs",
        "jwt.default_provider",
        "policy.tenantless_paths[0]",
    ] {
        assert!(err.contains(path), "{path} missing from: {err}");
    }

    let out = Command::new(exe)
        .args(["check-config", "/nonexistent.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(exe)
        .args(["serve", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "serve refuses a bad config before binding anything"
    );
}
