//! One test per row of the decision table in the contract (docs/design.md), each against the real
//! daemon over gRPC: status, reason, every upstream header, the headers removed, and the headers
//! sent back to the client.

mod support;

use std::sync::Arc;

use gybc_authz_engine::clock::Clock;
use support::*;

/// `X-RateLimit-Reset` after the first request of a fresh key: one interval (window / limit) ahead.
fn reset_after_first(env: &TestEnv, limit: u64, window_secs: u64) -> String {
    let interval = window_secs * 1_000_000_000 / limit;
    (env.clock.now_nanos() + interval)
        .div_ceil(1_000_000_000)
        .to_string()
}

#[tokio::test]
async fn row_01_nothing_usable_is_401_missing_credentials() {
    let env = TestEnv::start().await;
    let d = assert_denied(
        &env.check(API_PATH, &[("content-type", "application/json")])
            .await,
        401,
        "missing_credentials",
    );
    assert_eq!(d.grpc_code, 16);
    assert_eq!(d.headers["www-authenticate"], "Bearer realm=\"gybc\"");
    assert!(!d.headers.contains_key("x-ratelimit-limit"));
    env.stop().await;
}

#[tokio::test]
async fn row_02_valid_jwt_with_tenant_claim_is_allowed_as_jwt() {
    let env = TestEnv::start().await;
    let token = env.user_token("user_abc", Some(TENANT));
    let a = allowed(
        &env.check(API_PATH, &[("authorization", &format!("Bearer {token}"))])
            .await,
    );
    assert_eq!(
        a.upstream,
        map(&[
            ("x-tenant-id", TENANT),
            ("x-user-id", "user_abc"),
            ("x-auth-method", "jwt")
        ])
    );
    assert_eq!(a.removed, expected_removed(&a.upstream));
    assert!(
        a.to_client.is_empty(),
        "JWT traffic is not rate limited: {:?}",
        a.to_client
    );
    env.stop().await;
}

#[tokio::test]
async fn row_03_valid_jwt_without_tenant_on_a_tenantless_path_is_allowed_without_tenant() {
    let env = TestEnv::start().await;
    let token = env.user_token("new_user", None);
    let a = allowed(
        &env.check(
            &format!("{ORG_CREATE}?src=signup"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await,
    );
    assert_eq!(
        a.upstream,
        map(&[("x-user-id", "new_user"), ("x-auth-method", "jwt")])
    );
    assert!(
        a.removed.contains(&"x-tenant-id".to_owned()),
        "a client's x-tenant-id is stripped"
    );
    assert_eq!(a.removed, expected_removed(&a.upstream));
    env.stop().await;
}

#[tokio::test]
async fn row_04_valid_jwt_without_tenant_on_any_other_path_is_403_tenant_required() {
    let env = TestEnv::start().await;
    let auth = format!("Bearer {}", env.user_token("new_user", None));
    for path in [
        API_PATH,
        "/api/v1/orgs/create/",
        "/api/v1//orgs/create",
        "/api/v1/orgs/./create",
        "/api/v1/orgs%2Fcreate",
    ] {
        let d = assert_denied(
            &env.check(path, &[("authorization", &auth)]).await,
            403,
            "tenant_required",
        );
        assert_eq!(d.grpc_code, 7, "{path}");
    }
    env.stop().await;
}

#[tokio::test]
async fn row_05_invalid_jwt_is_401_invalid_token() {
    let env = TestEnv::start().await;
    let mut claims = env.claims("u1", Some(TENANT));
    claims["aud"] = "someone-else".into();
    let d = assert_denied(
        &env.check(
            API_PATH,
            &[("authorization", &format!("Bearer {}", env.sign(&claims)))],
        )
        .await,
        401,
        "invalid_token",
    );
    assert!(
        d.headers["www-authenticate"].starts_with("Bearer realm=\"gybc\", error=\"invalid_token\"")
    );
    env.stop().await;
}

#[tokio::test]
async fn row_06_known_active_secret_key_is_allowed_as_api_key_and_rate_limited() {
    let env = TestEnv::start().await;
    let reset = reset_after_first(&env, 5, 60);
    let a = allowed(
        &env.check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await,
    );
    assert_eq!(
        a.upstream,
        map(&[
            ("x-tenant-id", TENANT),
            ("x-auth-method", "api_key"),
            ("x-api-key-id", "key_secret"),
            ("x-scopes", "threads:read")
        ])
    );
    assert_eq!(a.removed, expected_removed(&a.upstream));
    assert_eq!(
        a.to_client,
        map(&[
            ("x-ratelimit-limit", "5"),
            ("x-ratelimit-remaining", "4"),
            ("x-ratelimit-reset", &reset)
        ])
    );
    assert!(
        !a.upstream.values().any(|v| v.contains(&env.keys.secret)),
        "the key never goes upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn row_07_secret_key_with_impersonate_scope_and_on_behalf_of_acts_as_that_user() {
    let env = TestEnv::start().await;
    let a = allowed(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.impersonator),
                ("x-on-behalf-of", "user_123"),
            ],
        )
        .await,
    );
    assert_eq!(
        a.upstream,
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
        a.removed,
        vec!["x-api-key", "x-on-behalf-of"],
        "X-On-Behalf-Of is consumed"
    );
    assert_eq!(
        a.to_client["x-ratelimit-limit"], "100",
        "no limit in metadata: the configured default"
    );
    env.stop().await;
}

#[tokio::test]
async fn row_08_on_behalf_of_without_the_scope_is_403_impersonation_not_allowed() {
    let env = TestEnv::start().await;
    let d = assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.secret),
                ("x-on-behalf-of", "user_123"),
            ],
        )
        .await,
        403,
        "impersonation_not_allowed",
    );
    assert!(!d.headers.contains_key("www-authenticate"));
    env.stop().await;
}

#[tokio::test]
async fn row_09_on_behalf_of_with_a_jwt_or_a_publishable_key_is_403_impersonation_not_allowed() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    assert_denied(
        &env.check(
            API_PATH,
            &[("authorization", &jwt), ("x-on-behalf-of", "user_123")],
        )
        .await,
        403,
        "impersonation_not_allowed",
    );
    let app_jwt = format!("Bearer {}", env.app_user_token("u1", None));
    assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &app_jwt),
                ("x-on-behalf-of", "user_123"),
            ],
        )
        .await,
        403,
        "impersonation_not_allowed",
    );
    env.stop().await;
}

#[tokio::test]
async fn row_10_malformed_on_behalf_of_is_400_invalid_on_behalf_of() {
    let env = TestEnv::start().await;
    let long = "u".repeat(129);
    for bad in [
        "",
        long.as_str(),
        "user 1",
        "a,b",
        "user\u{1}x",
        "tab\there",
    ] {
        let d = assert_denied(
            &env.check(
                API_PATH,
                &[
                    ("x-api-key", &env.keys.impersonator),
                    ("x-on-behalf-of", bad),
                ],
            )
            .await,
            400,
            "invalid_on_behalf_of",
        );
        assert_eq!(d.grpc_code, 3, "{bad:?}");
    }
    // 128 characters is still fine.
    allowed(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.impersonator),
                ("x-on-behalf-of", &"u".repeat(128)),
            ],
        )
        .await,
    );
    env.stop().await;
}

#[tokio::test]
async fn row_11_publishable_key_with_a_valid_user_jwt_is_allowed_as_publishable_key() {
    let env = TestEnv::start().await;
    let reset = reset_after_first(&env, 3, 60);
    let jwt = format!("Bearer {}", env.app_user_token("end_user_9", None));
    let a = allowed(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &jwt),
                ("origin", APP_ORIGIN),
            ],
        )
        .await,
    );
    assert_eq!(
        a.upstream,
        map(&[
            ("x-tenant-id", TENANT),
            ("x-user-id", "end_user_9"),
            ("x-auth-method", "publishable_key"),
            ("x-api-key-id", "key_app")
        ])
    );
    assert_eq!(a.removed, expected_removed(&a.upstream));
    assert_eq!(
        a.to_client,
        map(&[
            ("x-ratelimit-limit", "3"),
            ("x-ratelimit-remaining", "2"),
            ("x-ratelimit-reset", &reset)
        ])
    );
    // A token carrying the key's own tenant is fine too.
    let jwt = format!("Bearer {}", env.app_user_token("end_user_9", Some(TENANT)));
    allowed(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &jwt),
            ],
        )
        .await,
    );
    env.stop().await;
}

#[tokio::test]
async fn row_12_publishable_key_without_a_user_jwt_is_401_user_token_required() {
    let env = TestEnv::start().await;
    let d = assert_denied(
        &env.check(API_PATH, &[("x-api-key", &env.keys.publishable)])
            .await,
        401,
        "user_token_required",
    );
    assert_eq!(d.headers["www-authenticate"], "Bearer realm=\"gybc\"");
    env.stop().await;
}

#[tokio::test]
async fn row_13_publishable_key_with_a_jwt_of_another_tenant_is_403_tenant_mismatch() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.app_user_token("u1", Some(OTHER_TENANT)));
    assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &jwt),
            ],
        )
        .await,
        403,
        "tenant_mismatch",
    );

    // Identity Platform: the key names a tenant; a token of another (or none) is refused.
    let signer = signing_key("app-1");
    let now = env.now();
    let mut claims = gybc_authz::dev::firebase_claims(APP_PROJECT, "u1", None, now, 3600);
    claims["firebase"]["tenant"] = "ip-tenant-b".into();
    let other_ip = format!("Bearer {}", signer.sign(&claims));
    assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable_ip),
                ("authorization", &other_ip),
            ],
        )
        .await,
        403,
        "tenant_mismatch",
    );
    claims["firebase"]["tenant"] = IP_TENANT.into();
    let same_ip = format!("Bearer {}", signer.sign(&claims));
    let a = allowed(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable_ip),
                ("authorization", &same_ip),
            ],
        )
        .await,
    );
    assert_eq!(a.upstream["x-tenant-id"], TENANT);
    env.stop().await;
}

#[tokio::test]
async fn row_14_publishable_key_from_an_origin_outside_its_allowlist_is_403_origin_not_allowed() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.app_user_token("u1", None));
    assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.publishable),
                ("authorization", &jwt),
                ("origin", "https://evil.example"),
            ],
        )
        .await,
        403,
        "origin_not_allowed",
    );
    env.stop().await;
}

#[tokio::test]
async fn row_15_secret_key_with_authorization_as_well_is_400_ambiguous_credentials() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    assert_denied(
        &env.check(
            API_PATH,
            &[("x-api-key", &env.keys.secret), ("authorization", &jwt)],
        )
        .await,
        400,
        "ambiguous_credentials",
    );
    env.stop().await;
}

#[tokio::test]
async fn row_16_the_same_credential_header_twice_is_400_malformed_credentials() {
    let env = TestEnv::start().await;
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    // Envoy joins duplicates with a comma.
    assert_denied(
        &env.check(
            API_PATH,
            &[("authorization", &jwt), ("authorization", &jwt)],
        )
        .await,
        400,
        "malformed_credentials",
    );
    assert_denied(
        &env.check(
            API_PATH,
            &[
                ("x-api-key", &env.keys.secret),
                ("x-api-key", &env.keys.impersonator),
            ],
        )
        .await,
        400,
        "malformed_credentials",
    );
    // With `encode_raw_headers`, duplicates arrive as separate entries.
    let mut req = gybc_authz::cli::check::check_request("POST", API_PATH, "h", &[]);
    let http = req
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap();
    http.header_map = Some(envoy_types::pb::envoy::config::core::v3::HeaderMap {
        headers: [&env.keys.secret, &env.keys.secret]
            .iter()
            .map(|k| envoy_types::pb::envoy::config::core::v3::HeaderValue {
                key: "x-api-key".into(),
                raw_value: k.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    });
    assert_denied(&env.check_raw(req).await, 400, "malformed_credentials");
    env.stop().await;
}

#[tokio::test]
async fn row_17_authorization_that_is_not_bearer_is_401_invalid_token() {
    let env = TestEnv::start().await;
    for value in [
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer",
        "Bearer ",
        "eyJhbGciOiJSUzI1NiJ9.e30.sig",
        "",
    ] {
        let d = assert_denied(
            &env.check(API_PATH, &[("authorization", value)]).await,
            401,
            "invalid_token",
        );
        assert!(
            d.headers["www-authenticate"].contains("error=\"invalid_token\""),
            "{value:?}"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn row_18_a_key_of_another_prefix_or_a_malformed_key_is_401_invalid_api_key() {
    let env = TestEnv::start().await;
    let mut typo = env.keys.secret.clone().into_bytes();
    typo[5] = if typo[5] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    let other_prefix = env.keys.secret.replacen("sk_", "rk_", 1);
    for key in [
        other_prefix.as_str(),
        "sk_short",
        "sk_with spaces in it 0123456789",
        typo.as_str(),
        "",
        "pk_",
    ] {
        let d = assert_denied(
            &env.check(API_PATH, &[("x-api-key", key)]).await,
            401,
            "invalid_api_key",
        );
        assert!(!d.headers.contains_key("x-ratelimit-limit"), "{key:?}");
        assert!(!d.message.contains(key) || key.is_empty());
    }
    env.stop().await;
}

#[tokio::test]
async fn row_19_a_key_unknown_revoked_or_expired_is_401_invalid_api_key() {
    let env = TestEnv::start().await;
    for key in [&env.keys.unknown, &env.keys.revoked, &env.keys.expired] {
        assert_denied(
            &env.check(API_PATH, &[("x-api-key", key)]).await,
            401,
            "invalid_api_key",
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn row_20_over_the_keys_rate_limit_is_429_rate_limited() {
    let env = TestEnv::start().await;
    let reset = reset_after_first(&env, 2, 60);
    for remaining in ["1", "0"] {
        let a = allowed(
            &env.check(API_PATH, &[("x-api-key", &env.keys.limited)])
                .await,
        );
        assert_eq!(a.to_client["x-ratelimit-remaining"], remaining);
    }
    let d = assert_denied(
        &env.check(API_PATH, &[("x-api-key", &env.keys.limited)])
            .await,
        429,
        "rate_limited",
    );
    assert_eq!(d.grpc_code, 8);
    let reset_full = (reset.parse::<u64>().unwrap() + 30).to_string();
    assert_eq!(d.headers["x-ratelimit-limit"], "2");
    assert_eq!(d.headers["x-ratelimit-remaining"], "0");
    assert_eq!(
        d.headers["x-ratelimit-reset"], reset_full,
        "quota fully back one window after the burst"
    );
    assert_eq!(
        d.headers["retry-after"], "30",
        "one request's worth of quota drains in 30 s"
    );
    // Time passes (injected clock): one more request is allowed.
    env.clock.advance(std::time::Duration::from_secs(30));
    allowed(
        &env.check(API_PATH, &[("x-api-key", &env.keys.limited)])
            .await,
    );
    env.stop().await;
}

#[tokio::test]
async fn row_21_key_store_unreachable_and_key_not_cached_is_503_unavailable() {
    let env = TestEnv::start_with(EnvOptions {
        store: Some(Arc::new(UnreachableStore)),
        ..Default::default()
    })
    .await;
    let d = assert_denied(
        &env.check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await,
        503,
        "unavailable",
    );
    assert_eq!(d.grpc_code, 14);
    assert_eq!(d.headers["retry-after"], "5");
    // JWT traffic does not depend on the key store.
    let jwt = format!("Bearer {}", env.user_token("u1", Some(TENANT)));
    allowed(&env.check(API_PATH, &[("authorization", &jwt)]).await);
    env.stop().await;
}

#[tokio::test]
async fn row_22_a_secret_key_sent_by_a_browser_is_403_secret_key_in_browser_unless_allowed() {
    // Refused by default, whatever the origin (the opaque `null` of a sandboxed page too); a
    // request without `Origin` (a backend) is the secret key's normal use.
    let env = TestEnv::start().await;
    for origin in ["https://app.example.com", "null"] {
        let d = assert_denied(
            &env.check(
                API_PATH,
                &[("x-api-key", &env.keys.secret), ("origin", origin)],
            )
            .await,
            403,
            "secret_key_in_browser",
        );
        assert_eq!(d.grpc_code, 7);
        assert!(d.message.contains("publishable key"), "{d:?}");
        assert!(!d.headers.contains_key("x-ratelimit-limit"), "not counted");
    }
    allowed(
        &env.check(API_PATH, &[("x-api-key", &env.keys.secret)])
            .await,
    );
    // An unknown secret key is still 401: the rule applies to a key that authenticated.
    assert_denied(
        &env.check(
            API_PATH,
            &[("x-api-key", &env.keys.unknown), ("origin", APP_ORIGIN)],
        )
        .await,
        401,
        "invalid_api_key",
    );
    assert_eq!(secret_keys_from_browsers(&env).await, (2.0, 0.0));
    env.stop().await;

    // `policy.secret_key_from_browser: allow`: let through as any sk_ request, and counted.
    let env = TestEnv::start_with(EnvOptions {
        extra_yaml: "policy: { secret_key_from_browser: allow }\n".into(),
        ..Default::default()
    })
    .await;
    let a = allowed(
        &env.check(
            API_PATH,
            &[("x-api-key", &env.keys.secret), ("origin", APP_ORIGIN)],
        )
        .await,
    );
    assert_eq!(a.upstream["x-api-key-id"], "key_secret");
    assert_eq!(a.to_client["x-ratelimit-remaining"], "4");
    assert_eq!(secret_keys_from_browsers(&env).await, (0.0, 1.0));
    env.stop().await;
}

/// `gybc_authz_secret_key_from_browser_total` as (refused, let through).
async fn secret_keys_from_browsers(env: &TestEnv) -> (f64, f64) {
    let m = scrape(env).await;
    let counted = |action| {
        m.get(
            "gybc_authz_secret_key_from_browser_total",
            &[("action", action)],
        )
    };
    (counted("deny"), counted("allow"))
}
