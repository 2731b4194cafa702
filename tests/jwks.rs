//! Signing-key behaviour: rotation through an unknown kid, outages after the first load, bounded
//! refetch storms, background refresh per max-age, and Google's X.509 certificate map.

mod support;

use std::time::Duration;

use gybc_authz::dev::{SigningKey, firebase_claims};
use gybc_authz_engine::clock::{Clock, SystemClock};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use support::*;

/// The test config's unknown-kid refetch interval, plus margin: a fetch at start counts too.
async fn past_refetch_interval() {
    tokio::time::sleep(Duration::from_millis(350)).await;
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_through_its_unknown_kid() {
    let env = TestEnv::start().await;
    let old = signing_key("dashboard-1");
    let new = signing_key("dashboard-2");
    let claims = env.claims("u1", Some(TENANT));
    let before = env.dashboard_keys.fetches();

    // Google publishes the new key beside the old one; a token signed with it arrives.
    env.dashboard_keys.set_body(SigningKey::jwks(&[&old, &new]));
    past_refetch_interval().await;
    let a = allowed(
        &env.check(API_PATH, &[("authorization", &bearer(&new.sign(&claims)))])
            .await,
    );
    assert_eq!(a.upstream["x-user-id"], "u1");
    assert_eq!(
        env.dashboard_keys.fetches(),
        before + 1,
        "one fetch for the unknown kid"
    );
    // Both keys verify now without further fetches.
    allowed(
        &env.check(API_PATH, &[("authorization", &bearer(&old.sign(&claims)))])
            .await,
    );
    allowed(
        &env.check(
            API_PATH,
            &[(
                "authorization",
                &bearer(&new.sign(&env.claims("u2", Some(TENANT)))),
            )],
        )
        .await,
    );
    assert_eq!(env.dashboard_keys.fetches(), before + 1);
    env.stop().await;
}

#[tokio::test]
async fn the_endpoint_going_down_after_the_first_load_keeps_tokens_verifying() {
    let env = TestEnv::start().await;
    env.dashboard_keys.set_failing(true);
    past_refetch_interval().await;
    // A refetch is forced (unknown kid) and fails...
    let before = env.dashboard_keys.fetches();
    let rogue = signing_key("rogue-2");
    assert_denied(
        &env.check(
            API_PATH,
            &[(
                "authorization",
                &bearer(&rogue.sign(&env.claims("u", Some(TENANT)))),
            )],
        )
        .await,
        401,
        "invalid_token",
    );
    assert_eq!(env.dashboard_keys.fetches(), before + 1);
    // ...and the last good set keeps serving fresh tokens (not only cached ones).
    for i in 0..3 {
        let t = env.sign(&env.claims(&format!("user{i}"), Some(TENANT)));
        allowed(&env.check(API_PATH, &[("authorization", &bearer(&t))]).await);
    }
    env.stop().await;
}

#[tokio::test]
async fn keys_are_refreshed_in_the_background_per_max_age_and_failures_keep_the_last_set() {
    // The endpoint says max-age=1; the floor is lowered to 1 s so the test runs in seconds.
    let server = KeyServer::start(SigningKey::jwks(&[&signing_key("dashboard-1")])).await;
    server.set_max_age(Some(1));
    let cfg = gybc_authz_engine::config::Config::from_yaml(
        &format!(
            "server: {{ grpc_addr: \"127.0.0.1:0\", http_addr: \"127.0.0.1:0\" }}\njwt:\n  keys_min_refresh_secs: 1\n  keys_refresh_secs: 1\n  providers:\n    - {{ name: d, project_id: {PROJECT}, keys: {{ type: url, url: \"{}\" }} }}\n",
            server.url()
        ),
        &std::collections::BTreeMap::new(),
    )
    .unwrap();
    let running = gybc_authz::app::start(cfg, Default::default())
        .await
        .unwrap();
    assert!(running.wait_ready(Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let refreshed = server.fetches();
    assert!(
        refreshed >= 3,
        "initial load + refreshes every ~0.75 s (floored to 1 s): {refreshed}"
    );

    // Rotation through the background refresh alone: no unknown-kid request needed.
    let next = signing_key("dashboard-3");
    server.set_body(SigningKey::jwks(&[&next]));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let verifier = running.jwt.clone();
    let claims =
        |sub: &str| firebase_claims(PROJECT, sub, Some(TENANT), SystemClock.now_secs(), 600);
    assert!(
        verifier.verify(0, &next.sign(&claims("u1"))).await.is_ok(),
        "new key loaded by the refresher"
    );

    // Now the endpoint fails; retries happen, and the last good set keeps verifying.
    server.set_failing(true);
    let during = server.fetches();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(server.fetches() > during, "the refresher keeps retrying");
    assert!(
        verifier.verify(0, &next.sign(&claims("u2"))).await.is_ok(),
        "last good set after failures"
    );
    assert_eq!(verifier.providers()[0].jwks.key_count(), 1);
    running.shutdown().await;
}

#[tokio::test]
async fn refetch_storms_from_unknown_kids_are_bounded() {
    let env = TestEnv::start().await;
    let claims = env.claims("u1", Some(TENANT));
    past_refetch_interval().await;
    let before = env.dashboard_keys.fetches();
    // 200 requests with 200 different unknown kids, all at once.
    let rogue = signing_key("rogue-3");
    let tokens: Vec<String> = (0..200)
        .map(|i| rogue.sign_as(Some(&format!("kid-{i}")), &claims))
        .collect();
    let checks = tokens.iter().map(|t| {
        let auth = bearer(t);
        let env = &env;
        async move { env.check(API_PATH, &[("authorization", &auth)]).await }
    });
    for r in futures_util::future::join_all(checks).await {
        assert_denied(&r, 401, "invalid_token");
    }
    let storm = env.dashboard_keys.fetches() - before;
    assert_eq!(
        storm, 1,
        "one fetch per refetch interval (300 ms in tests), not one per request"
    );

    // After the interval, one more is allowed; not more.
    tokio::time::sleep(Duration::from_millis(350)).await;
    for t in tokens.iter().take(50) {
        assert_denied(
            &env.check(API_PATH, &[("authorization", &bearer(t))]).await,
            401,
            "invalid_token",
        );
    }
    assert_eq!(env.dashboard_keys.fetches() - before, 2);
    env.stop().await;
}

#[tokio::test]
async fn googles_x509_certificate_map_is_accepted() {
    let cert = include_str!("fixtures/x509/cert.pem");
    let key = include_str!("fixtures/x509/key.pem");
    let body = serde_json::json!({ "x509-kid-1": cert }).to_string();
    let env = TestEnv::start().await;
    env.dashboard_keys.set_body(body);
    past_refetch_interval().await;

    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("x509-kid-1".into());
    let token = jsonwebtoken::encode(
        &header,
        &env.claims("cert_user", Some(TENANT)),
        &EncodingKey::from_rsa_pem(key.as_bytes()).unwrap(),
    )
    .unwrap();
    // The daemon loaded JWKS at start; the certificate's kid is unknown, so it refetches the map.
    let a = allowed(
        &env.check(API_PATH, &[("authorization", &bearer(&token))])
            .await,
    );
    assert_eq!(a.upstream["x-user-id"], "cert_user");

    // A token for that kid signed by another key fails against the certificate.
    let forged = signing_key("dashboard-1")
        .sign_as(Some("x509-kid-1"), &env.claims("cert_user", Some(TENANT)));
    assert_denied(
        &env.check(API_PATH, &[("authorization", &bearer(&forged))])
            .await,
        401,
        "invalid_token",
    );
    env.stop().await;
}

#[tokio::test]
async fn a_slow_endpoint_bounds_the_wait_and_the_fetch_still_completes() {
    let env = TestEnv::start().await;
    let old = signing_key("dashboard-1");
    let new = signing_key("dashboard-4");
    env.dashboard_keys.set_body(SigningKey::jwks(&[&old, &new]));
    env.dashboard_keys.set_delay(Duration::from_millis(900));
    past_refetch_interval().await;
    let before = env.dashboard_keys.fetches();
    let token = bearer(&new.sign(&env.claims("u1", Some(TENANT))));

    // The Check waits at most unknown_kid_wait_ms (250 ms), not the whole fetch.
    let started = std::time::Instant::now();
    assert_denied(
        &env.check(API_PATH, &[("authorization", &token)]).await,
        401,
        "invalid_token",
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(850),
        "waited {waited:?} for a 900 ms fetch"
    );

    // The fetch went on without the request; once done, the new key verifies with no new fetch.
    tokio::time::sleep(Duration::from_millis(900)).await;
    allowed(&env.check(API_PATH, &[("authorization", &token)]).await);
    assert_eq!(env.dashboard_keys.fetches(), before + 1);
    env.stop().await;
}
