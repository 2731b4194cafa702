//! End to end through the real Envoy: the shipped `deploy/envoy/envoy.yaml` (only its addresses
//! moved to free loopback ports) in front of the real daemon and an echo upstream. Plain HTTP in;
//! asserted are what the client got (status, JSON body, `WWW-Authenticate`, `X-RateLimit-*`,
//! `Retry-After`) and what the upstream received (identity headers, never a credential, never a
//! client's spoofed identity), for every row of the decision table; then Envoy's own settings:
//! health routes without a check, fail-closed 503 while the daemon is down, and recovery.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use gybc_authz::app::{self, Running};
use gybc_authz_engine::authn::apikey::{ApiKey, KeyHash, KeyKind};
use gybc_authz_engine::clock::Clock;
use gybc_authz_engine::config::Config;
use gybc_authz_engine::store::{Key, KeyStore, StoreError};
use support::envoy::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `X-RateLimit-Reset` after the first request of a fresh key: one interval (window / limit) ahead.
fn reset_after_first(env: &TestEnv, limit: u64, window_secs: u64) -> String {
    let interval = window_secs * 1_000_000_000 / limit;
    (env.clock.now_nanos() + interval)
        .div_ceil(1_000_000_000)
        .to_string()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[track_caller]
fn assert_no_rate_limit_headers(r: &Reply) {
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert_eq!(r.header(h), None, "{h} on {r:?}");
    }
}

// === the decision table, row by row ===

async fn row_01_nothing_usable_is_401_missing_credentials(mode: Mode) {
    let s = Stack::start(mode).await;
    let r = s
        .post(API_PATH, &[("content-type", "application/json")])
        .await;
    r.denied(401, "missing_credentials");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"gybc\""));
    assert_no_rate_limit_headers(&r);
    s.stop().await;
}

async fn row_02_valid_jwt_with_tenant_claim_is_allowed_as_jwt(mode: Mode) {
    let s = Stack::start(mode).await;
    let auth = bearer(&s.env.user_token("user_abc", Some(TENANT)));
    let r = s.post(API_PATH, &[("authorization", &auth)]).await;
    let up = r.allowed();
    assert_eq!(
        up.identity(),
        map(&[
            ("x-tenant-id", TENANT),
            ("x-user-id", "user_abc"),
            ("x-auth-method", "jwt")
        ])
    );
    assert_eq!(
        up.one("authorization"),
        Some(auth.as_str()),
        "Authorization passes through unchanged"
    );
    assert_eq!((up.method.as_str(), up.path.as_str()), ("POST", API_PATH));
    assert_no_rate_limit_headers(&r);
    s.stop().await;
}

async fn row_03_valid_jwt_without_tenant_on_a_tenantless_path_is_allowed_without_tenant(
    mode: Mode,
) {
    let s = Stack::start(mode).await;
    let auth = bearer(&s.env.user_token("new_user", None));
    // Envoy sends the path with its query string; the daemon must split it off to match.
    let path = format!("{ORG_CREATE}?src=signup");
    let r = s
        .post(&path, &[("authorization", &auth), ("x-tenant-id", TENANT)])
        .await;
    let up = r.allowed();
    assert_eq!(
        up.identity(),
        map(&[("x-user-id", "new_user"), ("x-auth-method", "jwt")]),
        "no tenant, and the client's x-tenant-id is gone"
    );
    assert_eq!(up.path, path);
    s.stop().await;
}

/// Sends a request line exactly as written (no client-side URL normalisation) and returns the
/// status Envoy answered.
async fn raw_status(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut conn = tokio::net::TcpStream::connect(envoy.ingress).await.unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nhost: api.example.com\r\ncontent-length: 0\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("connection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp);
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"))
}

async fn row_04_valid_jwt_without_tenant_on_any_other_path_is_403_tenant_required(mode: Mode) {
    let s = Stack::start(mode).await;
    let auth = bearer(&s.env.user_token("new_user", None));
    for path in [API_PATH, "/api/v1/orgs/create/", "/api/v1/orgs%2Fcreate"] {
        s.post(path, &[("authorization", &auth)])
            .await
            .denied(403, "tenant_required");
    }
    // The listener normalises paths before the check (`normalize_path`, `merge_slashes`), so the
    // daemon judges the path the app receives: these reach the app as the tenantless path.
    for path in [
        "/api/v1//orgs/create",
        "/api/v1/orgs/./create",
        "/api/v1/x/../orgs/create",
    ] {
        let before = s.upstream.count();
        assert_eq!(
            raw_status(&s.envoy, path, &[("authorization", &auth)]).await,
            200,
            "{path}"
        );
        assert_eq!(s.upstream.count(), before + 1);
        assert_eq!(s.upstream.seen(before).path, ORG_CREATE, "{path}");
    }
    // Encoded slashes are left as they are, and never match a tenantless path.
    assert_eq!(
        raw_status(
            &s.envoy,
            "/api/v1/orgs%2fcreate",
            &[("authorization", &auth)]
        )
        .await,
        403
    );
    s.stop().await;
}

async fn row_05_invalid_jwt_is_401_invalid_token(mode: Mode) {
    let s = Stack::start(mode).await;
    let mut claims = s.env.claims("u1", Some(TENANT));
    claims["aud"] = "someone-else".into();
    let r = s
        .post(
            API_PATH,
            &[("authorization", &bearer(&s.env.sign(&claims)))],
        )
        .await;
    r.denied(401, "invalid_token");
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .starts_with("Bearer realm=\"gybc\", error=\"invalid_token\""),
        "{r:?}"
    );
    s.stop().await;
}

async fn row_06_known_active_secret_key_is_allowed_as_api_key_and_rate_limited(mode: Mode) {
    let s = Stack::start(mode).await;
    let reset = reset_after_first(&s.env, 5, 60);
    let r = s.post(API_PATH, &[("x-api-key", &s.env.keys.secret)]).await;
    let up = r.allowed();
    assert_eq!(
        up.identity(),
        map(&[
            ("x-tenant-id", TENANT),
            ("x-auth-method", "api_key"),
            ("x-api-key-id", "key_secret"),
            ("x-scopes", "threads:read")
        ])
    );
    assert!(
        !up.headers
            .values()
            .flatten()
            .any(|v| v.contains(&s.env.keys.secret)),
        "the key never goes upstream: {up:?}"
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("4"));
    assert_eq!(r.header("x-ratelimit-reset"), Some(reset.as_str()));
    assert_eq!(r.header("retry-after"), None);
    s.stop().await;
}

/// The client gets each rate-limit header once, ours, whether or not the upstream sent one too.
async fn an_upstreams_own_rate_limit_header_is_replaced_not_repeated(mode: Mode) {
    let s = Stack::start(mode).await;
    let key = s.env.keys.secret.clone();
    let own = ("x-echo-response-header", "x-ratelimit-limit: 999");
    let r = s.post(API_PATH, &[("x-api-key", &key), own]).await;
    r.allowed();
    let all = |r: &Reply, h: &str| -> Vec<String> {
        (r.headers.get_all(h).iter())
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all(&r, "x-ratelimit-limit"), ["5"], "{r:?}");
    assert_eq!(all(&r, "x-ratelimit-remaining"), ["4"], "{r:?}");
    // The upstream's headers do reach the client (so the one above was replaced, not lost on
    // the way); and without one from the upstream, each still comes exactly once.
    let other = ("x-echo-response-header", "x-upstream-own: 1");
    let r = s.post(API_PATH, &[("x-api-key", &key), other]).await;
    r.allowed();
    assert_eq!(all(&r, "x-upstream-own"), ["1"], "{r:?}");
    assert_eq!(all(&r, "x-ratelimit-limit"), ["5"], "{r:?}");
    assert_eq!(all(&r, "x-ratelimit-remaining"), ["3"], "{r:?}");
    assert_eq!(all(&r, "x-ratelimit-reset").len(), 1, "{r:?}");
    s.stop().await;
}

async fn row_07_secret_key_with_impersonate_scope_and_on_behalf_of_acts_as_that_user(mode: Mode) {
    let s = Stack::start(mode).await;
    let r = s
        .post(
            API_PATH,
            &[
                ("x-api-key", &s.env.keys.impersonator),
                ("x-on-behalf-of", "user_123"),
            ],
        )
        .await;
    let up = r.allowed();
    assert_eq!(
        up.identity(),
        map(&[
            ("x-tenant-id", TENANT),
            ("x-user-id", "user_123"),
            ("x-auth-method", "api_key"),
            ("x-api-key-id", "key_impersonator"),
            ("x-scopes", "threads:read users:impersonate"),
            ("x-impersonated-by", "key_impersonator"),
        ])
    );
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some("100"),
        "the configured default"
    );
    s.stop().await;
}

async fn row_08_on_behalf_of_without_the_scope_is_403_impersonation_not_allowed(mode: Mode) {
    let s = Stack::start(mode).await;
    let r = s
        .post(
            API_PATH,
            &[
                ("x-api-key", &s.env.keys.secret),
                ("x-on-behalf-of", "user_123"),
            ],
        )
        .await;
    r.denied(403, "impersonation_not_allowed");
    assert_eq!(r.header("www-authenticate"), None);
    s.stop().await;
}

async fn row_09_on_behalf_of_with_a_jwt_or_a_publishable_key_is_403_impersonation_not_allowed(
    mode: Mode,
) {
    let s = Stack::start(mode).await;
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    s.post(
        API_PATH,
        &[("authorization", &jwt), ("x-on-behalf-of", "user_123")],
    )
    .await
    .denied(403, "impersonation_not_allowed");
    let app_jwt = bearer(&s.env.app_user_token("u1", None));
    s.post(
        API_PATH,
        &[
            ("x-api-key", &s.env.keys.publishable),
            ("authorization", &app_jwt),
            ("x-on-behalf-of", "user_123"),
        ],
    )
    .await
    .denied(403, "impersonation_not_allowed");
    s.stop().await;
}

async fn row_10_malformed_on_behalf_of_is_400_invalid_on_behalf_of(mode: Mode) {
    let s = Stack::start(mode).await;
    let key = s.env.keys.impersonator.clone();
    let long = "u".repeat(129);
    // Control characters other than tab cannot travel in HTTP/1.1 header values at all.
    for bad in ["", long.as_str(), "user 1", "a,b", "tab\there"] {
        s.post(API_PATH, &[("x-api-key", &key), ("x-on-behalf-of", bad)])
            .await
            .denied(400, "invalid_on_behalf_of");
    }
    // Sent twice: Envoy joins the copies with a comma.
    s.post(
        API_PATH,
        &[
            ("x-api-key", &key),
            ("x-on-behalf-of", "a"),
            ("x-on-behalf-of", "b"),
        ],
    )
    .await
    .denied(400, "invalid_on_behalf_of");
    let max = "u".repeat(128);
    let r = s
        .post(API_PATH, &[("x-api-key", &key), ("x-on-behalf-of", &max)])
        .await;
    assert_eq!(r.allowed().one("x-user-id"), Some(max.as_str()));
    s.stop().await;
}

async fn row_11_publishable_key_with_a_valid_user_jwt_is_allowed_as_publishable_key(mode: Mode) {
    let s = Stack::start(mode).await;
    let reset = reset_after_first(&s.env, 3, 60);
    let jwt = bearer(&s.env.app_user_token("end_user_9", None));
    let r = s
        .post(
            API_PATH,
            &[
                ("x-api-key", &s.env.keys.publishable),
                ("authorization", &jwt),
                ("origin", APP_ORIGIN),
            ],
        )
        .await;
    let up = r.allowed();
    assert_eq!(
        up.identity(),
        map(&[
            ("x-tenant-id", TENANT),
            ("x-user-id", "end_user_9"),
            ("x-auth-method", "publishable_key"),
            ("x-api-key-id", "key_app")
        ])
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    assert_eq!(r.header("x-ratelimit-reset"), Some(reset.as_str()));
    s.stop().await;
}

async fn row_12_publishable_key_without_a_user_jwt_is_401_user_token_required(mode: Mode) {
    let s = Stack::start(mode).await;
    let r = s
        .post(API_PATH, &[("x-api-key", &s.env.keys.publishable)])
        .await;
    r.denied(401, "user_token_required");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"gybc\""));
    s.stop().await;
}

async fn row_13_publishable_key_with_a_jwt_of_another_tenant_is_403_tenant_mismatch(mode: Mode) {
    let s = Stack::start(mode).await;
    let jwt = bearer(&s.env.app_user_token("u1", Some(OTHER_TENANT)));
    s.post(
        API_PATH,
        &[
            ("x-api-key", &s.env.keys.publishable),
            ("authorization", &jwt),
        ],
    )
    .await
    .denied(403, "tenant_mismatch");

    // Identity Platform: the key names a tenant; a token of another one is refused.
    let signer = signing_key("app-1");
    let mut claims = gybc_authz::dev::firebase_claims(APP_PROJECT, "u1", None, s.env.now(), 3600);
    claims["firebase"]["tenant"] = "ip-tenant-b".into();
    let other_ip = bearer(&signer.sign(&claims));
    s.post(
        API_PATH,
        &[
            ("x-api-key", &s.env.keys.publishable_ip),
            ("authorization", &other_ip),
        ],
    )
    .await
    .denied(403, "tenant_mismatch");
    claims["firebase"]["tenant"] = IP_TENANT.into();
    let same_ip = bearer(&signer.sign(&claims));
    let r = s
        .post(
            API_PATH,
            &[
                ("x-api-key", &s.env.keys.publishable_ip),
                ("authorization", &same_ip),
            ],
        )
        .await;
    assert_eq!(r.allowed().one("x-tenant-id"), Some(TENANT));
    s.stop().await;
}

async fn row_14_publishable_key_from_an_origin_outside_its_allowlist_is_403_origin_not_allowed(
    mode: Mode,
) {
    let s = Stack::start(mode).await;
    let jwt = bearer(&s.env.app_user_token("u1", None));
    s.post(
        API_PATH,
        &[
            ("x-api-key", &s.env.keys.publishable),
            ("authorization", &jwt),
            ("origin", "https://evil.example"),
        ],
    )
    .await
    .denied(403, "origin_not_allowed");
    s.stop().await;
}

async fn row_15_secret_key_with_authorization_as_well_is_400_ambiguous_credentials(mode: Mode) {
    let s = Stack::start(mode).await;
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    s.post(
        API_PATH,
        &[("x-api-key", &s.env.keys.secret), ("authorization", &jwt)],
    )
    .await
    .denied(400, "ambiguous_credentials");
    s.stop().await;
}

async fn row_16_the_same_credential_header_twice_is_400_malformed_credentials(mode: Mode) {
    let s = Stack::start(mode).await;
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    // Two header lines; Envoy joins them with a comma in the Check's header map.
    s.post(
        API_PATH,
        &[("authorization", &jwt), ("authorization", &jwt)],
    )
    .await
    .denied(400, "malformed_credentials");
    s.post(
        API_PATH,
        &[
            ("x-api-key", &s.env.keys.secret),
            ("x-api-key", &s.env.keys.impersonator),
        ],
    )
    .await
    .denied(400, "malformed_credentials");
    s.stop().await;
}

async fn row_17_authorization_that_is_not_bearer_is_401_invalid_token(mode: Mode) {
    let s = Stack::start(mode).await;
    for value in [
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer",
        "Bearer ",
        "eyJhbGciOiJSUzI1NiJ9.e30.sig",
        "",
    ] {
        let r = s.post(API_PATH, &[("authorization", value)]).await;
        r.denied(401, "invalid_token");
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains("error=\"invalid_token\""),
            "{value:?}: {r:?}"
        );
    }
    s.stop().await;
}

async fn row_18_a_key_of_another_prefix_or_a_malformed_key_is_401_invalid_api_key(mode: Mode) {
    let s = Stack::start(mode).await;
    let mut typo = s.env.keys.secret.clone().into_bytes();
    typo[5] = if typo[5] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    let other_prefix = s.env.keys.secret.replacen("sk_", "rk_", 1);
    for key in [
        other_prefix.as_str(),
        "sk_short",
        "sk_with spaces in it 0123456789",
        typo.as_str(),
        "",
        "pk_",
    ] {
        let r = s.post(API_PATH, &[("x-api-key", key)]).await;
        let body = r.denied(401, "invalid_api_key");
        assert_no_rate_limit_headers(&r);
        assert!(key.is_empty() || !body["message"].as_str().unwrap().contains(key));
    }
    s.stop().await;
}

async fn row_19_a_key_unknown_revoked_or_expired_is_401_invalid_api_key(mode: Mode) {
    let s = Stack::start(mode).await;
    for key in [
        &s.env.keys.unknown,
        &s.env.keys.revoked,
        &s.env.keys.expired,
    ] {
        s.post(API_PATH, &[("x-api-key", key)])
            .await
            .denied(401, "invalid_api_key");
    }
    s.stop().await;
}

async fn row_20_over_the_keys_rate_limit_is_429_rate_limited(mode: Mode) {
    let s = Stack::start(mode).await;
    let key = s.env.keys.limited.clone();
    let reset = reset_after_first(&s.env, 2, 60);
    for remaining in ["1", "0"] {
        let r = s.post(API_PATH, &[("x-api-key", &key)]).await;
        r.allowed();
        assert_eq!(r.header("x-ratelimit-remaining"), Some(remaining));
    }
    let r = s.post(API_PATH, &[("x-api-key", &key)]).await;
    r.denied(429, "rate_limited");
    let reset_full = (reset.parse::<u64>().unwrap() + 30).to_string();
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("x-ratelimit-reset"), Some(reset_full.as_str()));
    assert_eq!(r.header("retry-after"), Some("30"));
    // Time passes (the engine's injected clock): one more request goes through.
    s.advance(Duration::from_secs(30));
    s.post(API_PATH, &[("x-api-key", &key)]).await.allowed();
    s.stop().await;
}

/// A key store that cannot be reached.
struct Unreachable;

impl KeyStore for Unreachable {
    fn lookup<'a>(&'a self, _: &'a KeyHash) -> BoxFuture<'a, Result<Option<Arc<Key>>, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
    }
}

#[tokio::test]
async fn row_21_key_store_unreachable_and_key_not_cached_is_503_unavailable() {
    // The store is injected in-process, which only the daemon allows; the module meets an
    // unreachable store in tests/envoy_redis.rs (a Redis outage), in both modes.
    let s = Stack::start_with(
        Mode::Sidecar,
        EnvOptions {
            store: Some(Arc::new(Unreachable)),
            ..Default::default()
        },
    )
    .await;
    let r = s.post(API_PATH, &[("x-api-key", &s.env.keys.secret)]).await;
    // The daemon's 503 carries a JSON reason, unlike Envoy's own 503 when the daemon is down.
    r.denied(503, "unavailable");
    assert_eq!(r.header("retry-after"), Some("5"));
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    s.post(API_PATH, &[("authorization", &jwt)]).await.allowed();
    s.stop().await;
}

// === spoofing ===

const SPOOFED: &str = "spoofed-by-client";

/// Every identity header twice in mixed case, plus the credential-ish headers.
fn spoofs() -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    for h in [
        "X-Tenant-Id",
        "x-user-id",
        "X-AUTH-METHOD",
        "x-api-key-id",
        "X-Scopes",
        "x-impersonated-by",
    ] {
        v.push((h, SPOOFED));
        v.push((h, SPOOFED));
    }
    v
}

#[track_caller]
fn assert_no_spoof_upstream(up: &Seen, what: &str) {
    for (name, values) in &up.headers {
        assert!(
            !values.iter().any(|v| v.contains(SPOOFED)),
            "{what}: spoofed {name} reached the upstream: {up:?}"
        );
    }
}

async fn client_identity_headers_never_reach_the_upstream_on_any_path(mode: Mode) {
    let s = Stack::start(mode).await;
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    let tenantless = bearer(&s.env.user_token("u1", None));
    let app_jwt = bearer(&s.env.app_user_token("u1", None));
    let keys = &s.env.keys;
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<(&'a str, &'a str)>,
    );
    let allows: Vec<Case> = vec![
        (
            "jwt with tenant",
            API_PATH,
            vec![("authorization", &jwt)],
            vec![
                ("x-tenant-id", TENANT),
                ("x-user-id", "u1"),
                ("x-auth-method", "jwt"),
            ],
        ),
        (
            "jwt without tenant",
            ORG_CREATE,
            vec![("authorization", &tenantless)],
            vec![("x-user-id", "u1"), ("x-auth-method", "jwt")],
        ),
        (
            "secret key",
            API_PATH,
            vec![("x-api-key", &keys.secret)],
            vec![
                ("x-tenant-id", TENANT),
                ("x-auth-method", "api_key"),
                ("x-api-key-id", "key_secret"),
                ("x-scopes", "threads:read"),
            ],
        ),
        (
            "secret key impersonating",
            API_PATH,
            vec![
                ("x-api-key", &keys.impersonator),
                ("x-on-behalf-of", "user_7"),
            ],
            vec![
                ("x-tenant-id", TENANT),
                ("x-user-id", "user_7"),
                ("x-auth-method", "api_key"),
                ("x-api-key-id", "key_impersonator"),
                ("x-scopes", "threads:read users:impersonate"),
                ("x-impersonated-by", "key_impersonator"),
            ],
        ),
        (
            "publishable key",
            API_PATH,
            vec![
                ("x-api-key", &keys.publishable),
                ("authorization", &app_jwt),
            ],
            vec![
                ("x-tenant-id", TENANT),
                ("x-user-id", "u1"),
                ("x-auth-method", "publishable_key"),
                ("x-api-key-id", "key_app"),
            ],
        ),
    ];
    for (what, path, creds, expected) in allows {
        let mut headers = spoofs();
        headers.extend(creds);
        let r = s.post(path, &headers).await;
        let up = r.allowed();
        // Each identity header the daemon sets arrives once, with its value (OVERWRITE, not
        // appended beside the client's copies); every other one is gone.
        assert_eq!(up.identity(), map(&expected), "{what}");
        assert_no_spoof_upstream(up, what);
    }

    // Denials: nothing reaches the upstream at all (`denied` asserts it).
    let mut headers = spoofs();
    headers.push(("x-api-key", &keys.revoked));
    s.post(API_PATH, &headers)
        .await
        .denied(401, "invalid_api_key");
    s.post(API_PATH, &spoofs())
        .await
        .denied(401, "missing_credentials");

    // Health routes skip the check; Envoy strips identity and credential headers itself there.
    let mut headers = spoofs();
    headers.extend([
        ("x-api-key", keys.secret.as_str()),
        ("x-on-behalf-of", "u9"),
    ]);
    let r = s.send("GET", "/healthz", &headers).await;
    let up = r.allowed();
    assert!(up.identity().is_empty(), "{up:?}");
    assert_no_spoof_upstream(up, "health route");
    assert!(
        !up.headers
            .values()
            .flatten()
            .any(|v| v.contains(&keys.secret))
    );
    s.stop().await;
}

// === Envoy's own settings ===

async fn health_routes_skip_the_check_for_get_and_head_only(mode: Mode) {
    let s = Stack::start(mode).await;
    for (method, path) in [
        ("GET", "/healthz"),
        ("HEAD", "/healthz"),
        ("GET", "/readyz"),
    ] {
        let r = s.send(method, path, &[]).await;
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
        assert!(r.upstream.is_some(), "{method} {path} reached the app");
    }
    // Anything else on those paths, or near them, is checked.
    for (method, path) in [
        ("POST", "/healthz"),
        ("GET", "/healthz/x"),
        ("GET", "/healthzz"),
        ("GET", "/healthz?x=1&y"),
    ] {
        let r = s.send(method, path, &[]).await;
        if path.contains('?') {
            // The route matches the path without its query: still a health check.
            assert_eq!(r.status, 200, "{method} {path}: {r:?}");
            continue;
        }
        r.denied(401, "missing_credentials");
    }
    // The stats listener exposes readiness and Prometheus stats, and nothing else of the admin API.
    let http = client();
    let get = |path: &str| {
        let url = format!("http://{}{path}", s.envoy.stats);
        let http = http.clone();
        async move { http.get(url).send().await.unwrap() }
    };
    assert_eq!(get("/ready").await.status(), 200);
    let prom = get("/stats/prometheus").await;
    assert_eq!(prom.status(), 200);
    assert!(prom.text().await.unwrap().contains("envoy_cluster_"));
    let r = http
        .post(format!("http://{}/quitquitquit", s.envoy.stats))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(get("/config_dump").await.status(), 404);
    assert_eq!(get("/ready").await.status(), 200, "still running");
    s.stop().await;
}

/// A daemon on a fixed gRPC address, with one secret key and no JWT providers (ready at once).
async fn daemon_on(grpc: SocketAddr, key_file: &Path) -> Running {
    let yaml = format!(
        "server: {{ grpc_addr: \"{grpc}\", http_addr: \"127.0.0.1:0\", shutdown_grace_secs: 2 }}\n\
         key_store: {{ type: file, path: \"{}\" }}\n",
        key_file.display()
    );
    let cfg = Config::from_yaml(&yaml, &std::collections::BTreeMap::new()).expect("valid config");
    let d = app::start(cfg, Default::default())
        .await
        .expect("daemon starts");
    assert!(d.wait_ready(Duration::from_secs(10)).await);
    d
}

#[tokio::test]
async fn daemon_down_is_503_from_envoy_and_service_recovers_on_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let key = ApiKey::generate(KeyKind::Secret);
    let key_file = dir.path().join("keys.yaml");
    std::fs::write(
        &key_file,
        format!(
            "keys:\n  - {{ id: key_a, hash: \"sha256:{}\", kind: secret, tenant: {TENANT} }}\n",
            KeyHash::of(&key).to_hex()
        ),
    )
    .unwrap();
    // A fixed port, so that the restarted daemon is where Envoy's static cluster points.
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let daemon = daemon_on(grpc, &key_file).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&EnvoyConfig::for_test(grpc, upstream.addr)).await;
    let http = client();
    let with_key = [("x-api-key", key.as_str())];

    let r = send(&http, &envoy, &upstream, "GET", API_PATH, &with_key).await;
    assert_eq!(r.allowed().one("x-api-key-id"), Some("key_a"));

    daemon.shutdown().await;
    // Fail closed: every checked request is refused with 503, and Envoy's own answer carries
    // no gybc-authz reason, so an outage is told apart from a denial.
    for headers in [&with_key[..], &[]] {
        let r = send(&http, &envoy, &upstream, "GET", API_PATH, headers).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.upstream.is_none(), "{r:?}");
        assert!(!r.body.contains("\"reason\""), "{r:?}");
        assert_no_rate_limit_headers(&r);
    }

    // Back on the same port: Envoy reconnects on its own.
    let daemon = daemon_on(grpc, &key_file).await;
    let mut r = send(&http, &envoy, &upstream, "GET", API_PATH, &with_key).await;
    for _ in 0..200 {
        if r.status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        r = send(&http, &envoy, &upstream, "GET", API_PATH, &with_key).await;
    }
    assert_eq!(r.allowed().one("x-tenant-id"), Some(TENANT));
    send(&http, &envoy, &upstream, "GET", API_PATH, &[])
        .await
        .denied(401, "missing_credentials");
    drop(envoy);
    daemon.shutdown().await;
}

// === the Envoy notes, checked against this Envoy ===

fn validate(cfg: &EnvoyConfig) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, cfg.to_yaml()).unwrap();
    std::process::Command::new(envoy_bin())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .unwrap()
}

#[tokio::test]
async fn shipped_config_passes_envoy_validate() {
    let out = std::process::Command::new(envoy_bin())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(shipped_config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[tokio::test]
async fn without_http2_on_the_cluster_validate_passes_but_every_check_fails() {
    let s = Stack::start(Mode::Sidecar).await;
    let mut cfg = EnvoyConfig::for_test(s.env.daemon.as_ref().unwrap().grpc_addr, s.upstream.addr);
    cfg.cluster("gybc_authz")
        .as_mapping_mut()
        .unwrap()
        .remove("typed_extension_protocol_options");
    let out = validate(&cfg);
    assert!(out.status.success(), "validate does not catch it");
    let h1 = Envoy::start(&cfg).await;
    let jwt = bearer(&s.env.user_token("u1", Some(TENANT)));
    let r = send(
        &s.http,
        &h1,
        &s.upstream,
        "GET",
        API_PATH,
        &[("authorization", &jwt)],
    )
    .await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.upstream.is_none());
    assert!(
        h1.counter("cluster.gybc_authz.upstream_cx_protocol_error")
            .await
            > 0,
        "an HTTP/1.1 connection to a gRPC server is a protocol error"
    );
    // The shipped config, HTTP/2 on, lets the same request through.
    s.send("GET", API_PATH, &[("authorization", &jwt)])
        .await
        .allowed();
    drop(h1);
    s.stop().await;
}

#[tokio::test]
async fn without_status_on_error_an_unreachable_daemon_is_a_403() {
    let upstream = Upstream::start().await;
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = EnvoyConfig::for_test(nobody, upstream.addr);
    cfg.ext_authz()
        .as_mapping_mut()
        .unwrap()
        .remove("status_on_error");
    let envoy = Envoy::start(&cfg).await;
    let r = send(&client(), &envoy, &upstream, "GET", API_PATH, &[]).await;
    assert_eq!(
        r.status, 403,
        "Envoy's default, indistinguishable from a denial"
    );
    assert!(r.upstream.is_none());
    drop(envoy);
    let envoy = Envoy::start(&EnvoyConfig::for_test(nobody, upstream.addr)).await;
    let r = send(&client(), &envoy, &upstream, "GET", API_PATH, &[]).await;
    assert_eq!(r.status, 503, "the shipped setting");
}

// Every decision-table row but the injected-store one, spoofing and the health routes, with the
// engine as a sidecar and inside Envoy.
both_modes!(
    row_01_nothing_usable_is_401_missing_credentials,
    row_02_valid_jwt_with_tenant_claim_is_allowed_as_jwt,
    row_03_valid_jwt_without_tenant_on_a_tenantless_path_is_allowed_without_tenant,
    row_04_valid_jwt_without_tenant_on_any_other_path_is_403_tenant_required,
    row_05_invalid_jwt_is_401_invalid_token,
    row_06_known_active_secret_key_is_allowed_as_api_key_and_rate_limited,
    an_upstreams_own_rate_limit_header_is_replaced_not_repeated,
    row_07_secret_key_with_impersonate_scope_and_on_behalf_of_acts_as_that_user,
    row_08_on_behalf_of_without_the_scope_is_403_impersonation_not_allowed,
    row_09_on_behalf_of_with_a_jwt_or_a_publishable_key_is_403_impersonation_not_allowed,
    row_10_malformed_on_behalf_of_is_400_invalid_on_behalf_of,
    row_11_publishable_key_with_a_valid_user_jwt_is_allowed_as_publishable_key,
    row_12_publishable_key_without_a_user_jwt_is_401_user_token_required,
    row_13_publishable_key_with_a_jwt_of_another_tenant_is_403_tenant_mismatch,
    row_14_publishable_key_from_an_origin_outside_its_allowlist_is_403_origin_not_allowed,
    row_15_secret_key_with_authorization_as_well_is_400_ambiguous_credentials,
    row_16_the_same_credential_header_twice_is_400_malformed_credentials,
    row_17_authorization_that_is_not_bearer_is_401_invalid_token,
    row_18_a_key_of_another_prefix_or_a_malformed_key_is_401_invalid_api_key,
    row_19_a_key_unknown_revoked_or_expired_is_401_invalid_api_key,
    row_20_over_the_keys_rate_limit_is_429_rate_limited,
    client_identity_headers_never_reach_the_upstream_on_any_path,
    health_routes_skip_the_check_for_get_and_head_only,
);
